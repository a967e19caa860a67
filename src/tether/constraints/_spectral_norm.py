"""Spectral normalization: weights whose largest singular value is one, or at most a bound."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tether._checks import bad_dtype, bad_shape, bad_type, bad_value, check_dim, describe, where
from tether.constraints._base import Constraint, Draw, register_constraint
from tether.constraints._conv_operator import (
    CONV_LAYERS,
    CONV_TRANSPOSE_LAYERS,
    ConvLayer,
    ConvOperator,
    conv_operator,
    operator_norm,
)
from tether.constraints._legacy_checkpoints import add_load_hook, first_parametrization
from tether.functional import largest_singular_value, power_iteration, singular_value_estimate
from tether.functional._precision import precision_eps, upcast

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
#       singular vectors, from an SVD of the reshaped weight or of the dense convolution
#       operator when that has at most _DENSE_LIMIT entries, else from the power method run
#       until the estimate stops growing. The one exception is the call registration makes,
#       on the very weight the constructor warmed the vectors up on: they are kept, so that
#       buffers and results stay torch's.
#     - a checkpoint with the vectors (tether's or torch's layout, the hook-based format)
#       loads them as they are: the model then computes exactly what the saved one did;
#     - a checkpoint with the original but without the vectors (saved with ``exact=True``, or
#       cut down and loaded with ``strict=False``) gets vectors fitted to that original:
#       ``tether._loading`` asks ``state_for`` for them, and they load as if saved. So does a
#       hook-based checkpoint loaded into a convolution operator, whose vectors do not carry
#       over (``_load_legacy_spectral_norm``).
#
#     A fitted pair keeps the sign (the phase) of the vectors it replaces, so refitting
#     vectors that were already right changes nothing.

# Fit with an SVD up to this many entries of the matrix (16 MiB in float32); beyond, the SVD
# costs seconds on a CPU while the power method usually stops after a few dozen steps.
_DENSE_LIMIT = 1 << 22
# The power method's fit: steps between two looks at the estimate, and at most this many.
_FIT_STEPS = 10
_FIT_ITERATIONS = 1000


def _divide(X: Tensor, sigma: Tensor) -> Tensor:
    return X / sigma


def _clip(X: Tensor, sigma: Tensor, bound: float) -> Tensor:
    # X / max(1, sigma / bound): a tensor already inside the bound is left exactly as it is.
    return X / torch.clamp(sigma.abs() / bound, min=1.0)


def _top_singular_vectors(W: Tensor) -> tuple[Tensor, Tensor]:
    """Unit ``u``, ``v`` with ``W v = sigma u`` and ``Wᴴ u = sigma v`` for the largest ``sigma``.

    A fixed point of the power method, on which ``uᴴ W v`` is exactly ``sigma``.
    """
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, 0], Vh[0].conj()


def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_arguments(
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
) -> ConvOperator | None:
    """Raise a ValueError, TypeError or IndexError naming the first bad argument.

    Returns the convolution operator when ``conv`` is given.
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
    if conv is None:
        if input_shape is not None:
            raise ValueError(
                f"{who}: `input_shape` is only used with the convolution operator "
                "(conv_operator=True); drop it or pass conv_operator=True."
            )
        return None
    return conv_operator(function, label, weight, conv, input_shape)


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
        operator = _check_arguments(
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
        self.n_power_iterations = n_power_iterations
        self.dim = dim % weight.ndim
        self.eps = eps
        self.bound = None if bound is None else float(bound)
        self.exact = exact
        self._shape = weight.shape
        self._scale: Callable[[Tensor, Tensor], Tensor] = (
            _divide if self.bound is None else functools.partial(_clip, bound=self.bound)
        )
        self._operator = operator
        # The vectors are warmed up on ``weight``; registration passes that same weight to
        # right_inverse, which then keeps them (Note [Power-iteration state after a load or
        # an assignment]).
        self._keep_next_fit = True
        self._sigma: Callable[[Tensor], Tensor]
        self._exact_sigma: Callable[[Tensor], Tensor]
        with torch.no_grad():
            if operator is not None:
                self._exact_sigma = functools.partial(operator_norm, operator)
                if exact:
                    self._sigma = self._exact_sigma
                else:
                    self._sigma = functools.partial(self._operator_estimate, operator)
                    shapes = operator.output_shape, operator.input_shape
                    self._start(weight, operator.power_iteration, *shapes)
            elif weight.ndim == 1:  # the 2-norm, exactly, as in torch
                self._exact_sigma = self._sigma = self._vector_norm
            else:
                self._exact_sigma = self._matrix_norm
                self._sigma = self._matrix_norm if exact else self._matrix_estimate
                if not exact:
                    W = self._matrix(weight)
                    self._start(W, power_iteration, W.shape[:1], W.shape[1:])

    def _start(
        self,
        W: Tensor,
        iterate: Callable[[Tensor, Tensor, Tensor, int, float], tuple[Tensor, Tensor]],
        u_shape: Sequence[int],
        v_shape: Sequence[int],
    ) -> None:
        """Draw ``u`` and ``v`` as torch does (same generator calls) and run the warm-up."""
        u = F.normalize(W.new_empty(math.prod(u_shape)).normal_(0, 1), dim=0, eps=self.eps)
        v = F.normalize(W.new_empty(math.prod(v_shape)).normal_(0, 1), dim=0, eps=self.eps)
        u, v = iterate(W, u.view(*u_shape), v.view(*v_shape), _WARMUP_ITERATIONS, self.eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)

    @torch.no_grad()
    def _fitted_vectors(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """The top singular vectors of ``X`` (its matrix, or its convolution operator).

        See Note [Power-iteration state after a load or an assignment]. The pair takes the
        sign (phase) of the current vectors where those are finite, and is returned in the
        dtype ``X`` is computed in (float32 for float16 and bfloat16).
        """
        X = upcast(X)
        operator = self._operator
        # The vectors being replaced: where to start the power method, and the phase to keep.
        if self._u.is_meta:  # loading with assign=True into a model built on the meta device
            u_old = torch.full(self._u.shape, math.nan, dtype=X.dtype, device=X.device)
            v_old = torch.full(self._v.shape, math.nan, dtype=X.dtype, device=X.device)
        else:
            u_old, v_old = (b.to(device=X.device, dtype=X.dtype) for b in (self._u, self._v))
        if operator is not None:
            if math.prod(operator.input_shape) * math.prod(operator.output_shape) <= _DENSE_LIMIT:
                u, v = _top_singular_vectors(operator.matrix(X))
                u, v = u.view(operator.output_shape), v.view(operator.input_shape)
            else:
                u, v = self._power_fit(
                    functools.partial(operator.power_iteration, X),
                    functools.partial(operator.estimate, X),
                    u_old,
                    v_old,
                )
        else:
            W = self._matrix(X)
            if W.numel() <= _DENSE_LIMIT:
                u, v = _top_singular_vectors(W)
            else:
                u, v = self._power_fit(
                    functools.partial(power_iteration, W),
                    functools.partial(singular_value_estimate, W),
                    u_old,
                    v_old,
                )
        # Keep the phase of the vectors being replaced: u and v turn together, so the estimate
        # and the normalized weight do not change, and vectors that were right stay as they are.
        overlap = torch.vdot(v.flatten(), v_old.flatten())
        if bool(overlap.isfinite()) and bool(overlap.abs() > 0):
            phase = overlap / overlap.abs()
            u, v = u * phase, v * phase
        return u, v

    def _power_fit(
        self,
        iterate: Callable[[Tensor, Tensor, int, float], tuple[Tensor, Tensor]],
        estimate: Callable[[Tensor, Tensor], Tensor],
        u: Tensor,
        v: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The power method from ``(u, v)`` until the estimate stops growing (or a cap)."""
        if not (bool(u.isfinite().all()) and bool(v.isfinite().all())) or not bool(v.any()):
            # No usable start (a model built on the meta device, then to_empty): a fixed one.
            generator = torch.Generator().manual_seed(0)
            v = torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
        tolerance = precision_eps(v)
        sigma = estimate(u, v).abs()
        for _ in range(_FIT_ITERATIONS // _FIT_STEPS):
            u, v = iterate(u, v, _FIT_STEPS, self.eps)
            previous, sigma = sigma, estimate(u, v).abs()
            # In exact arithmetic the estimate only grows, towards the largest singular value.
            if bool(sigma - previous <= tolerance * sigma):
                break
        return u, v

    def _is_state_of(self, X: Tensor) -> bool:
        """Whether ``(u, v)`` is a power-method state of ``X``: ``v = normalize(Xᴴ u)``.

        Checked to ``sqrt(eps)``: an error ``δ`` in ``v`` changes the estimate by ``δ²``.
        """
        X = upcast(X)
        u, v = self._u.to(X.dtype), self._v.to(X.dtype)
        if self._operator is not None:
            back = self._operator.adjoint(u[None], X)[0]
        else:
            back = self._matrix(X).mH @ u
        back = back / back.norm().clamp_min(self.eps)
        return bool((back - v).norm() <= math.sqrt(precision_eps(X)))

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
        if "_u" not in self._buffers:  # exact, or a vector: no power iteration
            return {}
        u, v = self._fitted_vectors(X)
        return {"_u": u.to(self._u.dtype), "_v": v.to(self._v.dtype)}

    @torch.no_grad()
    def reset_state(self, X: Tensor) -> None:
        """Redraw ``u`` and ``v`` and warm them up on ``X``, as registration does.

        ``reset_parameters()`` of the parametrized module calls it after assigning the new
        weight, so that a module initialised after ``to_empty`` has valid vectors.
        """
        if "_u" not in self._buffers:  # exact, or a vector: no power iteration
            return
        operator = self._operator
        if operator is not None:
            shapes = operator.output_shape, operator.input_shape
            self._start(X, operator.power_iteration, *shapes)
        else:
            W = self._matrix(X)
            self._start(W, power_iteration, W.shape[:1], W.shape[1:])

    def _matrix(self, X: Tensor) -> Tensor:
        if self.dim != 0:
            X = X.permute(self.dim, *(d for d in range(X.ndim) if d != self.dim))
        return X.flatten(1)

    def _vector_norm(self, X: Tensor) -> Tensor:
        return X.norm(2, 0, keepdim=True).clamp_min(self.eps)

    def _matrix_norm(self, X: Tensor) -> Tensor:
        return largest_singular_value(self._matrix(X))

    def _matrix_estimate(self, X: Tensor) -> Tensor:
        W = self._matrix(X)
        if self.training:
            with torch.no_grad():
                u, v = power_iteration(W, self._u, self._v, self.n_power_iterations, self.eps)
                self._refresh(u, v)
        u, v = self._frozen_vectors()
        return singular_value_estimate(W, u, v)

    def _operator_estimate(self, operator: ConvOperator, X: Tensor) -> Tensor:
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
        if "_u" in self._buffers and not X.is_meta:  # on the meta device: shapes only
            keep = self._keep_next_fit and self._is_state_of(X)
            self._keep_next_fit = False
            if not keep:
                self._refresh(*self._fitted_vectors(X))
        return X

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
        options = {
            "n_power_iterations": self.n_power_iterations,
            "dim": self.dim if self._operator is None else None,
            "eps": self.eps,
            "bound": self.bound,
            "exact": self.exact or None,
            "input_shape": None if self._operator is None else self._operator.input_shape,
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
    label = where(module, name)
    caller = f"spectral_norm() on {label}"  # how error messages start
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(
            f"{caller}: the module has no parameter or buffer named {name!r} (got "
            f"{describe(weight)})."
        )
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
    _check_arguments(
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
    constraint = SpectralNorm(
        weight,
        n_power_iterations,
        dim,
        eps,
        bound=bound,
        exact=exact,
        conv=conv,
        input_shape=input_shape,
    )
    register_constraint(module, name, constraint)
    add_load_hook(module, functools.partial(_load_legacy_spectral_norm, name))
    return module


def _load_legacy_spectral_norm(
    name: str,
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """Rename ``weight_orig``, ``weight_u``, ``weight_v`` to the parametrization's keys.

    See Note [Loading the checkpoints of torch's hook-based norms] in ``_legacy_checkpoints``.
    The vectors are kept only where they mean the same as torch's: a power method on the
    reshaped matrix. Exact and vector normalizations have none; a convolution operator gets
    vectors fitted to the loaded original instead (Note [Power-iteration state after a load
    or an assignment]).
    """
    constraint = first_parametrization(module, name)
    if not isinstance(constraint, SpectralNorm):
        return
    keys = [f"{prefix}{name}_{suffix}" for suffix in ("orig", "u", "v")]
    if not all(key in state_dict for key in keys):
        return
    original, u, v = (state_dict.pop(key) for key in keys)
    block = f"{prefix}parametrizations.{name}."
    state_dict[block + "original"] = original
    if "_u" not in constraint._buffers:
        return
    if constraint._operator is None:
        state_dict[block + "0._u"] = u
        state_dict[block + "0._v"] = v
    elif isinstance(original, Tensor) and original.shape == constraint._shape:
        value = original.to(device=constraint._u.device, dtype=constraint._u.dtype)
        for key, vector in constraint.state_for(value).items():
            state_dict[f"{block}0.{key}"] = vector
