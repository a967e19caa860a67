"""The Householder map: orthonormal columns from reflectors, in compact WY form."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from tether.functional._householder_small import _SmallHouseholder, _SmallHouseholderTraceable
from tether.functional._small_matrices import SMALL_BATCH
from tether.functional._traceable import traceable

__all__ = ["householder"]

HouseholderAlgorithm = Literal["auto", "wy", "torch"]

# Fewest reflectors for which householder(algorithm="auto") takes the compact WY form.
_WY_MIN_COLUMNS = 8


# Note [Compact WY form]
#     The product H₁ ⋯ H_k of the reflectors Hᵢ = I - τᵢ yᵢ yᵢᵀ, τᵢ = 2 / yᵢᵀyᵢ, is I - Y T Yᵀ
#     with T upper triangular and T⁻¹ = triu(YᵀY, 1) + diag(1/τ) (the "UT transform" of
#     Joffrain et al. 2006), that is T = diag(τ) (I + N)⁻¹ with N the strict upper triangle of
#     YᵀY diag(τ). The first k columns are E - Y M, M = diag(τ) K, K = (I + N)⁻¹ Y₁ᵀ, with Y₁
#     the top k x k block of Y and E the first k columns of I: two matrix products and a
#     unit-triangular solve (which reads only the strict triangle, so N needs no masking),
#     done from the right as Kᵀ = Y₁ (I + N)⁻ᵀ, which LAPACK does faster on a CPU.
#     torch.linalg.householder_product applies the reflectors one at a time, and so does its
#     backward, which is what makes it slow.
#
#     The backward (_Householder) follows the same steps in reverse: with G the cotangent of
#     E - Y M, Ȳ = -G Mᵀ, M̄ = -Yᵀ G; through the solve, R = (I + N)⁻ᵀ K̄ adds Rᵀ to Ȳ₁ and
#     -triu(R Kᵀ, 1) to N̄; through N = triu(P) diag(τ) and τᵢ = 2 / Pᵢᵢ, P = YᵀY, to P̄
#     (τ is computed by a sum of its own, but its derivative is the same); and
#     Ȳ += Y (P̄ + P̄ᵀ). Four products and one solve, with the scalings done in place on
#     k x k factors. When the gradient may be differentiated again
#     (create_graph=True, torch.func transforms) the backward is instead the vjp of
#     _householder_autograd, the same computation left to autograd, about as fast. The
#     forward-mode derivative (jvp) recomputes the factors from X for the same reason
#     (torch.func still cannot nest forward mode over a custom autograd.Function: the jvp of
#     a jvp comes out as if the first were constant).

# Note [Memory of the Householder backward]
#     The forward keeps X (held anyway, as the original) and one k x k matrix for the
#     backward. K = (I + N)⁻¹ Y₁ᵀ is unit upper triangular (both factors are), so
#     M = diag(τ) K diag(-signs) is upper triangular, and the solves read only N's strict
#     upper triangle: the lower triangle of Mᵀ and the strict upper one of N share a matrix.
#     The backward rebuilds Y from X (a copy, at its start and at its end) and Mᵀ from that
#     matrix, and drops each temporary once used; N̄ enters only as N̄ diag(τ) = -triu(R
#     diag(-signs) Mᵀ, 1), without K. Ȳ = G Mᵀ + [Rᵀ; 0] + Y (P̄ + P̄ᵀ) is assembled last,
#     in Rᵀ's memory for a square X, with in-place products (addmm_), so that at most three
#     n x k or k x k temporaries are alive at once beside the cotangent. Keeping Y, N, K and
#     M instead saves three copies (a few percent of the time) but holds more than
#     householder_product, whose backward keeps its input and output; this holds less
#     (benchmarks/orthogonal_maps.py, peak memory).


def _reflectors(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Y`` (the unit lower trapezoid of ``X``), ``τ`` and the signs of ``X``'s diagonal."""
    # τ from a sum of its own rather than from the diagonal of YᵀY: a reflector is
    # orthogonal only as far as τ = 2 / yᵀy is accurate, and a long matrix product rounds
    # more than a (pairwise) sum.
    tau = 2.0 / (1.0 + X.tril(-1).square().sum(dim=-2))
    signs = torch.where(X.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(X.dtype)
    return _unit_trapezoid(X), tau, signs


def _unit_trapezoid(X: Tensor) -> Tensor:
    """The strict lower triangle of ``X`` with ones on the diagonal."""
    Y = X.tril(-1)
    Y.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    return Y


def _householder_autograd(X: Tensor) -> Tensor:
    """:func:`householder` with every step recorded by autograd (for second derivatives)."""
    n, k = X.shape[-2], X.shape[-1]
    Y, tau, signs = _reflectors(X)
    N = (Y.mT @ Y) * tau.unsqueeze(-2)
    Kh = torch.linalg.solve_triangular(
        N.mT, Y[..., :k, :], upper=False, left=False, unitriangular=True
    )
    Q = Y @ (Kh.mT * (tau.unsqueeze(-1) * -signs.unsqueeze(-2)))
    return Q + torch.eye(n, k, dtype=X.dtype, device=X.device) * signs.unsqueeze(-2)


def _householder_jvp(X: Tensor, X_dot: Tensor) -> Tensor:
    """The derivative of :func:`householder` at ``X`` in the direction ``X_dot``.

    Recomputed from ``X`` with differentiable operations, so that nested transforms can
    differentiate it again (forward mode is rare; speed matters less than that).
    """
    k = X.shape[-1]
    Y, tau, signs = _reflectors(X)
    N = (Y.mT @ Y) * tau.unsqueeze(-2)
    Kh = torch.linalg.solve_triangular(
        N.mT, Y[..., :k, :], upper=False, left=False, unitriangular=True
    )
    scale = tau.unsqueeze(-1) * -signs.unsqueeze(-2)
    M = Kh.mT * scale
    # τ = 2 / (1 + ‖aᵢ‖²); N = triu(YᵀY) diag(τ); K = (I + N)⁻¹ Y₁ᵀ; Q = E S + Y M.
    Y_dot = X_dot.tril(-1)
    tau_rate = -(Y * Y_dot).sum(dim=-2) * tau  # τ̇ / τ
    P_dot = Y.mT @ Y_dot
    N_dot = (P_dot + P_dot.mT) * tau.unsqueeze(-2) + N * tau_rate.unsqueeze(-2)
    K_dot = torch.linalg.solve_triangular(
        N, Y_dot[..., :k, :].mT - N_dot.triu(1) @ Kh.mT, upper=True, unitriangular=True
    )
    M_dot = M * tau_rate.unsqueeze(-1) + K_dot * scale
    return Y_dot @ M + Y @ M_dot


class _Householder(torch.autograd.Function):
    """The first ``k`` columns of ``H₁ ⋯ H_k``, signed; see Note [Compact WY form]."""

    generate_vmap_rule = True

    @staticmethod
    def forward(X: Tensor) -> tuple[Tensor, ...]:
        k = X.shape[-1]
        # _reflectors(X), with one copy of X fewer (nothing is recorded here).
        Y = X.tril(-1)
        tau = 2.0 / (1.0 + Y.square().sum(dim=-2))
        Y.diagonal(dim1=-2, dim2=-1).fill_(1.0)
        signs = torch.where(X.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(X.dtype)
        N = (Y.mT @ Y).mul_(tau.unsqueeze(-2))
        Kh = torch.linalg.solve_triangular(
            N.mT, Y[..., :k, :], upper=False, left=False, unitriangular=True
        )
        # (E - Y diag(τ) K) diag(signs): the scalings go on the k x k factor.
        M = Kh.mT.mul_(tau.unsqueeze(-1)).mul_(-signs.unsqueeze(-2))
        Q = Y @ M
        del Y
        Q.diagonal(dim1=-2, dim2=-1).add_(signs)
        # M is upper triangular and only N's strict upper triangle is used: one k x k
        # matrix keeps both for the backward (Note [Memory of the Householder backward]).
        lower = torch.ones(k, k, dtype=torch.bool, device=X.device).tril()
        return Q, torch.where(lower, M.mT, N), tau, signs

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        _, *saved = output
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # no zero gradients for the outputs kept internal
        ctx.save_for_backward(inputs[0], *saved)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx: Any, X_dot: Tensor) -> tuple[Tensor | None, ...]:
        (X,) = ctx.saved_tensors
        return _householder_jvp(X, X_dot), None, None, None

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, *_: Tensor | None) -> Tensor | None:
        if grad is None:
            return None
        X, packed, tau, signs = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True, or a torch.func transform: a gradient that can be
            # differentiated again, by differentiating the computation left to autograd.
            vjp = torch.func.vjp(_householder_autograd, X)[1]
            return vjp(grad)[0]
        k = packed.shape[-1]
        # The order, and the in-place steps, keep at most three temporaries alive beside
        # the cotangent (Note [Memory of the Householder backward]).
        M_bar = _unit_trapezoid(X).mT @ grad
        Mt = packed.tril()  # Mᵀ
        tau_bar = (M_bar.mT * Mt).sum(dim=-2).div_(tau)
        K_bar = M_bar.mul_(tau.unsqueeze(-1)).mul_(-signs.unsqueeze(-2))
        Rh = torch.linalg.solve_triangular(
            packed, K_bar.mT, upper=True, left=False, unitriangular=True
        )
        del K_bar, M_bar
        # N̄ diag(τ) = -triu(R Kᵀ diag(τ), 1), and Kᵀ diag(τ) = diag(-signs) Mᵀ.
        P_bar = Rh.mT @ Mt.mul_(-signs.unsqueeze(-1))
        del Mt
        P_bar.triu_(1).neg_()
        tau_bar += (P_bar * packed).sum(dim=-2).div_(tau).div_(tau)
        P_bar = P_bar + P_bar.mT
        # τᵢ = 2 / (1 + ‖aᵢ‖²) = 2 / Pᵢᵢ puts -τᵢ² τ̄ᵢ / 2 on P̄ᵢᵢ, twice in P̄ + P̄ᵀ.
        P_bar.diagonal(dim1=-2, dim2=-1).sub_(tau_bar.mul_(tau).mul_(tau))
        # Ȳ = Y P̄ + [Rᵀ; 0] + G Mᵀ, accumulated in Rᵀ's memory for a square X.
        Y = _unit_trapezoid(X)
        if X.shape[-2] == k:
            Y_bar = _add_product_(Rh, Y, P_bar)
        else:
            Y_bar = Y @ P_bar
            Y_bar[..., :k, :] += Rh
        del Y, P_bar, Rh
        return _add_product_(Y_bar, grad, packed.tril()).tril_(-1)


_HouseholderTraceable = traceable(_Householder)


def _add_product_(out: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """``out += A @ B`` without a temporary for the product (same batch shapes)."""
    # In place: this backward never runs under torch.func.vmap (there gradients are
    # recorded, and the branch above is taken), where addmm_ has no batching rule.
    if out.dim() == 2:
        return out.addmm_(A, B)
    if out.dim() == 3:
        return out.baddbmm_(A, B)
    out += A @ B
    return out


def _householder_torch(X: Tensor) -> Tensor:
    """:func:`householder` with :func:`torch.linalg.householder_product`."""
    A = X.tril(-1)
    tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
    Q = torch.linalg.householder_product(A, tau)
    signs = torch.where(X.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * signs.unsqueeze(-2)


def householder_path(device_type: str, k: int, batch: int = 1) -> str:
    """The path of ``householder(..., algorithm="auto")`` for ``batch`` matrices of ``k``
    columns on a device of type ``device_type``; pure, so that it can be tested for devices
    that are not at hand.

    ``"loop"`` (Note [Householder reflectors one at a time] in _householder_small.py) for
    batches of at least SMALL_BATCH matrices of fewer than _WY_MIN_COLUMNS columns,
    ``"torch"`` for fewer such matrices, ``"wy"`` from _WY_MIN_COLUMNS columns on; the same
    on every device (each runs on the device without reading a value; the thresholds are
    measured on a CPU).
    """
    if k >= _WY_MIN_COLUMNS:
        return "wy"
    return "loop" if batch >= SMALL_BATCH else "torch"


def householder(X: Tensor, *, algorithm: HouseholderAlgorithm = "auto") -> Tensor:
    """Orthonormal columns from the reflectors below the diagonal of a tall ``X``.

    The column ``i`` of the strictly lower triangle of ``X`` (with a 1 on the diagonal) is the
    vector ``v_i`` of the reflector ``I - 2 v vᵀ / vᵀv``; the result is the product of the
    reflectors (first ``k`` columns), with the sign of column ``i`` taken from the sign of
    ``X[i, i]`` (so that every orthogonal matrix is reached). PyTorch truncates ``X[i, i]`` to
    an integer instead, which zeroes the column when ``|X[i, i]| < 1`` (after weight decay,
    say); both agree on the ``±1`` diagonals that ``right_inverse`` produces.

    With ``algorithm="wy"`` the product is formed at once in compact WY form (Note [Compact
    WY form]): two matrix products and a triangular solve forward, four and one backward.
    Forward plus backward, that is 6x faster than :func:`torch.linalg.householder_product`
    (``"torch"``, which applies the reflectors one at a time) at ``n = k = 256`` on a CPU,
    14x at 1024, and 15-100x for tall matrices, with a lower peak memory (its backward keeps
    ``X`` and one ``k x k`` matrix). ``"auto"`` takes ``"wy"`` from
    ``k = 8`` reflectors on; below that the two cost about the same and ``"torch"`` gives
    PyTorch's own rounding, except for batches of 32 matrices or more (convolution kernels),
    which ``"auto"`` gives to a loop over the reflectors in a batch-last layout with a
    hand-written backward (Note [Householder reflectors one at a time]): 6x faster than
    ``"torch"`` forward plus backward on the 65,536 matrices of 3 x 3 of a
    ``Conv2d(256, 256, 3)`` on a CPU, 8x on those of 2 x 2. All of them support second
    derivatives and forward-mode AD, and none synchronises with the device.

    Args:
        X: real, shape ``(*, n, k)`` with ``n >= k``.
        algorithm: ``"auto"``, ``"wy"`` or ``"torch"``, see above.

    Returns:
        Orthonormal columns, shape ``(*, n, k)``, the dtype and device of ``X``.

    Raises:
        ValueError: ``X`` is complex, or ``algorithm`` is not one of the above.

    References:
        A Storage-Efficient WY Representation for Products of Householder Transformations.
        Robert Schreiber, Charles Van Loan, 1989. https://doi.org/10.1137/0910005

        Accumulating Householder Transformations, Revisited. Thierry Joffrain, Tze Meng
        Low, Enrique S. Quintana-Ortí, Robert van de Geijn, Field G. Van Zee, 2006.
        https://doi.org/10.1145/1141885.1141886

    Example:
        >>> import torch
        >>> from tether.functional import householder
        >>> Q = householder(torch.randn(5, 3, dtype=torch.float64))
        >>> torch.allclose(Q.mT @ Q, torch.eye(3, dtype=torch.float64))
        True
    """
    if X.is_complex():
        raise ValueError(
            f"householder() needs a real tensor; got {X.dtype}. For unitary matrices use "
            "matrix_exp or cayley."
        )
    if algorithm not in ("auto", "wy", "torch"):
        raise ValueError(
            f"householder(): `algorithm` must be one of 'auto', 'wy', 'torch'; got {algorithm!r}."
        )
    path: str = algorithm
    if algorithm == "auto":
        path = householder_path(X.device.type, X.shape[-1], math.prod(X.shape[:-2]))
    if path == "loop":
        small = _SmallHouseholderTraceable if torch.compiler.is_compiling() else _SmallHouseholder
        Q, _ = small.apply(X)  # type: ignore[no-untyped-call]  # untyped in torch
        return Q
    if path == "torch":
        return _householder_torch(X)
    function = _HouseholderTraceable if torch.compiler.is_compiling() else _Householder
    Q, *_ = function.apply(X)  # type: ignore[no-untyped-call]  # untyped in torch
    return Q
