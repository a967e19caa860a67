"""Spectral normalization: weights whose largest singular value is one, or at most a bound."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tether._checks import (
    bad_dtype,
    bad_shape,
    bad_type,
    bad_value,
    check_dim,
    describe,
    tensor_label,
    tensor_to_constrain,
)
from tether.constraints._base import Constraint, Draw, register_constraint
from tether.constraints._conv_operator import (
    CONV_LAYERS,
    CONV_TRANSPOSE_LAYERS,
    ConvLayer,
    ConvOperator,
    conv_operator,
)
from tether.constraints._legacy_checkpoints import add_load_hook, load_spectral_norm
from tether.constraints._weight_operator import MatrixOperator, WeightOperator
from tether.functional._precision import upcast

__all__ = ["SpectralNorm", "spectral_norm"]

M = TypeVar("M", bound=nn.Module)

# torch runs this many steps of the power method at registration, so that u and v start near
# the top singular vectors; we do the same, which keeps the buffers equal to torch's.
_WARMUP_ITERATIONS = 15

# Note [Power-iteration state after a load or an assignment]
#     In eval mode the vectors u, v are frozen and sigma is estimated as uᴴ W v. Vectors that
#     belong to another weight make that estimate far too small (a fresh model's random
#     vectors against a loaded weight gave sigma ≈ 0.07, hence a weight of norm 14.6), and in
#     training mode one power step per evaluation takes many evaluations to catch up. torch
#     never refits them (its right_inverse leaves them alone). Here every way a weight is set
#     leaves vectors that belong to it:
#
#     - ``right_inverse`` (``module.weight = X``, a plain checkpoint) fits them to X: the top
#       singular vectors of its operator (``WeightOperator.top_singular_vectors``: from an SVD
#       of the reshaped weight or of the dense convolution operator when that is small, else
#       from the power method run until the estimate stops growing). The one exception is
#       the call registration makes, on the very weight the constructor warmed the vectors up
#       on: they are kept, so that buffers and results stay torch's.
#     - a checkpoint with the vectors (tether's or torch's layout, the hook-based format)
#       loads them as they are: the model then computes exactly what the saved one did;
#     - a checkpoint with the original but without the vectors (saved with ``exact=True``, or
#       cut down and loaded with ``strict=False``) gets vectors fitted to that original:
#       ``tether._loading`` asks ``state_for`` for them, and they load as if saved. So does a
#       hook-based checkpoint loaded into a convolution operator, whose vectors do not carry
#       over (``SpectralNorm.state_from_hook_based``).
#
#     A fitted pair keeps the sign (the phase) of the vectors it replaces, so refitting
#     vectors that were already right changes nothing.


def _divide(X: Tensor, sigma: Tensor) -> Tensor:
    return X / sigma


def _clip(X: Tensor, sigma: Tensor, bound: float) -> Tensor:
    # X / max(1, sigma / bound): a tensor already inside the bound is left exactly as it is.
    return X / torch.clamp(sigma.abs() / bound, min=1.0)


def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Settings(NamedTuple):
    """The arguments of :class:`SpectralNorm`, checked, and the operator they define."""

    n_power_iterations: int
    dim: int  # in range(weight.ndim)
    eps: float
    bound: float | None
    exact: bool
    operator: WeightOperator | None  # None for a vector, whose 2-norm is exact


def _checked(
    function: str,
    label: str,
    weight: Tensor,
    n_power_iterations: int,
    eps: float,
    dim: int,
    bound: float | None,
    exact: bool,
    conv: ConvLayer | None,
    input_shape: Sequence[int] | None,
) -> _Settings:
    """The settings, or a ValueError, TypeError or IndexError naming the first bad argument.

    ``function`` and ``label`` start the messages: ``"SpectralNorm"`` and ``"the weight"`` for
    the class, ``"spectral_norm()"`` and ``"Linear.weight"`` for the registering function.
    """
    who = f"{function} on {label}"
    if not (weight.is_floating_point() or weight.is_complex()):
        raise bad_dtype("SpectralNorm", weight.dtype, None if label == "the weight" else label)
    if not isinstance(n_power_iterations, int) or isinstance(n_power_iterations, bool):
        raise bad_type(who, "n_power_iterations", "an int", n_power_iterations)
    if n_power_iterations <= 0:  # torch's wording
        raise ValueError(
            f"{who}: expected `n_power_iterations` to be positive, but got "
            f"n_power_iterations={n_power_iterations}."
        )
    # One ValueError for eps and bound, of the wrong type or out of range alike.
    if not _is_real_number(eps) or not 0 < eps < math.inf:
        raise bad_value(who, "eps", "a positive float", eps)
    if bound is not None and (not _is_real_number(bound) or not 0 < bound < math.inf):
        needs = "None or a positive float (the largest singular value allowed)"
        raise bad_value(who, "bound", needs, bound)
    if not isinstance(exact, bool):
        raise bad_type(who, "exact", "a bool", exact)
    if weight.ndim == 0:
        raise bad_shape(function, label, weight.shape, "at least one dimension")
    check_dim(dim, weight, who)
    operator: WeightOperator | None
    if conv is not None:
        operator = conv_operator(function, label, weight, conv, input_shape)
    elif input_shape is not None:
        raise ValueError(
            f"{who}: `input_shape` is only used with the convolution operator "
            "(conv_operator=True); drop it or pass conv_operator=True."
        )
    else:
        operator = None if weight.ndim == 1 else MatrixOperator(weight.shape, dim)
    bound = None if bound is None else float(bound)
    return _Settings(n_power_iterations, dim % weight.ndim, eps, bound, exact, operator)


class SpectralNorm(Constraint):
    """Spectral normalization: tensors whose largest singular value is 1, or at most ``bound``.

    The set is ``{W : sigma(W) = 1}``, or ``{W : sigma(W) ≤ bound}`` with ``bound``, where
    ``sigma`` is the largest singular value of ``W`` reshaped to a matrix (dimension ``dim``
    first, the others flattened; the 2-norm for a vector). ``forward`` returns
    ``W / sigma(W)``, or ``W / max(1, sigma(W) / bound)``, which leaves weights inside the bound
    untouched: use ``bound`` to cap a layer's Lipschitz constant without forcing it up to the
    cap. ``sigma`` is computed in one of three ways, chosen at construction:

    - by the power method (default), as :func:`torch.nn.utils.parametrizations.spectral_norm`
      does, with the same numerics: the buffers ``_u``, ``_v`` hold estimates of the top
      singular vectors, refined by ``n_power_iterations`` steps at each evaluation in training
      mode and frozen in eval mode. Cheap, but an estimate: it lags behind the weight after
      large changes, and it never exceeds the true ``sigma``, so the result can end slightly
      above 1 (or above ``bound``);
    - exactly (``exact=True``) with a singular value decomposition, for small layers: the
      bound holds to rounding, and no buffers are kept;
    - for a convolution (``conv`` and ``input_shape``), as the norm of the convolution
      operator itself on inputs of that shape, by the power method through the convolution and
      its transpose (or exactly, from its dense matrix, with ``exact=True``). This is the
      layer's Lipschitz constant, which the norm of the reshaped kernel does not give.

    ``right_inverse`` returns the tensor unchanged, as torch's does, and fits ``u`` and ``v``
    to it (torch leaves them alone, so that its estimate lags after an assignment or a plain
    checkpoint, badly so in eval mode): after ``module.weight = X``, loading a plain
    checkpoint, or loading one without the vectors, they are the top singular vectors of
    the new weight. A checkpoint with the vectors loads them as saved, so that the model
    computes exactly what the saved one did.

    Args:
        weight: the tensor to be normalized; it sizes the buffers and starts the power method.
        n_power_iterations: power-method steps per evaluation in training mode.
        dim: the dimension of the outputs, moved first when reshaping to a matrix (torch uses
            1 for transposed convolutions); unused with ``conv``.
        eps: floor of the norms in the power method.
        bound: the largest singular value allowed; ``None`` normalizes to exactly 1.
        exact: compute ``sigma`` with a singular value decomposition.
        conv: a convolution layer whose operator norm is used (``weight`` is its kernel).
        input_shape: with ``conv``, the shape ``(C, *spatial)`` of one input to the layer.

    Raises:
        ValueError: a bad ``n_power_iterations``, ``eps``, ``bound``, ``conv`` or
            ``input_shape``, or a 0-dimensional ``weight``.
        IndexError: ``dim`` is out of range.
        TypeError: an argument has the wrong type.

    References:
        Spectral Normalization for Generative Adversarial Networks. Takeru Miyato, Toshiki
        Kataoka, Masanori Koyama, Yuichi Yoshida, 2018. https://arxiv.org/abs/1802.05957

        Regularisation of Neural Networks by Enforcing Lipschitz Continuity. Henry Gouk, Eibe
        Frank, Bernhard Pfahringer, Michael J. Cree, 2018. https://arxiv.org/abs/1804.04368

        The Singular Values of Convolutional Layers. Hanie Sedghi, Vineet Gupta, Philip M.
        Long, 2019. https://arxiv.org/abs/1805.10408

    Example:
        >>> import torch, tether
        >>> layer = torch.nn.Linear(6, 4)
        >>> norm = tether.constraints.SpectralNorm(layer.weight, exact=True)
        >>> layer = tether.register_parametrization(layer, "weight", norm)
        >>> sigma = torch.linalg.matrix_norm(layer.weight, ord=2)
        >>> torch.allclose(sigma, torch.tensor(1.0))
        True
    """

    _u: Tensor
    _v: Tensor

    def __init__(
        self,
        weight: Tensor,
        n_power_iterations: int = 1,
        dim: int = 0,
        eps: float = 1e-12,
        *,
        bound: float | None = None,
        exact: bool = False,
        conv: ConvLayer | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        settings = _checked(
            "SpectralNorm",
            "the weight",
            weight,
            n_power_iterations,
            eps,
            dim,
            bound,
            exact,
            conv,
            input_shape,
        )
        self._build(weight, settings)

    @classmethod
    def _from_settings(cls, weight: Tensor, settings: _Settings) -> SpectralNorm:
        """Build from arguments already checked (by :func:`spectral_norm`, with its wording)."""
        norm = cls.__new__(cls)
        Constraint.__init__(norm)
        norm._build(weight, settings)
        return norm

    def _build(self, weight: Tensor, settings: _Settings) -> None:
        self.n_power_iterations = settings.n_power_iterations
        self.dim = settings.dim
        self.eps = settings.eps
        self.bound = settings.bound
        self.exact = settings.exact
        self._shape = weight.shape
        self._scale: Callable[[Tensor, Tensor], Tensor] = (
            _divide if self.bound is None else functools.partial(_clip, bound=self.bound)
        )
        operator = self._operator = settings.operator
        # The vectors are warmed up on ``weight``; registration passes that same weight to
        # right_inverse, which then keeps them (Note [Power-iteration state after a load or
        # an assignment]).
        self._keep_next_fit = True
        # sigma as forward computes it, and exactly (for distance and sample).
        self._sigma: Callable[[Tensor], Tensor]
        self._exact_sigma: Callable[[Tensor], Tensor]
        if operator is None:  # a vector: its 2-norm, exactly, as in torch
            self._exact_sigma = self._sigma = self._vector_norm
        elif self.exact:
            self._exact_sigma = self._sigma = operator.norm
        else:
            self._exact_sigma = operator.norm
            self._sigma = functools.partial(self._estimate, operator)
            with torch.no_grad():
                u, v = self._warm_start(operator, weight)
            self.register_buffer("_u", u)
            self.register_buffer("_v", v)

    def _warm_start(self, operator: WeightOperator, X: Tensor) -> tuple[Tensor, Tensor]:
        """Draw ``u`` and ``v`` as torch does (same generator calls) and run the warm-up."""
        u_shape, v_shape = operator.output_shape, operator.input_shape
        u = F.normalize(X.new_empty(math.prod(u_shape)).normal_(0, 1), dim=0, eps=self.eps)
        v = F.normalize(X.new_empty(math.prod(v_shape)).normal_(0, 1), dim=0, eps=self.eps)
        return operator.power_iteration(
            X, u.view(u_shape), v.view(v_shape), _WARMUP_ITERATIONS, self.eps
        )

    def _power_method(self) -> WeightOperator | None:
        """The operator the vectors belong to; ``None`` when there are none (exact, a vector)."""
        return self._operator if "_u" in self._buffers else None

    @torch.no_grad()
    def _fitted_vectors(self, operator: WeightOperator, X: Tensor) -> tuple[Tensor, Tensor]:
        """The top singular vectors of ``X``'s operator, with the phase of the current ones.

        See Note [Power-iteration state after a load or an assignment]. Returned in the dtype
        ``X`` is computed in (float32 for float16 and bfloat16).
        """
        X = upcast(X)
        # The vectors being replaced: where to start the power method, and the phase to keep.
        if self._u.is_meta:  # loading with assign=True into a model built on the meta device
            u_old = torch.full(self._u.shape, math.nan, dtype=X.dtype, device=X.device)
            v_old = torch.full(self._v.shape, math.nan, dtype=X.dtype, device=X.device)
        else:
            u_old, v_old = (b.to(device=X.device, dtype=X.dtype) for b in (self._u, self._v))
        return operator.top_singular_vectors(X, u_old, v_old, self.eps)

    @torch.no_grad()
    def state_for(self, X: Tensor) -> dict[str, Tensor]:
        """The vectors fitted to ``X``, by buffer name, without changing this module.

        Loading a checkpoint that holds the original but not the vectors calls it with the
        loaded original (see ``tether._loading``); ``right_inverse`` stores the same vectors.

        Example:
            >>> import torch
            >>> W = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
            >>> state = SpectralNorm(W).state_for(W)
            >>> torch.vdot(state["_u"], W @ state["_v"]).abs()
            tensor(3.)
        """
        operator = self._power_method()
        if operator is None:
            return {}
        u, v = self._fitted_vectors(operator, X)
        return {"_u": u.to(self._u.dtype), "_v": v.to(self._v.dtype)}

    def state_from_hook_based(self, original: object, u: object, v: object) -> dict[str, object]:
        """The buffers to load from a checkpoint of torch's hook-based ``spectral_norm``.

        Given its ``weight_orig``, ``weight_u`` and ``weight_v`` (Note [Loading the checkpoints
        of torch's hook-based norms] in ``_legacy_checkpoints``). Its vectors mean what ours
        mean only for a power method on the reshaped matrix, and then load as saved. Exact and
        vector normalizations have none; a convolution operator gets vectors fitted to the
        original instead (Note [Power-iteration state after a load or an assignment]).
        """
        operator = self._power_method()
        if operator is None:
            return {}
        if isinstance(operator, MatrixOperator):
            return {"_u": u, "_v": v}
        if isinstance(original, Tensor) and original.shape == self._shape:
            return dict(self.state_for(original.to(device=self._u.device, dtype=self._u.dtype)))
        return {}

    @torch.no_grad()
    def reset_state(self, X: Tensor) -> None:
        """Redraw ``u`` and ``v`` and warm them up on ``X``, as registration does.

        ``reset_parameters()`` of the parametrized module calls it after assigning the new
        weight, so that a module initialised after ``to_empty`` has valid vectors. The
        buffers are written in place.
        """
        operator = self._power_method()
        if operator is not None:
            self._refresh(*self._warm_start(operator, X))

    def _vector_norm(self, X: Tensor) -> Tensor:
        return X.norm(2, 0, keepdim=True).clamp_min(self.eps)

    def _estimate(self, operator: WeightOperator, X: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                u, v = operator.power_iteration(
                    X, self._u, self._v, self.n_power_iterations, self.eps
                )
                self._refresh(u, v)
        u, v = self._frozen_vectors()
        return operator.estimate(X, u, v)

    def _refresh(self, u: Tensor, v: Tensor) -> None:
        # In place, as torch does: under DataParallel the replicas share these buffers' storage.
        self._u.copy_(u)
        self._v.copy_(v)

    def _frozen_vectors(self) -> tuple[Tensor, Tensor]:
        # Copies, so that a later in-place refresh does not invalidate this graph (GANs
        # backpropagate through two evaluations, e.g. D(real) - D(fake)).
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return u, v

    def forward(self, X: Tensor) -> Tensor:
        return self._scale(X, self._sigma(X))

    @torch.no_grad()
    def right_inverse(self, X: Tensor) -> Tensor:
        """``X`` itself, with the vectors fitted to it (Note [Power-iteration state after a
        load or an assignment])."""
        operator = self._power_method()
        if operator is not None and not X.is_meta:  # on the meta device: shapes only
            keep = self._keep_next_fit and self._is_state_of(operator, X)
            self._keep_next_fit = False
            if not keep:
                self._refresh(*self._fitted_vectors(operator, X))
        return X

    def _is_state_of(self, operator: WeightOperator, X: Tensor) -> bool:
        """Whether ``(u, v)`` is a power-method state of ``X``'s operator."""
        X = upcast(X)
        return operator.is_power_state(X, self._u.to(X.dtype), self._v.to(X.dtype), self.eps)

    def _draw(self, shape: torch.Size, draw: Draw) -> Tensor:
        """A Gaussian tensor rescaled into the set (with the exact ``sigma``)."""
        self.check_shape(torch.Size(shape), "shape")
        G = torch.randn(tuple(shape), **draw.kwargs)
        with torch.no_grad():
            return self._scale(G, self._exact_sigma(G))

    def distance(self, X: Tensor) -> Tensor:
        """``|sigma(X) - 1|``, or ``max(sigma(X) - bound, 0)``, with the exact ``sigma``."""
        with torch.no_grad():
            sigma = self._exact_sigma(X).abs().max()
        if self.bound is None:
            return (sigma - 1).abs()
        return (sigma - self.bound).clamp_min(0)

    def check_shape(self, shape: torch.Size, label: str) -> None:
        if shape != self._shape:
            raise bad_shape(
                "SpectralNorm",
                label,
                shape,
                f"the shape {tuple(self._shape)} it was built for",
                "Build one SpectralNorm per weight.",
            )

    def extra_repr(self) -> str:
        conv = self._operator if isinstance(self._operator, ConvOperator) else None
        options = {
            "n_power_iterations": self.n_power_iterations,
            "dim": self.dim if conv is None else None,
            "eps": self.eps,
            "bound": self.bound,
            "exact": self.exact or None,
            "input_shape": None if conv is None else conv.input_shape,
        }
        return ", ".join(f"{key}={value}" for key, value in options.items() if value is not None)


def spectral_norm(
    module: M,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    *,
    bound: float | None = None,
    exact: bool = False,
    conv_operator: bool = False,
    input_shape: Sequence[int] | None = None,
) -> M:
    """Apply spectral normalization to ``module.<name>`` (see :class:`SpectralNorm`).

    A drop-in for :func:`torch.nn.utils.parametrizations.spectral_norm`: with the default
    keyword arguments, the same signature, results (for the same random seed, in training and
    eval mode), buffers ``_u``, ``_v`` and ``state_dict`` keys
    (``parametrizations.weight.original``, ``parametrizations.weight.0._u``, ``..._v``), so
    checkpoints move both ways. One difference: assigning a weight or loading a plain
    checkpoint fits the vectors to the new weight, where torch keeps stale ones. Checkpoints
    of the hook-based :func:`torch.nn.utils.spectral_norm` (``weight_orig``, ``weight_u``,
    ``weight_v``) load too.

    Args:
        module: the module holding the tensor.
        name: the parameter or buffer to normalize.
        n_power_iterations: power-method steps each time the weight is computed in training
            mode.
        eps: floor of the norms in the power method.
        dim: the dimension of the outputs; default 1 for ``nn.ConvTranspose*d``, else 0.
        bound: cap the largest singular value at ``bound`` instead of setting it to 1.
        exact: compute the largest singular value exactly (small layers).
        conv_operator: for a convolution layer, normalize the convolution operator on inputs
            of shape ``input_shape`` rather than the reshaped kernel.
        input_shape: with ``conv_operator``, the shape ``(C, H, W)`` (``(C, L)`` in 1d,
            ``(C, D, H, W)`` in 3d) of one input, without the batch dimension.

    Returns:
        ``module``.

    Raises:
        ValueError: ``module`` has no tensor ``name``; bad ``n_power_iterations``, ``eps`` or
            ``bound``; ``conv_operator`` on a layer that is not a convolution, without
            ``input_shape`` or with ``dim``; ``input_shape`` without ``conv_operator``.
        IndexError: ``dim`` is out of range.
        TypeError: an argument has the wrong type.

    Example:
        >>> import torch, tether
        >>> layer = tether.spectral_norm(torch.nn.Linear(20, 40))
        >>> list(layer.state_dict())[1:]
        ['parametrizations.weight.original', 'parametrizations.weight.0._u', \
'parametrizations.weight.0._v']
        >>> conv = tether.spectral_norm(
        ...     torch.nn.Conv2d(3, 8, 3, padding=1), conv_operator=True, input_shape=(3, 16, 16)
        ... )
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"spectral_norm() needs an nn.Module; got {describe(module)}.")
    label = tensor_label(module, name)
    caller = f"spectral_norm() on {label}"  # how error messages start
    weight = tensor_to_constrain(module, name)
    if not isinstance(conv_operator, bool):
        raise bad_type(caller, "conv_operator", "a bool", conv_operator)
    conv: Any = None
    if conv_operator:
        if not isinstance(module, CONV_LAYERS):
            raise ValueError(
                f"{caller}: conv_operator=True needs a convolution layer (nn.Conv1d/2d/3d, "
                f"nn.ConvTranspose1d/2d/3d); got {type(module).__name__}. Drop conv_operator "
                "to normalize the weight as a matrix."
            )
        if dim is not None:
            raise ValueError(
                f"{caller}: `dim` has no meaning with conv_operator=True (the operator acts on "
                "whole inputs); leave it as None."
            )
        conv = module
    if dim is None:
        dim = 1 if isinstance(module, CONV_TRANSPOSE_LAYERS) else 0
    settings = _checked(
        "spectral_norm()",
        label,
        weight,
        n_power_iterations,
        eps,
        dim,
        bound,
        exact,
        conv,
        input_shape,
    )
    register_constraint(module, name, SpectralNorm._from_settings(weight, settings))
    add_load_hook(module, functools.partial(load_spectral_norm, SpectralNorm, name))
    return module
