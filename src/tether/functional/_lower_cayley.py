"""The orthogonal constraints' Cayley map, ``base @ cayley(tril(X) - tril(X)ᴴ)`` in one
autograd Function: its path, and closed forms for real 2 x 2 and 3 x 3 matrices."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from tether.functional._cayley import SCHUR_LEAF, _large_inverse, _matmul, _small_inverse, cayley
from tether.functional._small_matrices import (
    SMALL_BATCH,
    SMALL_SIZE,
    _entries,
    _entry_matmul,
    _matmul_into,
    _matrix,
    _reduce,
    _rows_into,
    _vmap_rule,
    angle_gradient,
    base_rows,
    batch_first,
    batch_last,
    composite_vjp,
    small_matmul,
    transposed_product_axis,
)
from tether.functional._traceable import traceable

__all__ = ["cayley_path", "lower_cayley"]

CayleyPath = Literal["closed_form", "small", "schur", "lapack"]

# Fewest matrices for which the closed forms of lower_cayley (real n = 2, 3) beat the
# batch-last path on a CPU, forward + backward with a base (measured at batches of 16 to
# 4096: the closed form for n = 3 is about 100 operations on vectors, a fixed cost that
# ties at 256 matrices and pays from 512 on).
CLOSED_FORM_MIN_BATCH = {2: SMALL_BATCH, 3: 512}


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
#     Their gradients need neither the base nor Q̄ = baseᵀ W̄: Q is orthogonal, so
#     dW = base dQ = W (Qᵀ dQ) with Qᵀ dQ skew, and ⟨W̄, dW⟩ = ⟨Wᵀ W̄, Qᵀ dQ⟩.
#         n = 2:  Qᵀ dQ = J dθ, J = [[0, -1], [1, 0]], so X̄₁₀ = ⟨W̄, W J⟩ / (1 + t).
#         n = 3:  with P = (I + [b]ₓ)⁻¹, Qᵀ dQ = 2 P [db]ₓ Pᵀ = [ω]ₓ, ω = 2 (db - [b]ₓ db)/(1 + t)
#                 (M [x]ₓ Mᵀ = [det(M) M⁻ᵀ x]ₓ and det(I + [b]ₓ) = 1 + t), so with
#                 v = ((WᵀW̄)₂₁ - (WᵀW̄)₁₂, (WᵀW̄)₀₂ - (WᵀW̄)₂₀, (WᵀW̄)₁₀ - (WᵀW̄)₀₁),
#                 ā = b̄/2 = (v + [b]ₓ v)/(1 + t).
#     Each entry of every matrix is one vector over the batch (as in Note [Closed forms of
#     small skew exponentials]): W = base Q is 27 multiply-adds of vectors and v 18, where
#     batched products and tril of (*, 3, 3) tensors run many times slower. The forward
#     keeps b, 1/(1 + t) and (n = 3) W's entries in rows, so that the backward transposes
#     only W̄; the base's rows are kept between calls (Note [The entries of a base point,
#     kept] in _small_matrices.py). Second derivatives (create_graph=True, torch.func
#     transforms) differentiate _lower_cayley_autograd, the composition of cayley() with
#     autograd's tril and product.


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
            return composite_vjp(_lower_cayley_autograd, X, base, grad)
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
    s2 = s * 2.0
    diagonal = s2 - 1.0  # (1 - t)/(1 + t)
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


def _saved_rows(n: int) -> int:
    """The rows of _RotationCayley's saved tensor: ``b`` and ``s``, then (n = 3) W's entries."""
    return 2 if n == 2 else 13


def _rotation_cayley_gradient(grad: Tensor, W: Tensor, saved: Tensor) -> list[Tensor | None]:
    """The entries of ``X̄`` (Note [The Cayley map of a lower triangle, with its base point]);
    ``None`` for zero."""
    if W.shape[-1] == 2:  # θ = 2 atan(a/2): dθ/da = s
        return [None, None, angle_gradient(grad, W).mul_(saved[1]), None]
    b1, b2, b3, s = saved[:4].unbind(0)
    g = _rows_into(grad.new_empty(9, s.shape[0]), grad)
    v1, v2, v3 = transposed_product_axis(saved[4:].unbind(0), g)
    # ā = s (v + [b]ₓ v), in operations on vectors (torch.linalg.cross along the rows of a
    # (3, B) tensor takes twice as long)
    a1 = (b2 * v3).addcmul_(b3, v2, value=-1.0).add_(v1).mul_(s)
    a2 = (b3 * v1).addcmul_(b1, v3, value=-1.0).add_(v2).mul_(s)
    a3 = (b1 * v2).addcmul_(b2, v1, value=-1.0).add_(v3).mul_(s)
    return [None, None, None, a3, None, None, a2.neg_(), a1, None]


def rotation_product(X: Tensor, base: Tensor | None, Q: list[Tensor], rows: Tensor) -> Tensor:
    """``W = base Q`` (``Q`` without a base) as ``(*, 3, 3)`` matrices from the entries of
    ``Q``, each entry of W summed in its row of ``rows`` (``(9, B)``, kept for the backward),
    then copied into its strided place in W (fresh memory for each would cost page faults)."""
    if torch.compiler.is_compiling():  # Dynamo rejects writes into rows and columns
        entries = Q if base is None else _entry_matmul(_entries(base.expand_as(X)), Q, 3)
        rows.copy_(torch.stack(entries))
        return _matrix(entries, X)
    W_rows = rows.unbind(0)
    if base is None:
        for row, entry in zip(W_rows, Q, strict=True):
            row.copy_(entry)
    else:
        P = base_rows(base, X).unbind(0)
        for i in range(3):
            for j in range(3):
                row = torch.mul(P[3 * i], Q[j], out=W_rows[3 * i + j])
                row.addcmul_(P[3 * i + 1], Q[3 + j]).addcmul_(P[3 * i + 2], Q[6 + j])
    return _matrix(W_rows, X)


class _RotationCayley(torch.autograd.Function):
    """:class:`_LowerCayley` for real ``n = 2, 3``, by closed forms; the second output keeps
    ``b``, ``s`` and the base's entries for the backward."""

    @staticmethod
    def forward(X: Tensor, base: Tensor | None) -> tuple[Tensor, Tensor]:
        n = X.shape[-1]
        saved = X.new_empty(_saved_rows(n), math.prod(X.shape[:-2]))
        Q = _rotation_cayley(X, saved)
        if n == 3:
            return rotation_product(X, base, Q, saved[4:]), saved
        if base is None:
            return _matrix(Q, X), saved
        return _matmul_into(torch.empty_like(X), _entries(base.expand_as(X)), Q, n), saved

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
            return composite_vjp(_lower_cayley_autograd, X, base, grad)
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
    saved = X.new_empty(_saved_rows(X.shape[-1]), math.prod(X.shape[:-2]))
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
