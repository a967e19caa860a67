"""``ParametrizationList``: the chain of parametrizations on one tensor and its originals."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tether import _cache, _distributed
from tether._checks import (
    call_labelled,
    expect_arity,
    expect_finite,
    expect_same_dtype,
    expect_same_shape,
    expect_tensor,
    expect_tensors,
)
from tether._torch_compat import is_traceable_wrapper_subclass

__all__ = ["ParametrizationList", "SavedState", "not_scriptable", "plists_of", "save_state"]

_Parameter = nn.Parameter


def _set_in_place(dest: Tensor, src: Tensor, *, copy: bool = False) -> None:
    """Give ``dest`` the data of ``src`` while keeping the ``dest`` object (optimizers hold it).

    With ``copy``, ``src`` is copied into ``dest``'s memory when it fits, as for an assignment
    to a tensor of fixed shape (Note [Assignment and reading threads]); otherwise ``dest`` is
    pointed at ``src``'s memory, as torch's parametrize does.
    """
    if _distributed.is_sharded(dest):  # Note [Sharded originals]
        _distributed.set_shard(dest, src)
    elif torch.__future__.get_swap_module_params_on_conversion() or is_traceable_wrapper_subclass(
        dest
    ):
        if isinstance(dest, nn.Parameter) and not isinstance(src, nn.Parameter):
            src = nn.Parameter(src, requires_grad=dest.requires_grad)
        torch.utils.swap_tensors(dest, src)  # type: ignore[no-untyped-call]  # untyped in torch
    elif copy and _can_copy(dest, src):
        dest.copy_(src)
    else:
        dest.set_(src)  # type: ignore[call-overload]  # torch's stubs miss set_(Tensor)


def _can_copy(dest: Tensor, src: Tensor) -> bool:
    """Whether ``src`` fits ``dest``'s memory and does not overlap it."""
    return (
        dest.shape == src.shape
        and dest.dtype == src.dtype
        and dest.device == src.device
        and not dest.is_meta
        and dest.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
    )


def not_scriptable(module: nn.Module, label: str) -> RuntimeError:
    """The error ``torch.jit.script`` raises on a module that holds tether parametrizations.

    Note [TorchScript]
        TorchScript compiles a module's properties as well as its ``forward``, and
        PyTorch's parametrized tensor is a property that raises "Parametrization is not
        working with scripting" when the scripted module runs: no parametrization runs in
        TorchScript. tether refuses at ``torch.jit.script`` time instead (through
        ``__prepare_scriptable__``, which TorchScript calls on every submodule before compiling
        anything), naming what works: ``torch.export``, ``torch.compile``, ``torch.jit.trace``,
        or scripting after ``remove_parametrizations`` has baked the values in.
    """
    return RuntimeError(
        f"torch.jit.script cannot compile {type(module).__name__}: {label} is parametrized, and "
        "TorchScript cannot run parametrizations (PyTorch's own parametrized modules script "
        "but raise 'Parametrization is not working with scripting' when called). Use "
        "torch.export.export(model, args) or torch.compile(model), which run them, or "
        "torch.jit.trace(model, args); or bake the current values in with "
        "tether.remove_parametrizations(module, name) on each parametrized tensor (or script "
        "a copy after loading tether.plain_state_dict(model) into an unparametrized model)."
    )


def _register(module: nn.Module, name: str, tensor: Tensor) -> None:
    """Register ``tensor`` as a parameter if it is one, else as a buffer."""
    if isinstance(tensor, nn.Parameter):
        module.register_parameter(name, tensor)
    else:
        module.register_buffer(name, tensor)


class ParametrizationList(nn.ModuleList):
    """The parametrizations of one tensor, in order, and the original tensor(s) they act on.

    ``module.parametrizations[tensor_name]`` is a ``ParametrizationList`` once ``tensor_name``
    is parametrized. It holds the unconstrained tensor as ``original`` or, when the first
    parametrization's ``right_inverse`` returns several tensors, as ``original0``,
    ``original1``, ... Calling it evaluates the chain; :meth:`right_inverse` runs the chain
    backwards and stores the result in the originals.

    It is built by :func:`tether.register_parametrization`; users do not instantiate it.

    Args:
        modules: the parametrizations, first applied first.
        original: the parameter or buffer being parametrized. With one original it keeps its
            identity (its data is replaced in place), so an optimizer holding it still trains it.
        unsafe: allow the chain to change the shape or dtype of the tensor.
        label: how error messages name the tensor, e.g. ``"Linear.weight"``.
    """

    original: Tensor
    unsafe: bool
    is_tensor: bool
    ntensors: int

    def __init__(
        self,
        modules: Sequence[nn.Module],
        original: Tensor,
        unsafe: bool = False,
        *,
        label: str | None = None,
    ) -> None:
        if len(modules) == 0:
            raise ValueError("ParametrizationList requires one or more modules.")
        super().__init__(modules)
        self.unsafe = unsafe
        self.label = label or "the parametrized tensor"
        self._shape: torch.Size | None = original.shape

        # Nothing is written until every check has passed, so a failed registration leaves the
        # original tensor untouched.
        with torch.no_grad():
            new: object = original
            context = f"Cannot parametrize {self.label}"
            for module in reversed(self):
                inverse = getattr(module, "right_inverse", None)
                if inverse is not None:
                    if new is original:
                        fix = (
                            "Give it finite values first, e.g. with the layer's reset_parameters()."
                        )
                        expect_finite(original, context, fix)
                    # NotImplementedError means "no right inverse": keep the value as it is.
                    with contextlib.suppress(NotImplementedError):
                        new = call_labelled(inverse, new, context, self.label)
        originals = expect_tensors(new, f"right_inverse of the parametrizations on {self.label}")
        self.is_tensor = isinstance(originals, Tensor)
        originals = (originals,) if isinstance(originals, Tensor) else originals
        self.ntensors = len(originals)
        expect_arity(self[0], self.ntensors, self.label)
        if self.is_tensor:
            fix = "A right_inverse that returns one tensor must keep the original's dtype."
            expect_same_dtype(
                original.dtype,
                originals[0].dtype,
                f"right_inverse changed the dtype of {self.label}.",
                fix,
            )
            if originals[0].device != original.device:
                raise ValueError(
                    f"right_inverse moved {self.label} to another device.\n"
                    f"  expected device: {original.device}\n  got device:      "
                    f"{originals[0].device}\nReturn a tensor on the original's device."
                )
        if not unsafe:
            with torch.no_grad():
                value = call_labelled(self._evaluate, originals, context, self.label)
            self._check_value(value, original)

        if self.is_tensor:
            with torch.no_grad():
                _set_in_place(original, originals[0])
            _register(self, "original", original)
        else:
            for i, tensor in enumerate(originals):
                if isinstance(original, nn.Parameter):
                    tensor = nn.Parameter(tensor, original.requires_grad)
                tensor.requires_grad_(original.requires_grad)
                _register(self, f"original{i}", tensor)

    def _check_value(self, value: object, original: Tensor) -> None:
        fix = "Keep shape and dtype in forward, or register with unsafe=True."
        if not isinstance(value, Tensor):
            raise ValueError(
                f"The parametrization on {self.label} must return a tensor; "
                f"got {type(value).__name__}."
            )
        expect_same_dtype(
            original.dtype,
            value.dtype,
            f"Registering a parametrization may not change the dtype of {self.label}.",
            fix,
        )
        expect_same_shape(
            original.shape,
            value.shape,
            f"Registering a parametrization may not change the shape of {self.label}.",
            fix,
        )

    def _parametrized_shape(self) -> torch.Size:
        """The shape of the parametrized tensor, recomputed after an original was replaced."""
        if self._shape is None:
            with torch.no_grad():
                self._shape = self().shape
        return self._shape

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("original"):  # transfer, load_state_dict(assign=True), pruning
            self.__dict__["_shape"] = None
        super().__setattr__(name, value)

    def originals(self) -> tuple[Tensor, ...]:
        """The unconstrained tensors, in the order the first parametrization takes them."""
        if self.is_tensor:
            return (self.original,)
        return tuple(getattr(self, f"original{i}") for i in range(self.ntensors))

    def _evaluate(self, originals: tuple[Tensor, ...]) -> Any:
        modules = iter(self._modules.values())
        value = next(modules)(*originals)
        for module in modules:
            value = module(value)
        return value

    def forward(self) -> Tensor:
        """Evaluate the chain on the originals.

        This is the hot path of every read of a parametrized tensor, so it calls each
        parametrization's ``forward`` directly rather than through ``nn.Module.__call__``:
        forward hooks registered on parametrization modules do not run here.
        """
        modules = iter(self._modules.values())
        if self.is_tensor:
            original: Tensor | None = self._parameters.get("original")
            if original is None:
                original = self._buffers["original"]
            elif type(original) is not _Parameter:  # FSDP2 shard? Note [Sharded originals]
                original = _distributed.full(original)
            value = next(modules).forward(original)
        else:
            originals = self.originals()
            if type(originals[0]) is not _Parameter:
                originals = _distributed.full_originals(originals)
            value = next(modules).forward(*originals)
        for module in modules:
            value = module.forward(value)
        return value

    def right_inverse(self, value: Tensor) -> None:
        """Set the originals so that the chain evaluates to ``value``.

        Runs each parametrization's ``right_inverse`` from last to first and writes the result
        into the original tensor(s) in place, keeping their identity. This is what assigning
        ``module.weight = value`` does.

        Raises:
            TypeError: ``value`` is not a tensor.
            ValueError: ``value`` has the wrong shape or holds NaN or infinite entries, or a
                ``right_inverse`` returned the wrong number, shape or dtype of tensors.
            RuntimeError: a parametrization in the chain has no ``right_inverse``.
        """
        self._store(self._inverse(value))

    def _inverse(self, value: object) -> tuple[Tensor, ...]:
        """The originals :meth:`right_inverse` stores for ``value``, computed and checked.

        Nothing is written but what a ``right_inverse`` writes into its own parametrization
        (a norm, a base point), and that is put back if a later step fails.
        """
        value = expect_tensor(
            value, f"The value assigned to {self.label}", "Assign a torch.Tensor."
        )
        if not self.unsafe:
            expected = self._parametrized_shape()
            expect_same_shape(
                expected,
                value.shape,
                f"Cannot assign to {self.label}: the value has the wrong shape.",
                f"Assign a tensor of shape {tuple(expected)}.",
            )
        # Check the whole chain first: a right_inverse may update its parametrization's state,
        # which must not happen when a later step is bound to fail.
        inverses = [getattr(module, "right_inverse", None) for module in reversed(self)]
        for module, inverse in zip(reversed(self), inverses, strict=True):
            if inverse is None:
                raise RuntimeError(
                    f"Cannot assign to {self.label}: parametrization "
                    f"{type(module).__name__} does not implement right_inverse. Give it a "
                    "method right_inverse(X) returning Y with forward(Y) == X."
                )
        context = f"Cannot assign to {self.label}"
        expect_finite(value, context, "Assign finite values.")
        saved = self._save_state()
        try:
            return self._run_inverses(inverses, value, context)
        except BaseException:
            _restore(saved)
            raise

    def _run_inverses(self, inverses: list[Any], value: Tensor, context: str) -> tuple[Tensor, ...]:
        with torch.no_grad():
            new: object = value
            for i, inverse in enumerate(inverses):
                if i > 0:  # only the first parametrization's right_inverse may return several
                    what = f"right_inverse of {type(self[len(self) - i]).__name__} on {self.label}"
                    new = expect_tensor(new, what, "Return a tensor.")
                new = call_labelled(inverse, new, context, self.label)
            results = expect_tensors(new, f"right_inverse of the parametrizations on {self.label}")
            results = (results,) if isinstance(results, Tensor) else results
            if len(results) != self.ntensors:
                raise ValueError(
                    f"right_inverse on {self.label} must return {self.ntensors} tensor(s), as it "
                    f"did at registration; got {len(results)}."
                )
            destinations = self.originals()
            for i, (dest, src) in enumerate(zip(destinations, results, strict=True)):
                name = "original" if self.is_tensor else f"original{i}"
                what = f"right_inverse returned a wrong tensor for {self.label} ({name})."
                fix = "right_inverse must return tensors like those it returned at registration."
                expect_same_dtype(dest.dtype, src.dtype, what, fix)
                if not self.unsafe:
                    expect_same_shape(dest.shape, src.shape, what, fix)
        return results

    def _store(self, results: tuple[Tensor, ...]) -> None:
        """Write what :meth:`_inverse` computed into the originals, keeping their identity.

        Note [Assignment and reading threads]
            torch's parametrize points the original at the new value's memory with ``set_``,
            which frees the old memory at once, while a forward pass in another thread may
            still be reading it (it then reads garbage, or crashes). When the shape is fixed
            (no ``unsafe``), tether copies the new value into the original's memory instead:
            a concurrent read sees old or new entries, never freed memory, and the original
            keeps its address. The one visible difference: a view of the original taken
            before the assignment (``state_dict()`` without cloning) shows the new value,
            as it already does after an optimizer step.
        """
        with torch.no_grad():
            for dest, src in zip(self.originals(), results, strict=True):
                _set_in_place(dest, src, copy=not self.unsafe)
        _cache.invalidate(self)

    def _save_state(self) -> SavedState:
        """The parametrizations' own parameters and buffers, for :func:`_restore`."""
        return save_state(self)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        _cache.invalidate(self)

    def __prepare_scriptable__(self) -> nn.Module:
        """Refuse ``torch.jit.script`` with the alternatives (Note [TorchScript])."""
        raise not_scriptable(self, self.label)


#: Each parameter and buffer of some modules: the dictionary holding it, its name, the
#: tensor and a copy of its values.
SavedState = list[tuple[dict[str, Any], str, Tensor, Tensor]]


def save_state(module: nn.Module) -> SavedState:
    """The parameters and buffers of ``module`` and its submodules, for :func:`_restore`.

    A ``right_inverse`` may write into its parametrization's tensors in place (a norm) or
    rebind them (a base point of another dtype): both are undone.
    """
    with torch.no_grad():
        return [
            (tensors, name, tensor, tensor.clone())
            for m in module.modules()
            for tensors in (m._parameters, m._buffers)
            for name, tensor in tensors.items()
            if tensor is not None
        ]


def _restore(saved: SavedState) -> None:
    """Put back the tensors and values :func:`save_state` recorded."""
    with torch.no_grad():
        for tensors, name, tensor, copy in saved:
            tensors[name] = tensor
            if tensor.shape == copy.shape and tensor.dtype == copy.dtype:
                tensor.copy_(copy)


def plists_of(module: nn.Module) -> dict[str, ParametrizationList]:
    """The ``ParametrizationList`` of each parametrized tensor of ``module``, by name."""
    container = module.__dict__["_modules"].get("parametrizations")
    if not isinstance(container, nn.ModuleDict):
        return {}
    plists: dict[str, ParametrizationList] = container.__dict__["_modules"]
    return plists
