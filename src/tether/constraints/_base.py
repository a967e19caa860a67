"""``Constraint``: what every ready-made parametrization of tether offers."""

from __future__ import annotations

import abc
import functools
import math
import typing
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from tether._checks import bad_dtype, tensor_label
from tether.functional._precision import (
    autocast_enabled,
    compute_dtype,
    real_dtype,
    storage_dtype,
    stored_as,
    to_storage,
    upcast,
)
from tether.parametrize import register_parametrization

__all__ = ["Constraint", "Draw", "default_atol", "register_constraint"]

M = TypeVar("M", bound=nn.Module)


def default_atol(dtype: torch.dtype) -> float:
    """Membership tolerance for a dtype: the square root of its machine epsilon.

    About half the significant digits: 3.5e-4 in float32, 1.5e-8 in float64. Rounding in a
    map's forward pass stays far below it, a point off the set by a real amount does not.
    """
    return math.sqrt(torch.finfo(dtype).eps)


class Draw(NamedTuple):
    """Where a sample is drawn: what :meth:`Constraint._draw` receives besides the shape.

    ``dtype`` is the dtype computed in (``float32`` for a ``bfloat16`` sample: Note
    [Low-precision tensors]); ``kwargs`` passes all three to ``torch.randn`` and its kin.
    """

    dtype: torch.dtype
    device: torch.device | str | None
    generator: torch.Generator | None

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "device": self.device, "generator": self.generator}


def gaussian_matrix(shape: torch.Size, draw: Draw) -> Tensor:
    """Matrices of shape ``(*, n, k)`` with i.i.d. ``N(0, 1/k)`` entries.

    The scaling keeps the singular values of order 1 whatever the size (for square matrices,
    the Ginibre ensemble, whose eigenvalues fill the unit disk): a neutral starting point for
    samples that are then moved onto a set.
    """
    G = torch.randn(shape, **draw.kwargs)
    return G / math.sqrt(shape[-1])


def worst(distances: Tensor) -> Tensor:
    """The largest of per-matrix (or per-slice) distances, ``0`` for an empty batch.

    What :meth:`Constraint.distance` reports for a batch: the worst member decides membership.
    """
    return distances.amax() if distances.numel() else distances.new_zeros(())


class Constraint(nn.Module, abc.ABC):
    """Base class of tether's constraints: a parametrization onto a set of tensors.

    A constraint maps any tensor (``forward``) onto its set, and back (``right_inverse``), so
    that ``module.weight = X`` sets a member ``X`` exactly. On top of the parametrization
    protocol it offers :meth:`sample` (draw a member), :meth:`distance` (how far a tensor is
    from the set) and :meth:`in_manifold` (membership within a tolerance).

    Subclasses implement ``forward``, ``right_inverse``, ``_draw`` (what :meth:`sample`
    calls) and ``distance``, and override :meth:`check_shape` when the math rules out some
    shapes. Set
    ``supports_complex = False`` (on the class or the instance) for a set of real tensors
    only: complex tensors are then refused with a ``ValueError``, as integer and boolean ones
    always are with a ``TypeError`` (:meth:`check_dtype`).

    These methods run in the compute dtype (Note [Low-precision tensors] in
    ``tether.functional._precision``): a ``float16`` or ``bfloat16`` tensor is computed on in
    ``float32`` (``complex32`` in ``complex64``) and the results are rounded back to its dtype,
    gradients included, as autocast does for linear algebra; autocast itself is disabled
    inside them. Subclasses get this without writing anything: ``forward``, ``right_inverse``
    and ``distance`` are wrapped where defined, and :meth:`sample` calls ``_draw`` in the
    compute dtype. (A subclass written for the older protocol, defining ``sample(shape, *,
    dtype, device, generator)`` itself and no ``_draw``, has its ``sample`` wrapped instead.)
    State that ``right_inverse`` leaves in buffers is stored in the tensor's dtype, like
    ``module.to()`` would; ``forward`` casts such a buffer to the dtype of its
    input before use.

    Every constraint takes an optional keyword-only ``size``, the shape of the tensor it
    will constrain (geotorch's classes take it first: ``Stiefel(size=(7, 3))``). The size is
    checked when the constraint is built (the ``ValueError`` registration would raise), and
    :meth:`sample` draws that shape before registration; registering on a tensor of another
    shape then raises a ``ValueError`` naming both. Subclasses with their own ``__init__``
    take ``size`` and pass it on; the check runs once the outermost ``__init__`` returns.

    Args:
        size: the shape of the tensor the constraint will constrain, e.g. ``(7, 3)``.

    Example:
        >>> from tether.constraints import Orthogonal
        >>> Orthogonal(size=(7, 3)).sample().shape
        torch.Size([7, 3])
    """

    supports_complex: bool = True
    # (shape, dtype, device) of the tensor the constraint was registered on: what sample()
    # draws without arguments. Set by register_constraint and right_inverse; kept up to date
    # by module.to() through _apply.
    _target: tuple[torch.Size, torch.dtype, torch.device] | None = None
    # The size= the constraint was built with: what sample() draws before registration, and
    # the only shape it can be registered on.
    _size: torch.Size | None = None

    def __init__(self, *, size: Sequence[int] | None = None) -> None:
        super().__init__()
        if size is not None:
            self._size = torch.Size(size)

    def _check_size(self) -> None:
        """Raise the ``ValueError`` of registration if the ``size=`` built with has no member."""
        if self._size is not None:
            self.check_shape(self._size, f"size={tuple(self._size)}")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            cls.__init__ = _checks_size(init)  # type: ignore[method-assign]
        for name, wrap in _IN_COMPUTE_DTYPE.items():
            method = cls.__dict__.get(name)
            if method is not None:
                setattr(cls, name, wrap(method))
        legacy_sample = cls.__dict__.get("sample")
        if legacy_sample is not None and cls._draw is Constraint._draw:
            # A subclass of the older protocol: see the class docstring.
            cls.sample = _sample_in_compute_dtype(legacy_sample)  # type: ignore[method-assign]

    @abc.abstractmethod
    def forward(self, X: Tensor) -> Tensor:
        """Map an unconstrained tensor onto the set."""

    @abc.abstractmethod
    def right_inverse(self, X: Tensor) -> Tensor:
        """Return ``Y`` with ``forward(Y) == X`` for a member ``X`` (projecting a non-member)."""

    def sample(
        self,
        shape: Sequence[int] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw a member of the set.

        Without ``shape`` on a registered constraint, a member like the tensor it constrains:
        its shape, dtype and device (as geotorch's ``sample()``), ready to assign with
        ``module.weight = constraint.sample()``. Before registration, the ``size=`` the
        constraint was built with. ``dtype`` and ``device`` default to the registered
        tensor's too, or to torch's defaults for a constraint never registered.

        Args:
            shape: the shape of the sample, e.g. ``(*, n, k)`` for matrices.
            dtype: its dtype; ``float16`` and ``bfloat16`` are drawn in ``float32`` and
                rounded (Note [Low-precision tensors]).
            device: its device.
            generator: the random number generator to draw with.

        Raises:
            TypeError: no ``shape`` on a constraint built without ``size=`` and never
                registered.
            ValueError: the set has no member of this shape or dtype.

        Example:
            >>> import torch, tether
            >>> layer = tether.orthogonal(torch.nn.Linear(4, 4).double())
            >>> Q = layer.parametrizations.weight[0].sample()
            >>> Q.shape, Q.dtype
            (torch.Size([4, 4]), torch.float64)
            >>> layer.weight = Q
        """
        return self._sample(shape, dtype, device, generator)

    def _sample(
        self,
        shape: Sequence[int] | None,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
        generator: torch.Generator | None,
        **options: Any,
    ) -> Tensor:
        """:meth:`sample`, with ``options`` passed on to ``_draw`` (``distribution=``...)."""
        if self._target is not None:
            target_shape, target_dtype, target_device = self._target
            shape = target_shape if shape is None else shape
            dtype = target_dtype if dtype is None else dtype
            device = target_device if device is None else device
        if shape is None:
            shape = self._size
        if shape is None:
            raise TypeError(
                f"{type(self).__name__}.sample() needs a shape: this constraint was built "
                "without size= and never registered on a tensor, so there is no shape to "
                "draw for. Pass one, e.g. sample((4, 4)), build it with size=(4, 4), or "
                "register the constraint first."
            )
        stored = torch.get_default_dtype() if dtype is None else dtype
        self.check_dtype(stored)
        device_type = torch.device(device or torch.get_default_device()).type
        if autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self._sample(shape, stored, device, generator, **options)
        computed = compute_dtype(stored)
        draw = Draw(computed, device, generator)
        if computed == stored:
            return self._draw(torch.Size(shape), draw, **options)
        with stored_as(stored):
            X = self._draw(torch.Size(shape), draw, **options)
        return typing.cast(Tensor, to_storage(X, stored))

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        """A member of the set of shape ``shape``, drawn in ``draw.dtype`` (compute dtype)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define _draw(shape, draw): it cannot sample."
        )

    def _record_target(self, X: Tensor, label: str = "the assigned value") -> None:
        """Remember ``X``'s shape, dtype and device: what :meth:`sample` draws by default.

        Raises a ``ValueError`` naming ``label`` if the constraint was built with a
        ``size=`` other than ``X``'s shape.
        """
        if self._size is not None and X.shape != self._size:
            name = type(self).__name__
            raise ValueError(
                f"{name} was built with size={tuple(self._size)}, but {label} has shape "
                f"{tuple(X.shape)}. Build it with size={tuple(X.shape)} (or without size=) "
                "to constrain this tensor."
            )
        self._target = (X.shape, X.dtype, X.device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Constraint:
        # module.to(), .double(), .cuda()... move the recorded dtype and device along.
        result = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # unannotated in torch
        if self._target is not None:
            shape, dtype, device = self._target
            moved = fn(torch.empty(0, dtype=dtype, device=device))
            self._target = (shape, moved.dtype, moved.device)
        return result

    @abc.abstractmethod
    def distance(self, X: Tensor) -> Tensor:
        """How far ``X`` is from the set: a non-negative scalar (the worst over a batch)."""

    def check_shape(self, shape: torch.Size, label: str) -> None:
        """Raise a ``ValueError`` naming ``label`` if the set has no member of this shape."""

    def check_dtype(self, dtype: torch.dtype, label: str | None = None) -> None:
        """Raise an error naming ``label`` (if given) if the set has no tensor of ``dtype``.

        A ``TypeError`` for integer and boolean dtypes, always; a ``ValueError`` for complex
        ones unless ``supports_complex``. Registration checks it first; ``right_inverse``,
        ``distance``, ``sample`` and :meth:`in_manifold` check it too, so that a constraint
        registered as a class gets the same error.
        """
        if not (dtype.is_floating_point or (dtype.is_complex and self.supports_complex)):
            raise bad_dtype(type(self).__name__, dtype, label)

    def in_manifold(self, X: Tensor, atol: float | None = None) -> bool:
        """Whether ``X`` is in the set, up to ``atol`` (default: :func:`default_atol`).

        The default tolerance is that of ``X``'s own dtype, even where the distance is
        computed in a higher precision: a ``bfloat16`` member is only that close to the set.
        """
        self.check_dtype(X.dtype)
        try:
            self.check_shape(X.shape, "X")
        except ValueError:
            return False
        tolerance = default_atol(X.dtype) if atol is None else atol
        return bool(self.distance(X) <= tolerance)


def _store_state(constraint: nn.Module, computed: torch.dtype, stored: torch.dtype) -> None:
    """Round the buffers a computation in ``computed`` left on ``constraint`` to ``stored``."""
    for name, buffer in constraint._buffers.items():
        if buffer is not None and buffer.dtype in (computed, real_dtype(computed)):
            constraint._buffers[name] = buffer.to(storage_dtype(buffer.dtype, stored))


Method = Callable[..., Any]


def _checks_size(init: Method) -> Method:
    """``init``, then :meth:`Constraint._check_size` if it was the outermost ``__init__``.

    A subclass's ``__init__`` calls its parent's first and sets what ``check_shape`` needs
    (a rank, a dim) after: the size can only be checked once the last one returns.
    """

    @functools.wraps(init)
    def wrapper(self: Constraint, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self).__init__ is wrapper:
            self._check_size()

    return wrapper


Constraint.__init__ = _checks_size(Constraint.__init__)  # type: ignore[method-assign]


def _forward_in_compute_dtype(forward: Method) -> Method:
    @functools.wraps(forward)
    def wrapper(self: Constraint, *tensors: Tensor) -> Any:
        X = tensors[0]
        if autocast_enabled(X):
            with torch.autocast(X.device.type, enabled=False):
                return wrapper(self, *tensors)
        stored = X.dtype
        computed = compute_dtype(stored)
        if computed == stored:  # float32 and float64: no cast at all on the hot path
            return forward(self, *tensors)
        return to_storage(forward(self, *map(upcast, tensors)), stored)

    return wrapper


def _tensor_in_compute_dtype(method: Method, *, keeps_state: bool) -> Method:
    """``right_inverse`` or ``distance``, which take one tensor ``X``, in its compute dtype."""

    @functools.wraps(method)
    def wrapper(self: Constraint, X: Tensor, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(X, Tensor):  # let the method say what it thinks of it
            return method(self, X, *args, **kwargs)
        self.check_dtype(X.dtype)
        if keeps_state:
            self._record_target(X)
        if autocast_enabled(X):
            with torch.autocast(X.device.type, enabled=False):
                return wrapper(self, X, *args, **kwargs)
        stored = X.dtype
        computed = compute_dtype(stored)
        if computed == stored:
            return method(self, X, *args, **kwargs)
        with stored_as(stored):
            result = method(self, X.to(computed), *args, **kwargs)
        if keeps_state:
            _store_state(self, computed, stored)
        return to_storage(result, stored)

    return wrapper


def _sample_in_compute_dtype(sample: Method) -> Method:
    """A ``sample(shape, *, dtype, ...)`` of the older protocol, run in the compute dtype."""

    @functools.wraps(sample)
    def wrapper(
        self: Constraint,
        shape: Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Any:
        stored = torch.get_default_dtype() if dtype is None else dtype
        self.check_dtype(stored)
        device_type = torch.device(device or torch.get_default_device()).type
        if autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return wrapper(self, shape, dtype=dtype, device=device, generator=generator)
        computed = compute_dtype(stored)
        if computed == stored:
            return sample(self, shape, dtype=dtype, device=device, generator=generator)
        with stored_as(stored):
            X = sample(self, shape, dtype=computed, device=device, generator=generator)
        return to_storage(X, stored)

    return wrapper


_IN_COMPUTE_DTYPE: dict[str, Callable[[Method], Method]] = {
    "forward": _forward_in_compute_dtype,
    "right_inverse": functools.partial(_tensor_in_compute_dtype, keeps_state=True),
    "distance": functools.partial(_tensor_in_compute_dtype, keeps_state=False),
}


def register_constraint(module: M, name: str, constraint: Constraint) -> M:
    """Check that ``module.<name>`` has a dtype and shape the constraint takes, then register it.

    Args:
        module: the module holding the tensor.
        name: the tensor to constrain (a parameter or buffer of ``module``).
        constraint: the constraint to register (first in the chain if it is the first).
    """
    tensor = getattr(module, name, None)
    if isinstance(tensor, Tensor):
        constraint.check_dtype(tensor.dtype, tensor_label(module, name))
        constraint.check_shape(tensor.shape, tensor_label(module, name))
        constraint._record_target(tensor, tensor_label(module, name))
    return register_parametrization(module, name, constraint)
