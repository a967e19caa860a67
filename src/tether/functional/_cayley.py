"""The Cayley map at the cost of one inverse, and helpers for batches of small matrices."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from tether.functional._traceable import traceable

__all__ = ["base_product", "cayley", "cayley_path", "lower_cayley"]

CayleyAlgorithm = Literal["auto", "lu"]
CayleyPath = Literal["closed_form", "small", "schur", "lapack"]

# Largest block that the Schur-complement recursion hands to LAPACK (Note [Block inversion
# by Schur complements]). Up to it LAPACK's inverse is as fast as the recursion on a CPU
# (measured from 32 to 128), above it slower.
SCHUR_LEAF = 64
# Batches of at least this many matrices of size at most SMALL_SIZE take the batch-last
# layout (Note [Batches of small matrices]); fewer are cheaper one LAPACK call at a time.
SMALL_BATCH = 32
SMALL_SIZE = 8
# Fewest matrices for which the closed forms of lower_cayley (real n = 2, 3) beat the
# batch-last path on a CPU, forward + backward (measured at batches of 16 to 4096: the
# closed form for n = 3 is some 150 operations on vectors, a fixed cost that pays from
# about 700 matrices on).
CLOSED_FORM_MIN_BATCH = {2: SMALL_BATCH, 3: 1024}


# Note [The Cayley map at the cost of one inverse]
#     cayley(A) = (I + A/2)(I - A/2)⁻¹ = 2 M⁻¹ - I with M = I - A/2, for any square A (the two
#     factors commute, and I + A/2 = 2I - M). The forward is one inverse; the derivative is
#     Q̇ = 2 M⁻¹ (Ȧ/2) M⁻¹ = W Ȧ W with W = M⁻¹ = (Q + I)/2, so the backward is two matrix
#     products, Ā = Wᴴ Q̄ Wᴴ (the conjugate transposes are PyTorch's convention for complex
#     gradients), and W comes from the output: _Cayley keeps Q and nothing else. torch's
#     solve(I - A/2, I + A/2) costs an LU and two triangular solves forward and as much again
#     backward, and LAPACK's triangular solves run at a fraction of a matrix product's speed.
#     The price: Q = 2 M⁻¹ - I doubles the rounding of M⁻¹, so Q is orthogonal to 2-3 times
#     the error of torch's solve for Q (10 eps rather than 4 in float32 at n = 256).
#     The skew part that A is built from (L - Lᴴ in the orthogonal constraint) is projected
#     by autograd, outside this map. The backward is written in differentiable operations on
#     Q, which is the output of the same Function, so second derivatives (create_graph=True,
#     torch.func.hessian) differentiate it again through this Function: no fallback needed.
#     Under torch.func.vmap the Function moves vmap's dimension into the batch (the map is
#     batched anyway). As for householder, forward mode nested in forward mode
#     (jacfwd(jacfwd(...))) is beyond torch.func over a custom Function: the inner
#     derivative comes out as if it were constant; jacfwd(jacrev(...)) is right.

# Note [Block inversion by Schur complements]
#     For M = [[P, R], [S, T]] with P and its Schur complement C = T - S P⁻¹ R invertible,
#     with X = P⁻¹ R and Y = S P⁻¹,
#         M⁻¹ = [[P⁻¹ + X C⁻¹ Y, -X C⁻¹], [-C⁻¹ Y, C⁻¹]],
#     five products of half the size and two inverses of half the size, recursively: about
#     0.8 of one product of size n in all (1.5 measured at n = 1024 on a CPU), where LAPACK's
#     LU-based inverse costs 3-4 (its triangular solves are slow), and a GPU runs products
#     best of all. The recursion does not pivot, which is safe when the Hermitian part of M
#     is positive definite: then so is that of every leading block and of every Schur
#     complement, none is singular. For M = I - A/2 with a skew A, the Hermitian part is I,
#     and P, C have Hermitian parts at least I, so ‖P⁻¹‖, ‖C⁻¹‖ <= 1: on skew matrices of
#     norm up to about 100 the inverse is as accurate as LAPACK's (measured in float32 and
#     float64 at n = 256 and 1024), and it loses a digit per factor of 10 beyond. For other
#     A, cayley(A, algorithm="lu"). Recursion and leaves are chosen from shapes alone:
#     nothing synchronises with the device.

# Note [Batches of small matrices]
#     A convolution kernel of shape (256, 256, 3, 3) is 65,536 matrices of 3 x 3. LAPACK
#     (and batched matrix products) treat them one at a time; elementwise operations on
#     (*, 3, 3) tensors iterate over an innermost dimension of 3. Both are slow: 10-15 ms
#     for an inverse on a CPU. In the batch-last layout (n, m, B), an entry of every matrix
#     is one contiguous vector of length B, so a 3 x 3 inverse by cofactors (the adjugate
#     over the determinant) is a few dozen operations on vectors (1 ms), and a product of
#     n x n matrices is n multiply-adds of (n, n, B) tensors. Matrices up to SMALL_SIZE are
#     inverted by the Schur recursion with those closed forms as leaves. The layout costs a
#     copy of the input and one of the output (given back in the usual layout, so that a
#     kernel can still be viewed as a matrix). On a CPU, fresh memory for a result costs
#     page faults that can take longer than the arithmetic on it: results are accumulated in
#     place wherever autograd does not record.


def batch_last(X: Tensor) -> Tensor:
    """``X`` of shape ``(*, n, m)`` as a contiguous ``(n, m, B)`` tensor, ``B`` the batch size.

    See Note [Batches of small matrices]; :func:`batch_first` undoes it.
    """
    return batch_last_view(X).contiguous()


def batch_last_view(X: Tensor) -> Tensor:
    """:func:`batch_last` without the copy: a strided view where it can be one."""
    n, m = X.shape[-2], X.shape[-1]
    return X.reshape(math.prod(X.shape[:-2]), n, m).permute(1, 2, 0)


def batch_first(X: Tensor, batch: tuple[int, ...]) -> Tensor:
    """The ``(*batch, n, m)`` view of a batch-last ``(n, m, B)`` tensor."""
    return X.permute(2, 0, 1).reshape(*batch, X.shape[0], X.shape[1])


def small_matmul(A: Tensor, B: Tensor, C: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """``C + alpha A B`` for batch-last ``(p, q, B)`` and ``(q, r, B)`` matrices, ``(p, r, B)``
    (``A B`` without ``C``): ``q`` multiply-adds of ``(p, r, B)`` tensors, into one new one."""
    if C is None:
        out, alpha = A[:, :1] * B[:1], 1.0
    else:
        out = torch.addcmul(C, A[:, :1], B[:1], value=alpha)
    # In place, unless autograd records (create_graph=True, torch.func transforms, where
    # backward passes may run under vmap, and addcmul_ has no batching rule).
    in_place = not torch.is_grad_enabled()
    for i in range(1, A.shape[1]):
        if in_place:
            out.addcmul_(A[:, i : i + 1], B[i : i + 1], value=alpha)
        else:
            out = torch.addcmul(out, A[:, i : i + 1], B[i : i + 1], value=alpha)
    return out


def takes_small_path(X: Tensor) -> bool:
    """Whether a batch of ``X``'s matrices is many and small enough for the batch-last layout."""
    return max(X.shape[-2:]) <= SMALL_SIZE and math.prod(X.shape[:-2]) >= SMALL_BATCH


def _small_inverse(M: Tensor) -> Tensor:
    """The inverse of batch-last ``(n, n, B)`` matrices: closed forms up to 3 x 3, Schur above.

    Each entry is accumulated in place: on a CPU, fresh memory costs page faults that take
    longer than the arithmetic on it.
    """
    n = M.shape[0]
    if n == 1:
        return M.reciprocal()
    if n == 2:
        (a, b), (c, d) = (row.unbind(0) for row in M.unbind(0))
        inverse = torch.stack([d, b, c, a])
        inverse[1:3].neg_()
        determinant = (a * d).addcmul_(b, c, value=-1.0)
    elif n == 3:
        entries = [row.unbind(0) for row in M.unbind(0)]

        def minor(i: int, j: int) -> Tensor:
            # The signed minor (cofactor) of entry (i, j), from cyclic shifts of the indices.
            r, s, t, u = (i + 1) % 3, (i + 2) % 3, (j + 1) % 3, (j + 2) % 3
            return (entries[r][t] * entries[s][u]).addcmul_(
                entries[r][u], entries[s][t], value=-1.0
            )

        # The adjugate: entry (i, j) is the cofactor of entry (j, i).
        cofactors = [[minor(j, i) for j in range(3)] for i in range(3)]
        determinant = entries[0][0] * cofactors[0][0]
        for j in (1, 2):
            determinant.addcmul_(entries[0][j], cofactors[j][0])
        inverse = torch.stack([c for row in cofactors for c in row])
    else:
        return _schur_inverse(M, _small_inverse, small_matmul, dims=(0, 1))
    return inverse.div_(determinant).view(n, n, -1)


def _leaf_inverse(M: Tensor) -> Tensor:
    # inv_ex: torch.linalg.inv checks for singular matrices, a synchronisation on a GPU.
    return torch.linalg.inv_ex(M)[0]


def _large_inverse(M: Tensor) -> Tensor:
    """The inverse of ``(*, n, n)`` matrices: LAPACK up to SCHUR_LEAF, Schur above."""
    if M.shape[-1] <= SCHUR_LEAF:
        return _leaf_inverse(M)
    if M.dim() > 3 or torch.compiler.is_compiling():
        return _schur_inverse(M, _large_inverse, _matmul, dims=(-2, -1))
    return _schur_inverse_into(M)


def _schur_inverse_into(M: Tensor) -> Tensor:
    """:func:`_schur_inverse` of one matrix or a batch, ``(n, n)`` or ``(B, n, n)``, with each
    block's product written into its place in the result (BLAS takes a block of a row-major
    matrix as it is): no concatenation, and fewer fresh matrices."""
    n = M.shape[-1]
    h = n // 2
    P, R = M[..., :h, :h], M[..., :h, h:]
    S, T = M[..., h:, :h], M[..., h:, h:]
    out = torch.empty_like(M, memory_format=torch.contiguous_format)
    P_inv = _large_inverse(P)
    X = P_inv @ R
    Y = S @ P_inv
    C_inv = _large_inverse(_matmul(S, X, T, -1.0))
    upper_right, lower_left = out[..., :h, h:], out[..., h:, :h]
    torch.matmul(X, C_inv, out=upper_right)  # X C⁻¹
    add_product = torch.baddbmm if M.dim() == 3 else torch.addmm
    add_product(P_inv, upper_right, Y, out=out[..., :h, :h])  # P⁻¹ + X C⁻¹ Y
    upper_right.neg_()
    torch.matmul(C_inv, Y, out=lower_left).neg_()
    out[..., h:, h:].copy_(C_inv)
    return out


def _schur_inverse(
    M: Tensor,
    inverse: Callable[[Tensor], Tensor],
    matmul: Callable[..., Tensor],
    dims: tuple[int, int],
) -> Tensor:
    """``M⁻¹`` by Note [Block inversion by Schur complements], the matrix in ``dims``.

    ``matmul(A, B, C, alpha)`` is ``C + alpha A B`` (``A B`` without ``C``).
    """
    rows, columns = dims
    n = M.shape[rows]
    h = n // 2

    def block(i: int, j: int) -> Tensor:
        return M.narrow(rows, i * h, h if i == 0 else n - h).narrow(
            columns, j * h, h if j == 0 else n - h
        )

    P_inv = inverse(block(0, 0))
    X = matmul(P_inv, block(0, 1))
    Y = matmul(block(1, 0), P_inv)
    C_inv = inverse(matmul(block(1, 0), X, block(1, 1), -1.0))
    XC = matmul(X, C_inv)
    upper = torch.cat([matmul(XC, Y, P_inv, 1.0), XC.neg_()], dim=columns)
    lower = torch.cat([matmul(C_inv, Y).neg_(), C_inv], dim=columns)
    return torch.cat([upper, lower], dim=rows)


def _matmul(
    A: Tensor, B: Tensor, C: Tensor | None = None, alpha: float = 1.0, beta: float = 1.0
) -> Tensor:
    """``beta C + alpha A B`` for ``(*, p, q)`` and ``(*, q, r)`` matrices (``A B`` without
    ``C``), fused where BLAS can: one pass over the result instead of two or three."""
    if C is None:
        return A @ B
    if A.dim() == 2:
        return torch.addmm(C, A, B, beta=beta, alpha=alpha)
    if A.dim() == 3:
        return torch.baddbmm(C, A, B, beta=beta, alpha=alpha)
    return torch.add(C * beta, A @ B, alpha=alpha)


def _cayley_forward(A: Tensor, algorithm: CayleyAlgorithm) -> Tensor:
    """``2 (I - A/2)⁻¹ - I`` (Note [The Cayley map at the cost of one inverse])."""
    if algorithm == "auto" and takes_small_path(A):
        M = batch_last(A) * -0.5
        M.diagonal(dim1=0, dim2=1).add_(1.0)
        Q = _small_inverse(M).mul_(2.0)
        Q.diagonal(dim1=0, dim2=1).sub_(1.0)
        return batch_first(Q, tuple(A.shape[:-2])).contiguous()
    M = A * -0.5
    M.diagonal(dim1=-2, dim2=-1).add_(1.0)
    Q = (_large_inverse(M) if algorithm == "auto" else _leaf_inverse(M)).mul_(2.0)
    Q.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return Q


def _cayley_vjp(Q: Tensor, grad: Tensor) -> Tensor:
    """``Wᴴ Q̄ Wᴴ`` with ``W = (Q + I)/2``, in differentiable operations."""
    # (Qᴴ + I) Q̄ (Qᴴ + I) / 4 in two fused products: T = Q̄ + Qᴴ Q̄, then (T + T Qᴴ) / 4.
    if takes_small_path(Q):
        Qh = batch_last(Q).transpose(0, 1).conj()
        grad = batch_last(grad)
        T = small_matmul(Qh, grad, grad)
        return batch_first(small_matmul(T, Qh, T).mul_(0.25), tuple(Q.shape[:-2]))
    Qh = Q.mH
    T = _matmul(Qh, grad, grad, alpha=0.5, beta=0.5)
    return _matmul(T, Qh, T, alpha=0.5, beta=0.5)


def _cayley_jvp(Q: Tensor, A_dot: Tensor) -> Tensor:
    """``W Ȧ W`` with ``W = (Q + I)/2``."""
    if takes_small_path(Q):
        Qb = batch_last(Q)
        A_dot = batch_last(A_dot)
        T = small_matmul(Qb, A_dot, A_dot)
        return batch_first(small_matmul(T, Qb, T).mul_(0.25), tuple(Q.shape[:-2]))
    T = _matmul(Q, A_dot, A_dot, alpha=0.5, beta=0.5)
    return _matmul(T, Q, T, alpha=0.5, beta=0.5)


class _Cayley(torch.autograd.Function):
    """``2 (I - A/2)⁻¹ - I``; see Note [The Cayley map at the cost of one inverse]."""

    @staticmethod
    def forward(A: Tensor, algorithm: CayleyAlgorithm) -> Tensor:
        return _cayley_forward(A, algorithm)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, None], A: Tensor, algorithm: Any) -> Any:
        # The map batches over leading dimensions: vmap's is one more of them.
        batched = A.movedim(in_dims[0] or 0, 0)
        return _Cayley.apply(batched, algorithm), 0  # type: ignore[no-untyped-call]  # untyped in torch

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (Q,) = ctx.saved_tensors
        return _cayley_vjp(Q, grad), None

    @staticmethod
    def jvp(ctx: Any, A_dot: Tensor, _: None) -> Tensor:
        (Q,) = ctx.saved_tensors
        return _cayley_jvp(Q, A_dot)


_CayleyTraceable = traceable(_Cayley)


def cayley(A: Tensor, *, algorithm: CayleyAlgorithm = "auto") -> Tensor:
    """The Cayley map ``(I + A/2)(I - A/2)⁻¹``: orthogonal (unitary) for skew ``A``.

    Cheaper than the exponential and a good retraction near the identity; it never reaches
    orthogonal matrices with eigenvalue -1. Computed as ``2 (I - A/2)⁻¹ - I``: one inverse
    forward and two matrix products backward (Note [The Cayley map at the cost of one
    inverse]), where ``torch.linalg.solve`` costs an LU and two triangular solves each way.

    With ``algorithm="auto"`` the inverse is formed by blocks, through Schur complements
    (Note [Block inversion by Schur complements]), mostly in matrix products: forward plus
    backward 2.1x faster than PyTorch's formulation at ``n = 256`` and 2.2x at 1024 on a CPU,
    with an orthogonality error 2-3 times larger (about 10 eps). Batches of many matrices up
    to 8 x 8 (convolution kernels) use closed forms in a batch-last layout (Note [Batches of
    small matrices]): 4.4x faster on the 65,536 matrices of 3 x 3 of a ``Conv2d(256, 256,
    3)``, 7.5x on those of 2 x 2 (``benchmarks/cayley.py``). The blocks are not
    pivoted, which needs ``I - A/2`` to have a positive definite Hermitian part: true for a
    skew (skew-Hermitian) ``A``, the Cayley map's use, and for any ``A`` whose Hermitian part
    is below ``2 I``. For any other ``A``, ``algorithm="lu"`` takes LAPACK's pivoted LU
    inverse (PyTorch's accuracy, at its forward cost). Either way the gradient is exact,
    second derivatives and forward-mode AD work, and nothing synchronises with the device.

    Args:
        A: shape ``(*, n, n)``, skew-symmetric (skew-Hermitian) for an orthogonal result.
        algorithm: ``"auto"`` or ``"lu"``, see above.

    Returns:
        ``Q``, shape ``(*, n, n)``, the dtype and device of ``A``.

    Raises:
        ValueError: ``A`` is not square, or ``algorithm`` is not one of the above.

    References:
        Cheap Orthogonal Constraints in Neural Networks: A Simple Parametrization of the
        Orthogonal and Unitary Group. Mario Lezcano-Casado, David Martínez-Rubio, 2019.
        https://arxiv.org/abs/1901.08428

        Accuracy and Stability of Numerical Algorithms (2nd ed.), chapter 13, Block LU
        Factorization. Nicholas J. Higham, 2002. https://doi.org/10.1137/1.9780898718027

    Example:
        >>> import torch
        >>> from tether.functional import cayley
        >>> X = torch.randn(3, 3, dtype=torch.float64)
        >>> Q = cayley(X - X.mT)
        >>> torch.allclose(Q.mT @ Q, torch.eye(3, dtype=torch.float64))
        True
    """
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"cayley() needs square matrices, shape (*, n, n); got shape {tuple(A.shape)}."
        )
    if algorithm not in ("auto", "lu"):
        raise ValueError(f"cayley(): `algorithm` must be 'auto' or 'lu'; got {algorithm!r}.")
    function = _CayleyTraceable if torch.compiler.is_compiling() else _Cayley
    Q: Tensor = function.apply(A, algorithm)  # type: ignore[no-untyped-call]  # untyped in torch
    return Q


# Note [The Cayley map of a lower triangle, with its base point]
#     The orthogonal constraints compute W = base · cayley(A) with A = L - Lᴴ, L = tril(X).
#     With M = I - A/2 and Z = base M⁻¹, W = 2 Z - base: the base joins the forward's
#     product, one fused addmm from M⁻¹. From dW = Z dA M⁻¹, the backward is
#     Ā = Zᴴ W̄ M⁻ᴴ, two products, with Z = (W + base)/2 read from the output; then
#     L̄ = Ā - Āᴴ and X̄ = tril(L̄) (and basē = W̄ Qᴴ, Q = 2 M⁻¹ - I, when the base is
#     trained). cayley() followed by base @ Q costs one product more backward (baseᴴ W̄) and
#     a few passes of autograd over n x n tensors for tril and the skew part. Forward keeps
#     M⁻¹ (in the layout it was computed in) beside the output. The transpose in Ā - Āᴴ
#     goes through a contiguous copy: torch's strided subtraction reads a transposed
#     1024 x 1024 operand at a fifth of the speed of its transposing copy.
#
#     For real n = 2 and 3, batched (convolution kernels), the map has a closed form.
#     With a = (A₂₁, A₀₂, A₁₀) the vector of A = [a]ₓ (n = 3), b = a/2 and t = |b|²,
#         cayley(A) = ((1 - t) I + 2 [b]ₓ + 2 b bᵀ) / (1 + t),
#     since (I - [b]ₓ)⁻¹ = I + ([b]ₓ + [b]ₓ²)/(1 + t) by [b]ₓ³ = -t [b]ₓ; for n = 2 it is the
#     rotation by θ = 2 atan(a/2), a = A₁₀: cos θ = (1 - t)/(1 + t), sin θ = a/(1 + t).
#     Their gradients, with Q̄ = baseᵀ W̄:
#         n = 2:  X̄₁₀ = ⟨W̄, W J⟩ / (1 + t),  J = [[0, -1], [1, 0]]  (dW = W J dθ),
#         n = 3:  ā = (v(Q̄) + (Q̄ + Q̄ᵀ) b - (⟨W̄, W⟩ + tr Q̄) b) / (1 + t),
#     v(Q̄) = (Q̄₂₁ - Q̄₁₂, Q̄₀₂ - Q̄₂₀, Q̄₁₀ - Q̄₀₁) the adjoint of b ↦ [b]ₓ, and
#     ⟨W̄, W⟩ = ⟨Q̄, Q⟩ = ((1 - t) tr Q̄ + 2 b·v(Q̄) + bᵀ(Q̄ + Q̄ᵀ) b)/(1 + t), from b alone.
#     Each entry of every matrix is one vector over the batch (as in Note [Closed forms of
#     small skew exponentials]), so that W = base Q and Q̄ are 27 multiply-adds of vectors,
#     where batched products and tril of (*, 3, 3) tensors run many times slower; the
#     forward keeps b, 1/(1 + t) and the base's entries (read once, in rows). Second
#     derivatives (create_graph=True, torch.func transforms) differentiate
#     _lower_cayley_autograd, the composition of cayley() with autograd's tril and product.


def cayley_path(device_type: str, n: int, dtype: torch.dtype, batch: int = 1) -> CayleyPath:
    """The path of :func:`lower_cayley` (and of ``cayley(..., algorithm="auto")``, but for
    ``"closed_form"``) for ``batch`` matrices of ``n x n`` and ``dtype`` on a device of type
    ``device_type``; pure, so that it can be tested for devices that are not at hand.

    - ``"closed_form"``: real ``n = 2, 3`` in batches of at least CLOSED_FORM_MIN_BATCH[n]
      on a CPU, of any size elsewhere (where the other paths would be cuSOLVER's);
    - ``"small"``: batches of at least SMALL_BATCH matrices up to SMALL_SIZE, batch-last;
    - ``"schur"``: ``n > SCHUR_LEAF``, the Schur recursion;
    - ``"lapack"``: anything else, one LAPACK inverse.
    """
    many = batch >= SMALL_BATCH
    closed_form = n in CLOSED_FORM_MIN_BATCH and not dtype.is_complex
    if closed_form and (device_type != "cpu" or batch >= CLOSED_FORM_MIN_BATCH[n]):
        return "closed_form"
    if n <= SMALL_SIZE and many:
        return "small"
    return "schur" if n > SCHUR_LEAF else "lapack"


def _path(X: Tensor) -> CayleyPath:
    return cayley_path(X.device.type, X.shape[-1], X.dtype, math.prod(X.shape[:-2]))


def _lower_cayley_autograd(X: Tensor, base: Tensor | None) -> Tensor:
    """:func:`lower_cayley` by :func:`cayley` and autograd (for second derivatives)."""
    L = X.tril()
    Q = cayley(L - L.mH)
    return Q if base is None else base @ Q


def _skew_part(G: Tensor, dims: tuple[int, int]) -> Tensor:
    """``G - Gᴴ``, the matrix in ``dims``, with a contiguous transposing copy (see Note [The
    Cayley map of a lower triangle, with its base point])."""
    return G - G.transpose(*dims).conj().contiguous()


class _LowerCayley(torch.autograd.Function):
    """``base · cayley(tril(X) - tril(X)ᴴ)`` and ``M⁻¹``; Note [The Cayley map of a lower
    triangle, with its base point]."""

    @staticmethod
    def forward(X: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        batch = tuple(X.shape[:-2])
        if _path(X) == "small":
            L = batch_last(X.tril())
            M = _skew_part(L, (0, 1)).mul_(-0.5)
            M.diagonal(dim1=0, dim2=1).add_(1.0)
            M_inv = _small_inverse(M)
            if base is None:
                W = M_inv * 2.0
                W.diagonal(dim1=0, dim2=1).sub_(1.0)
            else:
                base_last = batch_last(base.expand_as(X))
                W = small_matmul(base_last, M_inv, base_last * -0.5).mul_(2.0)
            return batch_first(W, batch).contiguous(), M_inv
        # M = I - (L - Lᴴ)/2 in two fresh matrices rather than four (Note [The Cayley map of
        # a lower triangle, with its base point]).
        M = torch.empty_like(X, memory_format=torch.contiguous_format).copy_(X.mH).triu_()
        M.sub_(X.tril()).mul_(0.5).diagonal(dim1=-2, dim2=-1).add_(1.0)
        M_inv = _large_inverse(M)
        if base is None:
            W = M_inv * 2.0
            W.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        else:
            W = _matmul(base.expand_as(X), M_inv, base.expand_as(X), alpha=2.0, beta=-1.0)
        return W, M_inv

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, int | None], X: Tensor, base: Tensor | None
    ) -> Any:
        return _vmap_rule(_LowerCayley, info, in_dims, X, base)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        W, M_inv = output
        ctx.mark_non_differentiable(M_inv)
        ctx.set_materialize_grads(False)
        # W only serves Z = (W + base)/2: without a base, Z = M⁻¹.
        ctx.save_for_backward(inputs[0], inputs[1], None if inputs[1] is None else W, M_inv)
        ctx.save_for_forward(inputs[0], inputs[1], M_inv)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, _: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None
        X, base, W, M_inv = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _composite_vjp(X, base, grad)
        batch = tuple(X.shape[:-2])
        if _path(X) == "small":
            G = batch_last(grad)
            Z = M_inv if base is None else batch_last(W + base).mul_(0.5)
            T = small_matmul(Z.transpose(0, 1).conj(), G)
            A_bar = small_matmul(T, M_inv.transpose(0, 1).conj())
            X_bar = batch_first(_skew_part(A_bar, (0, 1)), batch).tril()
            base_bar = None
            if base is not None and ctx.needs_input_grad[1]:
                Qh = M_inv.transpose(0, 1).conj()
                base_bar = batch_first(small_matmul(G, Qh, G * -0.5).mul_(2.0), batch)
            return X_bar, _reduce(base_bar, base)
        Z = M_inv if base is None else (W + base).mul_(0.5)
        T = Z.mH @ grad
        # Ā = T M⁻ᴴ, then tril(Ā - Āᴴ), in the memory of Z and T where they are fresh.
        A_bar = torch.matmul(T, M_inv.mH, out=torch.empty_like(T) if base is None else Z)
        X_bar = A_bar.sub_(T.copy_(A_bar.mH)).tril_()
        base_bar = None
        if base is not None and ctx.needs_input_grad[1]:
            base_bar = _matmul(grad, M_inv.mH, grad, alpha=2.0, beta=-1.0)
        return X_bar, _reduce(base_bar, base)

    @staticmethod
    def jvp(ctx: Any, X_dot: Tensor | None, base_dot: Tensor | None) -> tuple[Tensor, None]:
        X, base, M_inv = ctx.saved_tensors
        if _path(X) == "small":
            M_inv = batch_first(M_inv, tuple(X.shape[:-2]))
        return _lower_cayley_jvp(base, M_inv, X_dot, base_dot), None


def _lower_cayley_jvp(
    base: Tensor | None, M_inv: Tensor, X_dot: Tensor | None, base_dot: Tensor | None
) -> Tensor:
    """``Ẇ = Z Ȧ M⁻¹ + ḃase Q`` with ``Z = base M⁻¹``, ``Q = 2 M⁻¹ - I``."""
    Z = M_inv if base is None else base @ M_inv
    W_dot = torch.zeros_like(Z)
    if X_dot is not None:
        L_dot = X_dot.tril()
        W_dot = W_dot + Z @ (L_dot - L_dot.mH) @ M_inv
    if base_dot is not None:
        W_dot = W_dot + 2 * (base_dot @ M_inv) - base_dot
    return W_dot


def _composite_vjp(X: Tensor, base: Tensor | None, grad: Tensor) -> tuple[Tensor | None, ...]:
    """The vjp of :func:`_lower_cayley_autograd`: a gradient that can be differentiated again."""
    if base is None:
        return torch.func.vjp(lambda X: _lower_cayley_autograd(X, None), X)[1](grad)[0], None
    X_bar, base_bar = torch.func.vjp(_lower_cayley_autograd, X, base)[1](grad)
    return X_bar, base_bar


def _reduce(base_bar: Tensor | None, base: Tensor | None) -> Tensor | None:
    """``base_bar`` summed over the dimensions that ``base`` was broadcast along."""
    if base_bar is None or base is None or base_bar.shape == base.shape:
        return base_bar
    return base_bar.sum_to_size(base.shape)


def _vmap_rule(
    function: Any, info: Any, in_dims: tuple[int | None, int | None], X: Tensor, base: Any
) -> Any:
    """Run ``function`` with vmap's dimension as the first of the batch of both inputs."""
    size = info.batch_size
    X = X.movedim(in_dims[0], 0) if in_dims[0] is not None else X.expand(size, *X.shape)
    if base is not None:
        if in_dims[1] is not None:
            base = base.movedim(in_dims[1], 0)
        base = base.expand(X.shape)
    W, saved = function.apply(X, base)
    # What the backward keeps: batch-first (vmap's dimension first), or batch-last (among
    # the last dimension's).
    if saved.shape[:-2] == X.shape[:-2]:
        return (W, saved), (0, 0)
    return (W, saved.view(*saved.shape[:-1], size, -1)), (0, saved.dim() - 1)


def _entries(X: Tensor) -> list[Tensor]:
    """The ``n²`` entries of ``(*, n, n)`` matrices, row by row, each a strided vector over
    the batch."""
    return list(X.reshape(math.prod(X.shape[:-2]), X.shape[-1] * X.shape[-2]).unbind(-1))


def _rows_into(out: Tensor, X: Tensor) -> list[Tensor]:
    """The entries of ``X`` (as :func:`_entries`) in the rows of ``out``, contiguous: for
    entries read several times (a strided read costs about four contiguous ones)."""
    rows = X.reshape(out.shape[1], out.shape[0]).mT
    # A product with the identity transposes with BLAS's packing, at twice the speed of
    # torch's transposing copy.
    torch.mm(torch.eye(out.shape[0], dtype=X.dtype, device=X.device), rows, out=out)
    return list(out.unbind(0))


def _entry_matmul(
    P: Sequence[Tensor], Q: Sequence[Tensor], n: int, transpose: bool = False
) -> list[Tensor]:
    """The entries of ``P Q`` (``Pᵀ Q`` with ``transpose``) from those of ``n x n`` ``P``, ``Q``."""
    out = []
    for i in range(n):
        for j in range(n):
            terms = [(P[k * n + i] if transpose else P[i * n + k], Q[k * n + j]) for k in range(n)]
            entry = terms[0][0] * terms[0][1]
            for p, q in terms[1:]:
                entry.addcmul_(p, q)
            out.append(entry)
    return out


def _matmul_into(
    out: Tensor, P: Sequence[Tensor], Q: Sequence[Tensor], n: int, transpose: bool = False
) -> Tensor:
    """``out``, ``(*, n, n)``, set to ``P Q`` (``Pᵀ Q`` with ``transpose``) from the entries
    of ``P`` and ``Q``.

    Each entry is summed in one reused contiguous vector and copied into its strided place:
    fresh memory for each would cost page faults (Note [Batches of small matrices]).
    """
    if torch.compiler.is_compiling():  # Dynamo rejects writes into columns
        return out.copy_(_matrix(_entry_matmul(P, Q, n, transpose), out))
    columns = out.view(-1, n * n).unbind(-1)
    sum_ = torch.empty_like(Q[0])
    for i in range(n):
        for j in range(n):
            row = [P[k * n + i] if transpose else P[i * n + k] for k in range(n)]
            torch.mul(row[0], Q[j], out=sum_)
            for k in range(1, n):
                sum_.addcmul_(row[k], Q[k * n + j])
            columns[i * n + j].copy_(sum_)
    return out


# Note [Products of many small matrices]
#     A batched product of 65,536 matrices of 3 x 3 (torch.bmm, and its backward) takes
#     about 1.5 ms on a CPU, longer than the map it follows. In entries (Note [The Cayley
#     map of a lower triangle, with its base point]) it is 27 multiply-adds of vectors; its
#     backward, Q̄ = baseᵀ W̄, 27 more. The base is read in rows (a transposing product with
#     the identity) and kept for the backward.


def _rows(X: Tensor) -> Tensor:
    """The entries of ``(*, n, n)`` ``X`` as the contiguous rows of an ``(n², B)`` tensor."""
    out = X.new_empty(X.shape[-1] * X.shape[-2], math.prod(X.shape[:-2]))
    _rows_into(out, X)
    return out


class _SmallProduct(torch.autograd.Function):
    """``base @ Q`` for many small matrices; Note [Products of many small matrices]."""

    @staticmethod
    def forward(base: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
        n = Q.shape[-1]
        base_rows = _rows(base.expand_as(Q))
        out = torch.empty_like(Q, memory_format=torch.contiguous_format)
        return _matmul_into(out, base_rows.unbind(0), _rows(Q).unbind(0), n), base_rows

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, int | None], base: Tensor, Q: Tensor) -> Any:
        size = info.batch_size
        Q = Q.movedim(in_dims[1], 0) if in_dims[1] is not None else Q.expand(size, *Q.shape)
        base = base.movedim(in_dims[0], 0) if in_dims[0] is not None else base
        W, rows = _SmallProduct.apply(base.expand(Q.shape), Q)  # type: ignore[no-untyped-call]
        return (W, rows.view(rows.shape[0], size, -1)), (0, 1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], inputs[1], output[1])
        ctx.save_for_forward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, _: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None
        base, Q, base_rows = ctx.saved_tensors
        base_bar = None
        if ctx.needs_input_grad[0]:
            base_bar = _reduce(grad @ Q.mH, base)
        if not ctx.needs_input_grad[1]:
            return base_bar, None
        if torch.is_grad_enabled():  # a gradient to be differentiated again
            return base_bar, base.mH @ grad
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        Q_bar = _matmul_into(out, base_rows.unbind(0), _rows(grad).unbind(0), Q.shape[-1], True)
        return base_bar, Q_bar

    @staticmethod
    def jvp(ctx: Any, base_dot: Tensor | None, Q_dot: Tensor | None) -> tuple[Tensor, None]:
        base, Q = ctx.saved_tensors
        W_dot = torch.zeros_like(Q)
        if base_dot is not None:
            W_dot = W_dot + base_dot @ Q
        if Q_dot is not None:
            W_dot = W_dot + base @ Q_dot
        return W_dot, None


_SmallProductTraceable = traceable(_SmallProduct)


def base_product(base: Tensor, Q: Tensor) -> Tensor:
    """``base @ Q`` for square ``(*, n, n)`` matrices of the same shape; many matrices of 2 x 2
    and 3 x 3 by Note [Products of many small matrices], others by ``torch.matmul``.

    Example:
        >>> base, Q = torch.randn(40, 3, 3), torch.randn(40, 3, 3)
        >>> torch.allclose(base_product(base, Q), base @ Q, atol=1e-6)
        True
    """
    n = Q.shape[-1]
    if n not in (2, 3) or Q.is_complex() or math.prod(Q.shape[:-2]) < SMALL_BATCH:
        return base @ Q
    function: Any = _SmallProductTraceable if torch.compiler.is_compiling() else _SmallProduct
    W, _ = function.apply(base, Q)
    return W


def _rotation_cayley(X: Tensor, saved: Tensor) -> list[Tensor]:
    """The entries of ``cayley(tril(X) - tril(X)ᵀ)`` for real ``n = 2, 3``; ``b`` and
    ``s = 1/(1 + t)`` are written into the first rows of ``saved`` (Note [The Cayley map of a
    lower triangle, with its base point])."""
    x = _entries(X)
    if X.shape[-1] == 2:
        b, s = saved[0], saved[1]
        torch.mul(x[2], 0.5, out=b)
        t = b * b
        torch.add(t, 1.0, out=s).reciprocal_()
        c = t.neg_().add_(1.0).mul_(s)
        sine = torch.mul(b, s).mul_(2.0)
        return [c, -sine, sine, c]
    b1, b2, b3, s = saved[:4].unbind(0)
    torch.mul(x[7], 0.5, out=b1)
    torch.mul(x[6], -0.5, out=b2)
    torch.mul(x[3], 0.5, out=b3)
    t = (b1 * b1).addcmul_(b2, b2).addcmul_(b3, b3)
    torch.add(t, 1.0, out=s).reciprocal_()
    diagonal = t.neg_().add_(1.0).mul_(s)
    s2 = s * 2.0
    u1, u2, u3 = b1 * s2, b2 * s2, b3 * s2  # 2 s b
    p12, p13, p23 = u1 * b2, u1 * b3, u2 * b3  # 2 s bᵢ bⱼ
    return [
        torch.addcmul(diagonal, u1, b1),
        p12 - u3,
        p13 + u2,
        p12 + u3,
        torch.addcmul(diagonal, u2, b2),
        p23 - u1,
        p13 - u2,
        p23 + u1,
        torch.addcmul(diagonal, u3, b3),
    ]


def _saved_rows(n: int, with_base: bool) -> int:
    """The rows of _RotationCayley's saved tensor: ``b`` and ``s``, then (n = 3, with a base)
    the entries of the base."""
    return 2 if n == 2 else 4 + (9 if with_base else 0)


def _rotation_cayley_gradient(grad: Tensor, W: Tensor, saved: Tensor) -> list[Tensor | None]:
    """The entries of ``X̄`` (Note [The Cayley map of a lower triangle, with its base point]);
    ``None`` for zero."""
    n = W.shape[-1]
    if n == 2:
        g, w = _entries(grad), _entries(W)
        theta_bar = (g[0] * w[1]).addcmul_(g[2], w[3]).sub_(g[1] * w[0]).sub_(g[3] * w[2])
        return [None, None, theta_bar.mul_(saved[1]), None]
    b1, b2, b3, s = saved[:4].unbind(0)
    g = _rows_into(grad.new_empty(9, s.shape[0]), grad)
    q = _entry_matmul(saved[4:].unbind(0), g, 3, transpose=True) if saved.shape[0] > 4 else g
    s01, s02, s12 = q[1] + q[3], q[2] + q[6], q[5] + q[7]  # Q̄ = baseᵀ W̄, Q̄ + Q̄ᵀ
    v1, v2, v3 = q[7] - q[5], q[2] - q[6], q[3] - q[1]  # v(Q̄)
    u1 = torch.addcmul(s01 * b2, q[0], b1, value=2.0).addcmul_(s02, b3)  # u = (Q̄ + Q̄ᵀ) b
    u2 = torch.addcmul(s01 * b1, q[4], b2, value=2.0).addcmul_(s12, b3)
    u3 = torch.addcmul(s02 * b1, q[8], b3, value=2.0).addcmul_(s12, b2)
    # r = ⟨Q̄, Q⟩ + tr Q̄, with ⟨Q̄, Q⟩ = s ((1 - t) tr Q̄ + 2 b·v + b·u): Q itself not needed.
    trace = (q[0] + q[4]).add_(q[8])
    t = (b1 * b1).addcmul_(b2, b2).addcmul_(b3, b3)
    r = t.neg_().add_(1.0).mul_(trace)
    for b, v, u in ((b1, v1, u1), (b2, v2, u2), (b3, v3, u3)):
        r.addcmul_(b, v, value=2.0).addcmul_(b, u)
    r.mul_(s).add_(trace)
    a1, a2, a3 = (
        v.add_(u).addcmul_(r, b, value=-1.0).mul_(s)  # ā = s (v + u - r b)
        for v, u, b in ((v1, u1, b1), (v2, u2, b2), (v3, u3, b3))
    )
    return [None, None, None, a3, None, None, a2.neg_(), a1, None]


def _matrix(entries: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """The ``(*, n, n)`` matrices of the shape of ``like`` from their entries, row by row
    (``None`` for zero)."""
    if torch.compiler.is_compiling():  # Dynamo rejects writes into columns
        zero = torch.zeros_like(like.reshape(-1, like.shape[-1] ** 2)[:, 0])
        stacked = [zero if entry is None else entry for entry in entries]
        return torch.stack(stacked, dim=-1).reshape(like.shape)
    # Column by column: about a third of the time of torch.stack's pass.
    out = like.new_empty(like.shape).view(-1, len(entries))
    if any(entry is None for entry in entries):
        out.zero_()
    for column, entry in zip(out.unbind(-1), entries, strict=True):
        if entry is not None:
            column.copy_(entry)
    return out.view(like.shape)


class _RotationCayley(torch.autograd.Function):
    """:class:`_LowerCayley` for real ``n = 2, 3``, by closed forms; the second output keeps
    ``b``, ``s`` and the base's entries for the backward."""

    @staticmethod
    def forward(X: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        n = X.shape[-1]
        saved = X.new_empty(_saved_rows(n, base is not None), math.prod(X.shape[:-2]))
        Q = _rotation_cayley(X, saved)
        if base is None:
            return _matrix(Q, X), saved
        if n == 2:
            base_entries = _entries(base.expand_as(X))
        else:
            base_entries = _rows_into(saved[4:], base.expand_as(X))
        return _matmul_into(torch.empty_like(X), base_entries, Q, n), saved

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, int | None], X: Tensor, base: Tensor | None
    ) -> Any:
        return _vmap_rule(_RotationCayley, info, in_dims, X, base)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        W, saved = output
        ctx.mark_non_differentiable(saved)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0], inputs[1], W, saved)
        ctx.save_for_forward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, _: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None
        X, base, W, saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _composite_vjp(X, base, grad)
        X_bar = _matrix(_rotation_cayley_gradient(grad, W, saved), X)
        base_bar = None
        if base is not None and ctx.needs_input_grad[1]:
            base_bar = grad @ _rotation(X).mT
        return X_bar, _reduce(base_bar, base)

    @staticmethod
    def jvp(ctx: Any, X_dot: Tensor | None, base_dot: Tensor | None) -> tuple[Tensor, None]:
        X, base = ctx.saved_tensors
        M_inv = _rotation(X)
        M_inv.diagonal(dim1=-2, dim2=-1).add_(1.0)
        return _lower_cayley_jvp(base, M_inv.mul_(0.5), X_dot, base_dot), None


def _rotation(X: Tensor) -> Tensor:
    """``cayley(tril(X) - tril(X)ᵀ)`` for real ``n = 2, 3``, as matrices."""
    saved = X.new_empty(_saved_rows(X.shape[-1], False), math.prod(X.shape[:-2]))
    return _matrix(_rotation_cayley(X, saved), X)


_LowerCayleyTraceable = traceable(_LowerCayley)
_RotationCayleyTraceable = traceable(_RotationCayley)


def lower_cayley(X: Tensor, base: Tensor | None = None) -> Tensor:
    """``base @ cayley(L - Lᴴ)`` with ``L = tril(X)``, for square ``(*, n, n)`` ``X`` and
    ``base`` of the same shape (``cayley(L - Lᴴ)`` without it): the orthogonal constraints'
    Cayley map, in one autograd Function with one product fewer backward than the
    composition (Note [The Cayley map of a lower triangle, with its base point]).

    The path is :func:`cayley_path`'s; the gradient is exact, second derivatives and
    forward-mode AD work, and nothing synchronises with the device.

    Example:
        >>> X = torch.randn(4, 4, dtype=torch.float64)
        >>> base = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64)).Q
        >>> L = X.tril()
        >>> torch.allclose(lower_cayley(X, base), base @ cayley(L - L.mT))
        True
    """
    if _path(X) == "closed_form":
        function: Any = (
            _RotationCayleyTraceable if torch.compiler.is_compiling() else _RotationCayley
        )
    else:
        function = _LowerCayleyTraceable if torch.compiler.is_compiling() else _LowerCayley
    W, _ = function.apply(X, base)
    return W
