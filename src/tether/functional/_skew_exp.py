"""The exponential of a skew-symmetric (skew-Hermitian) matrix: closed forms for n ≤ 3, one
eigendecomposition, or matrix products only, chosen per device and size; for autograd and for
``torch.compile``."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from tether.functional._skew_exp_backward import skew_exp_backward
from tether.functional._skew_exp_math import exponential, gradient, largest_angle, powers
from tether.functional._skew_exp_matmul import skew_exp_matmul
from tether.functional._skew_exp_small import has_closed_form, small_skew_exp

__all__ = ["skew_matrix_exp"]

SkewExpAlgorithm = Literal["auto", "closed_form", "eigh", "matmul", "torch"]
_ALGORITHMS = ("auto", "closed_form", "eigh", "matmul", "torch")
_SUPPORTED = (torch.float32, torch.float64, torch.complex64, torch.complex128)

# Note [Choosing the algorithm]
#     "auto" takes, for each device type and n, the fastest path for forward plus backward
#     (benchmarks/skew_exp.py and the measurements below):
#     - n <= 3 (n <= 2 complex), any device: the closed forms (_skew_exp_small.py), a few
#       passes over the batch.
#     - Other devices than the CPU (CUDA): the matrix products (_skew_exp_matmul.py), what an
#       accelerator does best; an eigendecomposition there is slow and synchronises.
#     - The CPU: the eigendecomposition (_skew_exp_math.py) from n = CPU_EIGH_MIN on, where
#       its three products forward and five backward beat the products' 3 (k + s); below it
#       the products, unless the batch holds less work than one product of two 32 x 32
#       matrices (batch n³ < CPU_MATMUL_MIN_WORK), where torch.linalg.matrix_exp's shorter
#       overhead (C++ against Python) wins.
#     - Other dtypes (half precision), and torch.export.export: torch.linalg.matrix_exp, so
#       that an exported program needs nothing but torch.
#     Measured on a CPU (one thread, forward plus backward of one n x n matrix of 2-norm 3,
#     interleaved; times relative to torch.linalg.matrix_exp's):
#         float32    n = 64: products 0.38, eigh 0.61;  128: 0.23, 0.24;  192: 0.18, 0.18;
#                    256: 0.17 (10.0 ms), 0.17 (8.6 ms);  512: 0.17, 0.13
#         float64    n = 64: 0.41, 0.48;  96: 0.25, 0.26;  128: 0.23, 0.20;  256: 0.26, 0.17
#         complex64  n = 64: 0.23, 0.39;  96: 0.27, 0.24;  192: 0.24, 0.17
#         complex128 n = 64: 0.26, 0.28;  96: 0.29, 0.21
#     Below that much work torch.linalg.matrix_exp is up to 0.4 ms faster (n = 4, 8, 16 with
#     batches 1 to 16: 1.1-2x the time for the products); above it the products win, 0.75x
#     at n = 8 and 0.26x at n = 16 for 64 matrices, 0.49x (n = 4) to 0.18x (n = 16) for 4096
#     (a Conv2d(c, c, 5) kernel is 65,536 matrices of 5 x 5). The closed forms take 0.04x of
#     torch's time for 4096 matrices of 2 x 2 or 3 x 3. On CUDA the products are taken for
#     every n > 3 by design: not measured yet (no GPU was at hand).

# Smallest n for which "auto" takes the eigendecomposition on a CPU, per dtype (the products
# below it); Note [Choosing the algorithm].
CPU_EIGH_MIN = {torch.float32: 192, torch.float64: 128, torch.complex64: 96, torch.complex128: 96}
# Least work (batch x n³) for which "auto" takes the products on a CPU below CPU_EIGH_MIN
# (torch.linalg.matrix_exp below it).
CPU_MATMUL_MIN_WORK = 32**3

# Note [Derivatives of skew_matrix_exp]
#     The arithmetic of "eigh" is in _skew_exp_math.py (Note [Exponential of a skew matrix],
#     Note [Gradient of the skew exponential]); this module records it for autograd. The
#     matrix products (_skew_exp_matmul.py) and the closed forms (_skew_exp_small.py) follow
#     the same rules, through _skew_exp_backward.py, with forward modes of their own.
#     The backward is first order. When autograd records it (create_graph=True, or
#     torch.func.grad, which always asks for a graph) it recomputes the exponential with
#     torch.linalg.matrix_exp and returns that gradient, which can be differentiated again:
#     exact second derivatives at PyTorch's cost, only when a graph is asked for. Under
#     transforms that record nothing in the backward (jacrev, vmap of grad) it returns its
#     own gradient through first_order, so that differentiating it again raises an
#     error instead of treating the map as linear. Forward mode (jvp) of "eigh" is torch's,
#     made of differentiable operations on X; torch.func cannot nest forward mode over any custom
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
        return skew_exp_backward(
            X,
            grad,
            lambda: gradient(grad, theta, V, W, squared, ctx.largest),
            _NO_SECOND_DERIVATIVE,
        )

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


def algorithm_for(device_type: str, n: int, dtype: torch.dtype, batch: int = 1) -> str:
    """The path ``algorithm="auto"`` takes for ``batch`` matrices of ``n x n`` and ``dtype`` on a
    device of type ``device_type`` (Note [Choosing the algorithm]); pure, so that it can be
    tested for devices that are not at hand."""
    if dtype not in _SUPPORTED:
        return "torch"
    if has_closed_form(n, dtype.is_complex):
        return "closed_form"
    if device_type != "cpu":
        return "matmul"
    if n >= CPU_EIGH_MIN[dtype]:
        return "eigh"
    return "matmul" if batch * n**3 >= CPU_MATMUL_MIN_WORK else "torch"


def _algorithm(X: Tensor, algorithm: SkewExpAlgorithm) -> str:
    """The path that ``skew_matrix_exp(X, algorithm=algorithm)`` takes."""
    if algorithm not in _ALGORITHMS:
        raise ValueError(
            f"skew_matrix_exp(): `algorithm` must be one of "
            f"{', '.join(map(repr, _ALGORITHMS))}; got {algorithm!r}."
        )
    n = X.shape[-1]
    if algorithm == "closed_form" and not has_closed_form(n, X.is_complex()):
        raise ValueError(
            f"skew_matrix_exp(algorithm='closed_form') has closed forms for n <= 3 (real) and "
            f"n <= 2 (complex); got n = {n}, {X.dtype}. Use algorithm='auto'."
        )
    if algorithm != "auto":
        return algorithm
    if torch.compiler.is_exporting():
        return "torch"
    return algorithm_for(X.device.type, n, X.dtype, math.prod(X.shape[:-2]))


def skew_matrix_exp(X: Tensor, *, algorithm: SkewExpAlgorithm = "auto") -> Tensor:
    """The exponential ``exp(A)`` of the skew part ``A = (X - Xᴴ) / 2``: orthogonal (unitary).

    For a skew-symmetric (skew-Hermitian) ``X`` this is ``exp(X)``, the map that
    ``orthogonal(..., orthogonal_map="matrix_exp")`` uses. Taking the skew part first makes
    it a smooth function of any ``X`` whose gradient is exact in every direction; for a
    general matrix exponential use :func:`matrix_exp`.

    Four paths compute it, with the same value and gradient to rounding:

    - ``"closed_form"``, ``n <= 3`` (``n <= 2`` complex): a rotation by the angle for
      ``n = 2``, Rodrigues' formula for ``n = 3``, a phase times an ``SU(2)`` rotation for
      complex ``n = 2``: a few passes over a batch, such as the 65,536 kernels of 3 x 3 of a
      ``Conv2d(256, 256, 3)``, forward and backward; ``ValueError`` for other shapes.
    - ``"matmul"``: matrix products only, for any device (what a GPU does best). A Taylor
      polynomial with scaling and squaring, its degree and scaling chosen from a bound of
      ``‖A‖₂`` (one host synchronisation forward, none backward); the backward runs the
      Fréchet derivative through the same recurrence: two products for each of the
      forward's, where :func:`torch.linalg.matrix_exp` exponentiates a ``2n x 2n`` matrix.
      About 6x faster than it forward plus backward at ``n = 512`` on a CPU, and more
      orthogonal.
    - ``"eigh"``: ``exp(A) = cos(√S) + A sinc(√S)``, ``S = AᴴA``, from one Hermitian
      eigendecomposition and a few matrix products forward, five more backward: the
      fastest on a CPU for large ``n`` (8x torch's at ``n = 1024``).
    - ``"torch"``: :func:`torch.linalg.matrix_exp`, with second derivatives.

    ``"auto"`` takes the fastest path that applies (measured forward plus backward; see
    ``docs/performance.md``): the closed forms for ``n <= 3`` (``n <= 2`` complex) on any
    device; on a CPU the eigendecomposition from ``n = CPU_EIGH_MIN`` on (192 in float32,
    128 in float64, 96 complex), and below it the products (4-5x faster than torch's at
    ``n = 32 ... 128``, 2-5x on batches of thousands of small matrices) unless the batch
    holds less work than one product of two 32 x 32 matrices (batch ``n³ < 32³``, such as
    one matrix of ``n < 32``), where torch's shorter overhead wins; on CUDA (and any other
    device) the products for every ``n > 3``. Other dtypes (half precision) and
    :func:`torch.export.export` take ``"torch"``, so that an exported program needs only
    torch.

    The backward of the three fast paths is first order: second derivatives
    (``create_graph=True``) recompute through :func:`torch.linalg.matrix_exp`, and nested
    :mod:`torch.func` transforms that would need them raise an error. Under
    :func:`torch.compile` they run without graph breaks: ``"eigh"`` and ``"matmul"`` as
    custom operators (``tether::skew_exp``, ``tether::skew_exp_matmul`` and their backwards)
    that the compiler keeps whole, with no recompilation as the weights change, and the
    closed forms as traceable code.

    Args:
        X: shape ``(*, n, n)``.
        algorithm: ``"auto"``, ``"closed_form"``, ``"eigh"``, ``"matmul"`` or ``"torch"``,
            see above.

    Returns:
        ``exp((X - Xᴴ) / 2)``, shape ``(*, n, n)``, the dtype and device of ``X``.

    Raises:
        ValueError: ``algorithm`` is not one of the above, or is ``"closed_form"`` for an
            ``n`` without one.

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
    chosen = _algorithm(X, algorithm)
    if chosen == "torch":
        return torch.linalg.matrix_exp((X - X.mH) / 2)
    if chosen == "closed_form":
        return small_skew_exp(X)
    if chosen == "matmul":
        return skew_exp_matmul(X)
    if torch.compiler.is_compiling():
        return _skew_exp_op(X)[0]
    Q, *_ = _SkewExp.apply(X)  # type: ignore[no-untyped-call]  # untyped in torch
    return Q
