"""Maps for general (non-symmetric) matrices: factored products, GL+(n) and Hurwitz matrices.

Low-rank and almost-orthogonal weights are products ``U diag(s) Vᵀ`` (:func:`factored`, inverted
by :func:`truncated_svd`); invertible ones are ``Q R`` with ``Q`` in SO(n)
(:func:`special_orthonormalize`) and ``R`` upper triangular with a positive diagonal
(:func:`positive_triangular`); stable (Hurwitz) ones are ``M P`` with ``M`` dissipative
(:func:`dissipative`) and ``P`` positive definite (:func:`log_cholesky`), inverted through a
Lyapunov equation (:func:`solve_lyapunov`). All maps are real.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tether.functional._orthogonal import orthonormalize

__all__ = [
    "dissipative",
    "dissipative_inverse",
    "factored",
    "log_cholesky",
    "log_cholesky_inverse",
    "positive_triangular",
    "positive_triangular_inverse",
    "solve_lyapunov",
    "special_orthonormalize",
    "truncated_svd",
]


def factored(U: Tensor, s: Tensor, V: Tensor) -> Tensor:
    """The product ``U diag(s) Vᵀ``, of rank at most ``r``, at the cost of the factors.

    Scales the columns of ``U`` instead of building ``diag(s)``: ``O(n k r)`` operations. The
    right inverse is :func:`truncated_svd`.

    Args:
        U: shape ``(*, n, r)``.
        s: shape ``(*, r)``.
        V: shape ``(*, k, r)``.

    Returns:
        A tensor of shape ``(*, n, k)``.

    Example:
        >>> import torch
        >>> from tether.functional import factored, truncated_svd
        >>> X = factored(torch.randn(5, 2), torch.randn(2), torch.randn(3, 2))
        >>> int(torch.linalg.matrix_rank(X))
        2
        >>> torch.allclose(factored(*truncated_svd(X, rank=2)), X, atol=1e-5)
        True
    """
    return (U * s.unsqueeze(-2)) @ V.mT


def truncated_svd(X: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``rank`` leading singular triplets ``(U, s, V)`` of ``X``: inverts :func:`factored`.

    ``factored(U, s, V)`` is the best approximation of ``X`` of rank at most ``rank`` in the
    Frobenius and spectral norms (Eckart-Young), so ``X`` itself when its rank is at most
    ``rank``. ``U`` and ``V`` have orthonormal columns and ``s`` is non-negative, decreasing.
    Meant for setting weights, under ``torch.no_grad()``: the backward of the SVD is singular
    where singular values repeat.

    Args:
        X: shape ``(*, n, k)``.
        rank: ``r``, with ``1 <= r <= min(n, k)``.

    Returns:
        ``U`` of shape ``(*, n, r)``, ``s`` of shape ``(*, r)`` and ``V`` of shape ``(*, k, r)``,
        contiguous.

    Raises:
        ValueError: ``rank`` is out of range.
    """
    if X.ndim < 2 or not 1 <= rank <= min(X.shape[-2:]):
        raise ValueError(
            f"truncated_svd() needs 1 <= rank <= min(n, k) for X of shape (*, n, k); got rank "
            f"{rank} and shape {tuple(X.shape)}."
        )
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return (
        U[..., :rank].contiguous(),
        S[..., :rank].contiguous(),
        Vh[..., :rank, :].mT.contiguous(),
    )


def special_orthonormalize(X: Tensor) -> Tensor:
    """A rotation (a matrix of SO(n)) from a square ``X``: :func:`orthonormalize` oriented.

    The ``Q`` of the QR decomposition of ``X`` with a positive diagonal in ``R``, its last
    column negated when ``det Q = -1``. Negating it exactly where ``det X`` changes sign makes
    the map continuous wherever the first ``n - 1`` columns of ``X`` are independent, even
    across singular ``X``; the last column is then the unit vector that completes the first
    ones to a rotation. The identity on SO(n), which is therefore its own right inverse there.

    Args:
        X: real, shape ``(*, n, n)``.

    Example:
        >>> import torch
        >>> from tether.functional import special_orthonormalize
        >>> Q = special_orthonormalize(torch.randn(4, 4, dtype=torch.float64))
        >>> round(torch.linalg.det(Q).item(), 8)
        1.0
        >>> torch.allclose(special_orthonormalize(Q), Q)
        True
    """
    Q = orthonormalize(X)
    with torch.no_grad():
        # det Q is +-1 and locally constant: its derivative is zero, so no graph is needed.
        negative = torch.linalg.det(Q) < 0
    flip = torch.ones_like(Q[..., 0, :])
    flip[..., -1] = torch.where(negative, -1.0, 1.0)
    return Q * flip.unsqueeze(-2)


def positive_triangular(X: Tensor) -> Tensor:
    """Upper triangular with a positive diagonal: the strict upper triangle of ``X``, ``exp`` of
    its diagonal.

    A diffeomorphism from the upper triangle of ``X`` (diagonal included) onto the upper
    triangular matrices with a positive diagonal (the ``R`` factors of QR); the strict lower
    triangle of ``X`` is not read. ``det = exp(trace X)``. The right inverse is
    :func:`positive_triangular_inverse`.

    Args:
        X: shape ``(*, n, n)``.

    Example:
        >>> import torch
        >>> from tether.functional import positive_triangular, positive_triangular_inverse
        >>> R = positive_triangular(torch.randn(3, 3))
        >>> bool((R.diagonal() > 0).all()), torch.equal(R, R.triu())
        (True, True)
        >>> torch.allclose(positive_triangular(positive_triangular_inverse(R)), R)
        True
    """
    return X.triu(1) + torch.diag_embed(X.diagonal(dim1=-2, dim2=-1).exp())


def positive_triangular_inverse(R: Tensor) -> Tensor:
    """The right inverse of :func:`positive_triangular`: ``log`` on the diagonal of ``R``.

    Returns the upper triangle of ``R`` with its diagonal replaced by its logarithm (the
    strict lower triangle is zero). ``R``'s diagonal must be positive.

    Args:
        R: shape ``(*, n, n)``.
    """
    return R.triu(1) + torch.diag_embed(R.diagonal(dim1=-2, dim2=-1).log())


def log_cholesky(X: Tensor) -> Tensor:
    """The positive definite matrix ``L Lᵀ`` whose Cholesky factor ``L`` is read from ``X``.

    ``L`` is the strict lower triangle of ``X`` plus ``exp`` of its diagonal (the
    log-Cholesky parametrization); the strict upper triangle of ``X`` is not read. A
    diffeomorphism onto the positive definite matrices that needs no eigendecomposition,
    with right inverse :func:`log_cholesky_inverse`.

    Args:
        X: shape ``(*, n, n)``.

    References:
        Unconstrained Parametrizations for Variance-Covariance Matrices. José C. Pinheiro,
        Douglas M. Bates, 1996. https://doi.org/10.1007/BF00140873

    Example:
        >>> import torch
        >>> from tether.functional import log_cholesky, log_cholesky_inverse
        >>> P = log_cholesky(torch.randn(4, 4, dtype=torch.float64))
        >>> bool(torch.linalg.eigvalsh(P).min() > 0)
        True
        >>> torch.allclose(log_cholesky(log_cholesky_inverse(P)), P)
        True
    """
    L = X.tril(-1) + torch.diag_embed(X.diagonal(dim1=-2, dim2=-1).exp())
    P = L @ L.mT
    return (P + P.mT) / 2


def log_cholesky_inverse(P: Tensor) -> Tensor:
    """The right inverse of :func:`log_cholesky`: the Cholesky factor, ``log`` on its diagonal.

    Returns a lower triangular matrix (the strict upper triangle is zero).

    Args:
        P: symmetric positive definite, shape ``(*, n, n)``.

    Raises:
        torch.linalg.LinAlgError: ``P`` is not positive definite.
    """
    L = torch.linalg.cholesky(P)
    return L.tril(-1) + torch.diag_embed(L.diagonal(dim1=-2, dim2=-1).log())


def dissipative(X: Tensor) -> Tensor:
    """A matrix ``M = J - R`` with ``J`` skew-symmetric and ``R`` positive definite.

    Equivalently ``M + Mᵀ`` is negative definite (a strictly dissipative matrix: ``xᵀ M x < 0``
    for ``x != 0``). ``J = T - Tᵀ`` with ``T`` the strict upper triangle of ``X``, and
    ``R = log_cholesky(X)`` reads the lower triangle, so every entry of ``X`` is used once:
    a diffeomorphism onto the dissipative matrices, with right inverse
    :func:`dissipative_inverse`.

    Args:
        X: shape ``(*, n, n)``.

    Example:
        >>> import torch
        >>> from tether.functional import dissipative, dissipative_inverse
        >>> M = dissipative(torch.randn(4, 4, dtype=torch.float64))
        >>> bool(torch.linalg.eigvalsh(M + M.mT).max() < 0)
        True
        >>> torch.allclose(dissipative(dissipative_inverse(M)), M)
        True
    """
    T = X.triu(1)
    return T - T.mT - log_cholesky(X)


def dissipative_inverse(M: Tensor) -> Tensor:
    """The right inverse of :func:`dissipative`, for ``M`` with ``M + Mᵀ`` negative definite.

    Args:
        M: shape ``(*, n, n)``.

    Raises:
        torch.linalg.LinAlgError: ``M + Mᵀ`` is not negative definite.
    """
    return ((M - M.mT) / 2).triu(1) + log_cholesky_inverse(-(M + M.mT) / 2)


# Note [Lyapunov equation by the matrix sign function]
#     For a stable A (every eigenvalue in the open left half-plane) the Newton iteration
#         A₀ = A,  Aₖ₊₁ = (cₖ Aₖ + Aₖ⁻¹ / cₖ) / 2,
#         Q₀ = -C, Qₖ₊₁ = (cₖ Qₖ + Aₖ⁻¹ Qₖ Aₖ⁻ᵀ / cₖ) / 2,
#     keeps Aₖ X + X Aₖᵀ + Qₖ = 0 for the solution X of A X + X Aᵀ = C, while Aₖ converges
#     quadratically to sign(A) = -I; then X = Q∞ / 2. The scaling cₖ = |det Aₖ|^(-1/n) moves
#     the eigenvalues towards modulus 1, which saves the slow first steps when they are far
#     from it (Byers 1987). One inverse per step, O(n³), batched, unlike Bartels-Stewart,
#     which needs a Schur decomposition torch does not offer, or the Kronecker form, O(n⁶).
#     References: Solving the algebraic Riccati equation with the matrix sign function.
#     Ralph Byers, 1987. https://doi.org/10.1016/0024-3795(87)90118-5; Linear model
#     reduction and solution of the algebraic Riccati equation by use of the sign function.
#     J. D. Roberts, 1980 (report 1971). https://doi.org/10.1080/00207178008922881

_SIGN_ITERATIONS = 100


def solve_lyapunov(A: Tensor, C: Tensor) -> Tensor:
    """The solution ``X`` of the Lyapunov equation ``A X + X Aᵀ = C`` for a stable ``A``.

    ``A`` must be Hurwitz (every eigenvalue with a negative real part); the solution is then
    unique, symmetric when ``C`` is, and positive definite when ``-C`` is (the controllability
    Gramian ``∫ exp(tA) (-C) exp(tAᵀ) dt``). Solved with the matrix sign function, see Note
    [Lyapunov equation by the matrix sign function] in the source; the accuracy degrades as
    eigenvalues of ``A`` approach the imaginary axis. Differentiable.

    Args:
        A: real, shape ``(*, n, n)``, Hurwitz.
        C: shape ``(*, n, n)``.

    Raises:
        ValueError: the iteration does not converge to ``-I``: ``A`` is not Hurwitz (or is
            too close to the imaginary axis to tell).

    Example:
        >>> import torch
        >>> from tether.functional import solve_lyapunov
        >>> A = torch.tensor([[-1.0, 5.0], [0.0, -2.0]], dtype=torch.float64)
        >>> C = -torch.eye(2, dtype=torch.float64)
        >>> X = solve_lyapunov(A, C)
        >>> torch.allclose(A @ X + X @ A.mT, C)
        True
    """
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    # Newton converges quadratically: once a step changes Aₖ by less than sqrt(eps) (relative),
    # the next one lands at rounding level, and we stop after it.
    tolerance = (n * torch.finfo(A.dtype).eps) ** 0.5
    Ak, Qk = A, -C
    last = False
    for _ in range(_SIGN_ITERATIONS):
        inverse, info = torch.linalg.inv_ex(Ak)
        if bool((info != 0).any()):  # an eigenvalue reached 0: A had one on the imaginary axis
            break
        c = torch.exp(-torch.linalg.slogdet(Ak).logabsdet / n)[..., None, None]
        Ak_next = (c * Ak + inverse / c) / 2
        Qk = (c * Qk + inverse @ Qk @ inverse.mT / c) / 2
        change = torch.linalg.matrix_norm(Ak_next - Ak, ord=1)
        Ak = Ak_next
        if last:
            break
        last = bool((change <= tolerance * torch.linalg.matrix_norm(Ak, ord=1)).all())
    error = torch.linalg.matrix_norm(Ak + eye, ord=1).max() if A.numel() else A.new_zeros(())
    if not bool(error <= torch.finfo(A.dtype).eps ** 0.5):  # NaN included
        raise ValueError(
            "solve_lyapunov() needs a Hurwitz A (every eigenvalue with a negative real part): "
            f"the sign iteration ended {float(error):.2e} away from -I."
        )
    return Qk / 2
