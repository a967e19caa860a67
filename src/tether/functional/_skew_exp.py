"""The exponential of a skew-symmetric (skew-Hermitian) matrix from one eigendecomposition,
for autograd and for ``torch.compile``."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from tether.functional._first_order import first_order
from tether.functional._skew_exp_math import (
    MIN_SIZE,
    exponential,
    gradient,
    largest_angle,
    powers,
)

__all__ = ["skew_matrix_exp"]

SkewExpAlgorithm = Literal["auto", "eigh", "torch"]

# Note [Derivatives of skew_matrix_exp]
#     The arithmetic is in _skew_exp_math.py (Note [Exponential of a skew matrix], Note
#     [Gradient of the skew exponential]); this module records it for autograd.
#     The backward is first order. When autograd records it (create_graph=True, or
#     torch.func.grad, which always asks for a graph) it recomputes the exponential with
#     torch.linalg.matrix_exp and returns that gradient, which can be differentiated again:
#     exact second derivatives at PyTorch's cost, only when a graph is asked for. Under
#     transforms that record nothing in the backward (jacrev, vmap of grad) it returns its
#     own gradient through first_order, so that differentiating it again raises an
#     error instead of treating the map as linear. Forward mode (jvp) is torch's, made of
#     differentiable operations on X; torch.func cannot nest forward mode over any custom
#     autograd.Function (jvp of jvp sees a constant), a limitation shared by householder.


# Note [The skew exponential under torch.compile]
#     The number of squarings, and the backward's choices of series and close pairs, are
#     read from the data with .item(), which torch.compile cannot trace. Under the compiler
#     the exponential and its gradient are therefore two custom operators, tether::skew_exp
#     and tether::skew_exp_backward, opaque to it: a compiled model takes the same fast path
#     as an eager one, with no graph break, and the graph does not depend on the data, so
#     nothing recompiles as the weights move. The forward returns the squaring count as a
#     tensor instead of the matrices it squared (whose number is data-dependent); the
#     backward squares again, which costs k products only in the rare case k > 0. The
#     operators are first order: a second derivative through them raises. torch.export
#     with algorithm="auto" takes torch.linalg.matrix_exp, so that an exported program
#     needs nothing but torch.

_NO_SECOND_DERIVATIVE = (
    "skew_matrix_exp(algorithm='eigh') has no second derivative under this torch.func "
    "transform (its backward is first order; plain autograd with create_graph=True has "
    "them). Use skew_matrix_exp(..., algorithm='torch') or tether.functional.matrix_exp; for "
    "a constrained weight, orthogonal_map='cayley' or 'householder'."
)


class _SkewExp(torch.autograd.Function):
    """``exp(A)`` of the skew part ``A = (X - Xᴴ) / 2`` of ``X``; see Note [Exponential of a
    skew matrix]. The skew part is taken here rather than by autograd: two operations fewer
    to record and run back, which matters for small matrices."""

    @staticmethod
    def forward(X: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return exponential(X)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        _, theta, V, W, squared = output
        ctx.mark_non_differentiable(theta, V, W, squared)
        ctx.set_materialize_grads(False)  # no zero gradients for the outputs kept internal
        ctx.save_for_backward(inputs[0], theta, V, W, squared)
        ctx.save_for_forward(inputs[0])
        try:
            ctx.largest = largest_angle(theta)
        except RuntimeError:  # under torch.func.vmap (no .item()): the general backward
            ctx.largest = None

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, *_: Tensor | None) -> Tensor | None:
        if grad is None:
            return None
        X, theta, V, W, squared = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: a gradient autograd can differentiate again, through
            # torch.linalg.matrix_exp (Note [Gradient of the skew exponential]).
            with torch.enable_grad():
                Q = torch.linalg.matrix_exp((X - X.mH) / 2)
            if Q.requires_grad:
                (X_bar,) = torch.autograd.grad(Q, X, grad, create_graph=True, allow_unused=True)
                if X_bar is not None:  # None under some nested torch.func transforms
                    return X_bar
        with torch.no_grad():
            X_bar = gradient(grad, theta, V, W, squared, ctx.largest)
        if torch.is_grad_enabled():
            # Under torch.func transforms nothing is recorded here: make a second derivative
            # fail loudly rather than come out as zero.
            return first_order(X_bar, _NO_SECOND_DERIVATIVE, X, grad)
        return X_bar

    @staticmethod
    def jvp(ctx: Any, X_dot: Tensor) -> tuple[Tensor | None, ...]:
        # Forward mode is rare: torch's way, exp([[A, Ȧ], [0, A]]) = [[Q, Q̇], [0, Q]], made
        # of differentiable operations on X, so that nested transforms can differentiate it.
        (X,) = ctx.saved_tensors
        A, A_dot = (X - X.mH) / 2, (X_dot - X_dot.mH) / 2
        top = torch.cat([A, A_dot], dim=-1)
        bottom = torch.cat([torch.zeros_like(A), A], dim=-1)
        n = A.shape[-1]
        Q_dot = torch.linalg.matrix_exp(torch.cat([top, bottom], dim=-2))[..., :n, n:]
        return Q_dot, None, None, None, None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None], X: Tensor
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        # forward batches over leading dimensions already (sharing one squaring count).
        batch_dim = 0 if in_dims[0] is None else in_dims[0]
        outputs = _SkewExp.apply(X.movedim(batch_dim, 0))  # type: ignore[no-untyped-call]  # untyped in torch
        return outputs, (0, 0, 0, 0, 0)


@torch.library.custom_op("tether::skew_exp", mutates_args=())
def _skew_exp_op(X: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``exp((X - Xᴴ) / 2)``, ``θ``, ``V``, ``W`` and the number of squarings, a 0-d tensor."""
    Q, theta, V, W, squared = exponential(X)
    k = torch.tensor(squared.shape[-3], device=X.device)
    # Contiguous, as the fake outputs are (eigh returns V column-major).
    return Q.contiguous(), theta, V.contiguous(), W.contiguous(), k


@_skew_exp_op.register_fake
def _(X: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    square = X.new_empty(X.shape)
    theta = X.new_empty(X.shape[:-1], dtype=X.real.dtype)
    return (
        square,
        theta,
        X.new_empty(X.shape),
        X.new_empty(X.shape),
        X.new_empty((), dtype=torch.int64),
    )


@torch.library.custom_op("tether::skew_exp_backward", mutates_args=())
def _skew_exp_backward_op(grad: Tensor, theta: Tensor, V: Tensor, W: Tensor, k: Tensor) -> Tensor:
    """``X̄`` from the cotangent of ``exp(A)`` and what :func:`_skew_exp_op` returned."""
    X_bar = gradient(grad, theta, V, W, powers(theta, V, W, int(k)), largest_angle(theta))
    return X_bar.contiguous()


@_skew_exp_backward_op.register_fake
def _(grad: Tensor, theta: Tensor, V: Tensor, W: Tensor, k: Tensor) -> Tensor:
    return V.new_empty(V.shape)


def _setup_op_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    ctx.save_for_backward(*output[1:])


def _op_backward(ctx: Any, grad: Tensor | None, *_: Tensor | None) -> Tensor | None:
    if grad is None:
        return None
    return _skew_exp_backward_op(grad, *ctx.saved_tensors)


_skew_exp_op.register_autograd(_op_backward, setup_context=_setup_op_context)


def _algorithm(X: Tensor, algorithm: SkewExpAlgorithm) -> str:
    if algorithm not in ("auto", "eigh", "torch"):
        raise ValueError(
            f"skew_matrix_exp(): `algorithm` must be one of 'auto', 'eigh', 'torch'; "
            f"got {algorithm!r}."
        )
    if algorithm != "auto":
        return algorithm
    supported = X.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128)
    if (
        supported
        and X.device.type == "cpu"
        and X.shape[-1] >= MIN_SIZE
        and not torch.compiler.is_exporting()
    ):
        return "eigh"
    return "torch"


def skew_matrix_exp(X: Tensor, *, algorithm: SkewExpAlgorithm = "auto") -> Tensor:
    """The exponential ``exp(A)`` of the skew part ``A = (X - Xᴴ) / 2``: orthogonal (unitary).

    For a skew-symmetric (skew-Hermitian) ``X`` this is ``exp(X)``, the map that
    ``orthogonal(..., orthogonal_map="matrix_exp")`` uses. Taking the skew part first makes
    it a smooth function of any ``X`` whose gradient is exact in every direction; for a
    general matrix exponential use :func:`matrix_exp`.

    With ``algorithm="eigh"`` it uses ``exp(A) = cos(√S) + A sinc(√S)``, ``S = AᴴA``: one
    Hermitian eigendecomposition and a few matrix products forward, five more backward,
    several times faster on a CPU than :func:`torch.linalg.matrix_exp` (whose backward
    exponentiates a ``2n x 2n`` matrix) and as accurate; see the notes in the source. Its
    backward is first order: second derivatives (``create_graph=True``) recompute through
    :func:`torch.linalg.matrix_exp`, and nested :mod:`torch.func` transforms that would need
    them raise an error. ``"torch"`` calls :func:`torch.linalg.matrix_exp`. ``"auto"`` takes
    ``"eigh"`` on a CPU for ``n >= 32`` in single or double precision, real or complex,
    and ``"torch"`` otherwise (small ``n``, other dtypes, CUDA, where matrix products are
    cheap next to an eigendecomposition, and :func:`torch.export.export`, so that an
    exported program needs only torch). Under :func:`torch.compile` ``"eigh"`` runs as two
    custom operators (``tether::skew_exp`` and its backward) that the compiler keeps whole:
    no graph break, no recompilation as the weights change, first derivatives only.

    Args:
        X: shape ``(*, n, n)``.
        algorithm: ``"auto"``, ``"eigh"`` or ``"torch"``, see above.

    Returns:
        ``exp((X - Xᴴ) / 2)``, shape ``(*, n, n)``, the dtype and device of ``X``.

    Raises:
        ValueError: ``algorithm`` is not one of the above.

    Example:
        >>> import torch
        >>> from tether.functional import skew_matrix_exp
        >>> X = torch.randn(32, 32, dtype=torch.float64)
        >>> Q = skew_matrix_exp(X - X.mT)
        >>> torch.allclose(Q, torch.linalg.matrix_exp(X - X.mT))
        True
        >>> torch.allclose(Q.mT @ Q, torch.eye(32, dtype=torch.float64))
        True
    """
    if _algorithm(X, algorithm) == "torch":
        return torch.linalg.matrix_exp((X - X.mH) / 2)
    if torch.compiler.is_compiling():
        return _skew_exp_op(X)[0]
    Q, *_ = _SkewExp.apply(X)  # type: ignore[no-untyped-call]  # untyped in torch
    return Q
