"""The exponential of a skew-symmetric (skew-Hermitian) matrix from matrix products only: a
Taylor polynomial with scaling and squaring forward, its Fréchet derivative through the same
recurrence backward, for autograd and for ``torch.compile``."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from tether.functional._skew_exp_backward import skew_exp_backward

__all__ = ["skew_exp_matmul"]

# Note [Skew exponential from matrix products]
#     exp(A) = T(A / 2ˢ)^(2ˢ), T the Taylor polynomial of degree m, evaluated by Paterson and
#     Stockmeyer's scheme: the powers X, X², ..., X^q of X = A / 2ˢ (q - 1 products), then
#     Horner's rule in X^q over r blocks Bᵢ = Σⱼ c_{iq+j} Xʲ (r - 1 products), the last block
#     taking X^q too, so that k = q + r - 2 products reach m = q r: 2, 4, 6, 9, 12, 16, 20,
#     25, 30 for k = 1 ... 9. Then s squarings. Only products and sums: what an accelerator
#     does best, and no LU or eigendecomposition.
#
#     Degree and scaling (Al-Mohy and Higham, 2009, 31(3), for Padé; the same for Taylor):
#     T_m(X) = exp(X + ΔX) with ΔX = h(X), h(x) = log(e⁻ˣ T_m(x)) = Σ_{j>m} cⱼ xʲ, so
#     ‖ΔX‖ / ‖X‖ ≤ Σ |cⱼ| ‖X‖ʲ⁻¹, which is at most the unit roundoff u for ‖X‖ ≤ θ_m
#     (_THETA, for u = 2⁻²⁴ and 2⁻⁵³: the coefficients of h by series arithmetic to 60
#     digits, θ_m by bisection; tests/functional/test_skew_exp_matmul.py recomputes them).
#     The squarings keep the relative backward error: the result is exp(A + ΔA),
#     ‖ΔA‖ ≤ u ‖A‖. Any upper bound of ‖A‖₂ will do, and for a skew A the first product
#     gives a tight one: ‖A‖₂² = ‖AᴴA‖₂ = ‖A²‖₂ ≤ min(‖A²‖₁, ‖A²‖_F), where the 1-norm of A
#     itself (which torch.linalg.matrix_exp uses) overestimates ‖A‖₂ by up to √n (about 10x
#     for a Gaussian 512 x 512 matrix, against 2.4x): fewer squarings, each of which doubles
#     the rounding error (so also the orthogonality error) and costs three products forward
#     and backward. (m, s) minimises k + s, the fewest squarings among ties.
#
#     The choice needs the bound on the host: one synchronisation per forward (.item() of
#     the largest bound over the batch, after the first product), and none backward. One
#     (m, s) serves the whole batch, chosen for its largest bound; smaller matrices are
#     squared more than they need, which costs accuracy at the rounding level only. Under
#     torch.compile the forward and backward are custom operators that the compiler keeps
#     whole (Note [The matmul path under torch.compile]).
#
#     Cost (benchmarks/skew_exp.py, one CPU thread, float32, 2-norm 3): k + s = 8 products
#     forward at n = 512, 16 backward, which the forward saves the q + r + s - 1 matrices
#     for: forward plus backward 116 ms against torch.linalg.matrix_exp's 686 ms (5.9x),
#     with max |QᵀQ - I| = 3e-7 against its 2e-5.
#
#     References: M. S. Paterson and L. J. Stockmeyer, "On the number of nonscalar
#     multiplications necessary to evaluate polynomials", SIAM J. Comput. 2(1), 1973.
#     A. H. Al-Mohy and N. J. Higham, "A new scaling and squaring algorithm for the matrix
#     exponential", SIAM J. Matrix Anal. Appl. 31(3), 2009, and "Computing the Fréchet
#     derivative of the matrix exponential, with an application to condition number
#     estimation", SIAM J. Matrix Anal. Appl. 30(4), 2009.

# Note [Fréchet derivative through the recurrence]
#     For a polynomial p with real coefficients, the gradient of ⟨G, p(A)⟩ is L_p(Aᴴ, G),
#     the Fréchet derivative of p at Aᴴ in the direction G, and every intermediate matrix of
#     the recurrence at Aᴴ is the adjoint of the one at A (a real polynomial of A). The
#     backward therefore runs the recurrence on pairs (M, dM) with the product
#     (M, dM)(N, dN) = (MN, dM N + M dN) (Al-Mohy and Higham, 2009, 30(4)), reading the M's from
#     the forward's saved matrices, adjoint: dXʲ = dXʲ⁻¹ Xᴴ + (Xʲ⁻¹)ᴴ dX, dBᵢ = Σ c dXʲ,
#     dRᵢ = dRᵢ₊₁ (X^q)ᴴ + Rᵢ₊₁ᴴ dX^q + dBᵢ, dT ← Tⱼᴴ dT + dT Tⱼᴴ, from dX = G / 2ˢ. That is
#     two products for each of the forward's k + s, where torch.linalg.matrix_exp's backward
#     exponentiates the 2n x 2n block [[Aᴴ, G], [0, Aᴴ]] (8 times the work of a product for
#     each, and more squarings, since ‖G‖ enters its norm). The gradient is exact for the
#     polynomial that the forward evaluated, so it agrees with exp's to the same backward
#     error. Forward mode (jvp) is the same recurrence at A, not adjoint. The skew part is
#     taken in the forward and its adjoint, X̄ = (Ā - Āᴴ) / 2, at the end of the backward.

# Note [The matmul path under torch.compile]
#     The degree and the number of squarings are read from the data, which torch.compile
#     cannot trace, so under the compiler the forward and the backward are two custom
#     operators, tether::skew_exp_matmul and tether::skew_exp_matmul_backward, which the
#     compiler keeps whole. The forward returns, with Q, its plan (q, r, s) as a CPU tensor,
#     not the matrices the backward reads: their number depends on the data, and an output
#     of data-dependent shape breaks the graph (torch 2.13, unless
#     capture_dynamic_output_shape_ops is set). The backward recomputes them with that plan,
#     without reading the data again: k + s products more than eagerly (3 (k + s) backward
#     instead of 2 (k + s)), and still no host synchronisation. As eagerly, the operators
#     are first order.

# θ_m of Note [Skew exponential from matrix products] for the degrees reached with k = 1 ... 9
# products, in single and double precision.
_DEGREES = (2, 4, 6, 9, 12, 16, 20, 25, 30)
_THETA = {
    "single": (
        5.978858893805233e-04,
        5.116619363445086e-02,
        2.495289322846698e-01,
        7.795113374358031e-01,
        1.461661507209034e00,
        2.478280877521971e00,
        3.550926214706495e00,
        4.926899843755911e00,
        6.321082126301969e00,
    ),
    "double": (
        2.580956802971767e-08,
        3.397168839976962e-04,
        9.065656407595102e-03,
        8.957760203223343e-02,
        2.996158913811581e-01,
        7.802874256626574e-01,
        1.438252596804337e00,
        2.428582524442827e00,
        3.539666348743690e00,
    ),
}


def _precision(dtype: torch.dtype) -> str:
    """The table of θ for ``dtype``: double for float64 and complex128, single otherwise."""
    return "double" if dtype in (torch.float64, torch.complex128) else "single"


def schedule(bound: float, precision: str) -> tuple[int, int, int]:
    """``(q, r, s)``: powers, Horner blocks and squarings for ``‖A‖₂ ≤ bound`` (Note [Skew
    exponential from matrix products])."""
    if not math.isfinite(bound):  # a NaN or infinity in A, and so in the result: no squarings
        return 2, 1, 0
    # (k + s, s) for k products of the polynomial: the fewest products, then squarings
    costs = [
        (k + s, s, k)
        for k, theta in enumerate(_THETA[precision], start=1)
        for s in [math.ceil(math.log2(bound / theta)) if bound > theta else 0]
    ]
    _, s, k = min(costs)
    # q + r - 2 = k with q r the largest: the powers X ... X^q and r blocks
    return (k + 3) // 2, (k + 2) // 2, s


@functools.lru_cache(maxsize=64)
def _coefficients(q: int, r: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``C[i, j]``, the coefficient of ``Xʲ`` in block ``r - 1 - i`` (blocks in the order Horner's
    rule takes them), shape ``(r, q + 1)``; cached (building it costs more than a small
    exponential)."""
    rows = [
        [
            1.0 / math.factorial(block * q + j) if j < q or block == r - 1 else 0.0
            for j in range(q + 1)
        ]
        for block in reversed(range(r))
    ]
    return torch.tensor(rows, dtype=dtype, device=device)


def _skew(X: Tensor) -> Tensor:
    """``(X - Xᴴ) / 2``, with the conjugation carried out (see ``_adjoint`` in
    ``_skew_exp_math.py``: custom operators run without torch's Conjugate dispatch key)."""
    return (X - X.mH.resolve_conj()) / 2


def _bound(A2: Tensor) -> Tensor:
    """The largest bound ``min(‖A²‖₁, ‖A²‖_F)^½`` of ``‖A‖₂`` over the batch, 0-d."""
    if not A2.numel():
        return A2.new_zeros((), dtype=A2.real.dtype)
    bounds = torch.minimum(torch.linalg.matrix_norm(A2, 1), torch.linalg.matrix_norm(A2))
    return bounds.max().sqrt()


def forward(
    X: Tensor, plan: tuple[int, int, int] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``exp((X - Xᴴ) / 2)`` for ``X`` of shape ``(b, n, n)``, with what the backward reads: the
    powers ``X, ..., X^q`` of the scaled skew part, shape ``(q, b, n, n)``, the Horner steps
    ``R_{r-1}, ..., R_1`` that multiplied ``X^q`` and the matrices squared ``T_0, ..., T_{s-1}``
    (``T_0 = R_0``), shapes ``(r - 1, b, n, n)`` and ``(s, b, n, n)``: views of one buffer.
    ``plan`` is ``(q, r, s)``, chosen from the data (one synchronisation) when None."""
    A = _skew(X)
    A2 = A @ A
    if plan is None:
        # A meta tensor has no values to bound; any schedule gives the shapes it needs.
        bound = 0.0 if A2.is_meta else float(_bound(A2))
        plan = schedule(bound, _precision(X.dtype))
    q, r, s = plan
    powers = A.new_empty((q, *A.shape))
    torch.mul(A, 2.0**-s, out=powers[0])
    torch.mul(A2, 4.0**-s, out=powers[1])
    for j in range(2, q):
        torch.bmm(powers[j - 1], powers[0], out=powers[j])
    C = _coefficients(q, r, X.dtype, X.device)
    steps = torch.tensordot(C[:, 1:], powers, dims=1)  # the blocks, last first
    steps.diagonal(dim1=-2, dim2=-1).add_(C[:, :1, None])
    if s > 1:
        steps = torch.cat([steps, steps.new_empty((s - 1, *A.shape))])
    last = r - 1 if s else r - 2  # Horner steps done in place (R_{r-1-i} in steps[i])
    for i in range(1, last + 1):
        steps[i].baddbmm_(steps[i - 1], powers[q - 1])
    for i in range(r, r + s - 1):
        torch.bmm(steps[i - 1], steps[i - 1], out=steps[i])
    if s:
        Q = steps[-1] @ steps[-1]
    elif r > 1:
        Q = torch.baddbmm(steps[r - 1], steps[r - 2], powers[q - 1])
    else:
        Q = steps[0].clone()
    return Q, powers, steps[: r - 1], steps[r - 1 : r - 1 + s]


def frechet(E: Tensor, powers: Tensor, horner: Tensor, squared: Tensor, adjoint: bool) -> Tensor:
    """``L(A, E)`` (``L(Aᴴ, E)`` if ``adjoint``), the derivative of the polynomial that
    :func:`forward` evaluated at ``A`` in the direction ``E``, from what it returned (Note
    [Fréchet derivative through the recurrence]). Shapes ``(b, n, n)``.

    Out-of-place operations only, so that it runs under :func:`torch.func.vmap` (jacrev,
    jacfwd), where ``E`` is batched and the saved matrices are not."""
    q, r, s = powers.shape[0], horner.shape[0] + 1, squared.shape[0]

    def at(M: Tensor) -> Tensor:
        return M.mH if adjoint else M

    X, X_q = at(powers[0]), at(powers[q - 1])
    d_powers = [E * 2.0**-s]
    for j in range(1, q):  # d Xʲ⁺¹ = d Xʲ X + Xʲ dX
        d_powers.append(torch.baddbmm(d_powers[-1] @ X, at(powers[j - 1]), d_powers[0]))
    C = _coefficients(q, r, E.dtype, E.device)
    d_blocks = torch.tensordot(C[:, 1:], torch.stack(d_powers), dims=1)
    L = d_blocks[0]
    for i in range(1, r):  # d R = d R' X^q + R' d X^q + d B
        L = torch.baddbmm(torch.baddbmm(d_blocks[i], L, X_q), at(horner[i - 1]), d_powers[-1])
    for j in range(s):  # d T² = T dT + dT T
        T = at(squared[j])
        L = torch.baddbmm(T @ L, L, T)
    return L


def gradient(grad: Tensor, powers: Tensor, horner: Tensor, squared: Tensor) -> Tensor:
    """``X̄`` from the cotangent ``grad`` of ``Q`` (shapes ``(b, n, n)``)."""
    return _skew(frechet(grad, powers, horner, squared, adjoint=True))


_NO_SECOND_DERIVATIVE = (
    "skew_matrix_exp(algorithm='matmul') has no second derivative under this torch.func "
    "transform (its backward is first order; plain autograd with create_graph=True has "
    "them). Use skew_matrix_exp(..., algorithm='torch') or tether.functional.matrix_exp."
)


def _flat(X: Tensor) -> Tensor:
    """``X`` of shape ``(*, n, n)`` as ``(b, n, n)``."""
    return X.reshape(math.prod(X.shape[:-2]), X.shape[-2], X.shape[-1])


def _flat_saved(M: Tensor) -> Tensor:
    """A stack of saved matrices ``(k, *, n, n)`` as ``(k, b, n, n)``."""
    return M.reshape(M.shape[0], math.prod(M.shape[1:-2]), M.shape[-2], M.shape[-1])


def _saved_shape(M: Tensor, X: Tensor) -> Tensor:
    """A stack ``(k, b, n, n)`` of saved matrices as ``(k, *, n, n)`` for ``X`` of ``(*, n, n)``."""
    return M.reshape(M.shape[0], *X.shape)


class _SkewExpMatmul(torch.autograd.Function):
    """``exp((X - Xᴴ) / 2)`` and the matrices its backward reads (Note [Skew exponential from
    matrix products]), for ``X`` of shape ``(*, n, n)``."""

    @staticmethod
    def forward(X: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        Q, powers, horner, squared = forward(_flat(X))
        return (
            Q.reshape(X.shape),
            _saved_shape(powers, X),
            _saved_shape(horner, X),
            _saved_shape(squared, X),
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], *output[1:])
        ctx.save_for_forward(*output[1:])

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, *_: Tensor | None) -> Tensor | None:
        if grad is None:
            return None
        X, *saved = ctx.saved_tensors
        flat = [_flat_saved(M) for M in saved]
        return skew_exp_backward(
            X,
            grad,
            lambda: gradient(_flat(grad), *flat).reshape(X.shape),
            _NO_SECOND_DERIVATIVE,
        )

    @staticmethod
    def jvp(ctx: Any, X_dot: Tensor) -> tuple[Tensor | None, ...]:
        powers, horner, squared = (_flat_saved(M) for M in ctx.saved_tensors)
        Q_dot = frechet(_skew(_flat(X_dot)), powers, horner, squared, adjoint=False)
        return Q_dot.reshape(X_dot.shape), None, None, None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None], X: Tensor
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        # The forward batches over leading dimensions already (one schedule for all).
        X = X.movedim(0 if in_dims[0] is None else in_dims[0], 0)
        if in_dims[0] is None:
            X = X.expand(info.batch_size, *X.shape)
        outputs = _SkewExpMatmul.apply(X)  # type: ignore[no-untyped-call]  # untyped in torch
        return outputs, (0, 1, 1, 1)


@torch.library.custom_op("tether::skew_exp_matmul", mutates_args=())
def _skew_exp_matmul_op(X: Tensor) -> tuple[Tensor, Tensor]:
    """``exp((X - Xᴴ) / 2)`` for ``X`` of shape ``(b, n, n)``, and ``(q, r, s)``, on the CPU."""
    Q, powers, horner, squared = forward(X)
    plan = (powers.shape[0], horner.shape[0] + 1, squared.shape[0])
    return Q, torch.tensor(plan, dtype=torch.int64)


@_skew_exp_matmul_op.register_fake
def _(X: Tensor) -> tuple[Tensor, Tensor]:
    return X.new_empty(X.shape), torch.empty(3, dtype=torch.int64, device="cpu")


@torch.library.custom_op("tether::skew_exp_matmul_backward", mutates_args=())
def _skew_exp_matmul_backward_op(X: Tensor, grad: Tensor, plan: Tensor) -> Tensor:
    """``X̄`` from the cotangent of ``exp((X - Xᴴ) / 2)``, recomputing the forward's matrices
    with the plan ``(q, r, s)`` it chose."""
    q, r, s = plan.tolist()
    _, *saved = forward(X, (q, r, s))
    return gradient(grad, *saved)


@_skew_exp_matmul_backward_op.register_fake
def _(X: Tensor, grad: Tensor, plan: Tensor) -> Tensor:
    return grad.new_empty(grad.shape)


def _setup_op_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    ctx.save_for_backward(inputs[0], output[1])


def _op_backward(ctx: Any, grad: Tensor | None, *_: Tensor | None) -> Tensor | None:
    if grad is None:
        return None
    X, plan = ctx.saved_tensors
    return _skew_exp_matmul_backward_op(X, grad, plan)


_skew_exp_matmul_op.register_autograd(_op_backward, setup_context=_setup_op_context)


def skew_exp_matmul(X: Tensor) -> Tensor:
    """``exp((X - Xᴴ) / 2)`` for ``X`` of shape ``(*, n, n)`` from matrix products (Note [Skew
    exponential from matrix products]): one host synchronisation forward, none backward.

    Example:
        >>> import torch
        >>> X = torch.randn(2, 6, 6, dtype=torch.float64)
        >>> Q = skew_exp_matmul(X)
        >>> torch.allclose(Q, torch.linalg.matrix_exp((X - X.mT) / 2))
        True
    """
    if torch.compiler.is_compiling():
        return _skew_exp_matmul_op(_flat(X))[0].reshape(X.shape)
    Q, *_ = _SkewExpMatmul.apply(X)  # type: ignore[no-untyped-call]  # untyped in torch
    return Q
