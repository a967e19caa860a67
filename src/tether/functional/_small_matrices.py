"""Batches of many small matrices: the batch-last layout, entries as vectors over the batch,
products in them, and the vmap and broadcasting rules of Functions of a matrix and a base."""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tether.functional._traceable import traceable

__all__ = ["base_product"]

# Batches of at least this many matrices of size at most SMALL_SIZE take the batch-last
# layout (Note [Batches of small matrices]); fewer are cheaper one LAPACK call at a time.
SMALL_BATCH = 32
SMALL_SIZE = 8


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


def transposed_product_axis(W: Sequence[Tensor], G: Sequence[Tensor]) -> list[Tensor]:
    """The axial vector of the skew part of ``Wᵀ G`` for 3 x 3 ``W``, ``G`` given by their
    entries (row by row): ``((WᵀG)₂₁ - (WᵀG)₁₂, (WᵀG)₀₂ - (WᵀG)₂₀, (WᵀG)₁₀ - (WᵀG)₀₁)``, in
    18 multiply-adds of vectors. With ``W = base Q``, ``Q`` orthogonal, ``dW = W (Qᵀ dQ)``
    and ``Qᵀ dQ = [ω]ₓ`` skew, so ``⟨G, dW⟩ = ω · transposed_product_axis(W, G)``: the
    gradient of a map onto SO(3) or O(3) without the base (Note [The Cayley map of a lower
    triangle, with its base point] in _lower_cayley.py)."""
    axis = []
    for i, j in ((2, 1), (0, 2), (1, 0)):
        entry = W[i] * G[j]
        entry.addcmul_(W[j], G[i], value=-1.0)
        for r in (3, 6):
            entry.addcmul_(W[r + i], G[r + j]).addcmul_(W[r + j], G[r + i], value=-1.0)
        axis.append(entry)
    return axis


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


def _reduce(base_bar: Tensor | None, base: Tensor | None) -> Tensor | None:
    """``base_bar`` summed over the dimensions that ``base`` was broadcast along."""
    if base_bar is None or base is None or base_bar.shape == base.shape:
        return base_bar
    return base_bar.sum_to_size(base.shape)


def composite_vjp(
    composite: Callable[[Tensor, Tensor | None], Tensor],
    X: Tensor,
    base: Tensor | None,
    grad: Tensor,
) -> tuple[Tensor | None, Tensor | None]:
    """The vjp of ``composite(X, base)``, a map written in differentiable operations: the
    gradient of a fused Function where it must be differentiated again (create_graph=True,
    torch.func transforms)."""
    if base is None:
        return torch.func.vjp(lambda X: composite(X, None), X)[1](grad)[0], None
    X_bar, base_bar = torch.func.vjp(composite, X, base)[1](grad)
    return X_bar, base_bar


def angle_gradient(grad: Tensor, W: Tensor) -> Tensor:
    """``⟨W̄, W J⟩`` for 2 x 2 ``W = base R(φ)`` and ``J = [[0, -1], [1, 0]]``: the gradient of
    the rotation angle φ, one vector over the batch (``dW = W J dφ``)."""
    g, w = _entries(grad), _entries(W)
    return (g[0] * w[1]).addcmul_(g[2], w[3]).sub_(g[1] * w[0]).sub_(g[3] * w[2])


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


# Note [Products of many small matrices]
#     A batched product of 65,536 matrices of 3 x 3 (torch.bmm, and its backward) takes
#     about 1.5 ms on a CPU, longer than the map it follows. In entries (Note [The Cayley
#     map of a lower triangle, with its base point] in _lower_cayley.py) it is 27
#     multiply-adds of vectors; its backward, Q̄ = baseᵀ W̄, 27 more. The base is read in rows
#     (a transposing product with the identity) and kept for the backward.


def _rows(X: Tensor) -> Tensor:
    """The entries of ``(*, n, n)`` ``X`` as the contiguous rows of an ``(n², B)`` tensor."""
    out = X.new_empty(X.shape[-1] * X.shape[-2], math.prod(X.shape[:-2]))
    _rows_into(out, X)
    return out


# Note [The entries of a base point, kept]
#     A base point changes only when it is written (update_base, a load, an optimizer step
#     when it is trained), but a map that reads it in rows transposes the whole weight at
#     every call: a tenth of the 3 x 3 Cayley map's time on a CPU. base_rows keeps each
#     base's rows while the base lives and computes them anew when its version counter or
#     its storage changes (every in-place operation bumps the version; writes through
#     .data do not, so a base that requires grad, which gradcheck perturbs that way, is
#     never kept). The kept rows cost the memory of one more copy of the base. Tensor
#     subclasses (fake and functorch tensors), inference tensors (no version counter) and
#     traced code take a fresh copy at every call.


class _RowsCache:
    """The rows of each base point read so far; Note [The entries of a base point, kept].

    Without a lock: getting, setting and popping one key of a dict are atomic, and two
    threads that compute the same rows at once only compute them twice.
    """

    def __init__(self) -> None:
        self._kept: dict[int, tuple[weakref.ref[Tensor], int, int, Tensor]] = {}

    def rows(self, base: Tensor) -> Tensor:
        if (
            torch.compiler.is_compiling()
            or type(base) not in (Tensor, torch.nn.Parameter)
            or base.requires_grad
            or base.is_inference()
        ):
            return _rows(base)
        key, version, address = id(base), base._version, base.data_ptr()
        kept = self._kept.get(key)
        if kept is not None and kept[0]() is base and kept[1:3] == (version, address):
            return kept[3]
        rows = _rows(base)
        reference = weakref.ref(base, functools.partial(self._forget, key))
        self._kept[key] = (reference, version, address, rows)
        return rows

    def _forget(self, key: int, reference: weakref.ref[Tensor]) -> None:
        # Called as the base is freed, before another tensor can take its id; an entry
        # written since for the same base (a new version) has a reference of its own.
        kept = self._kept.get(key)
        if kept is not None and kept[0] is reference:
            del self._kept[key]


_BASE_ROWS = _RowsCache()


def base_rows(base: Tensor, like: Tensor) -> Tensor:
    """The entries of ``base``, broadcast to ``like``'s ``(*, n, n)`` shape, as the
    contiguous rows of an ``(n², B)`` tensor, kept between calls where ``base`` has that
    shape (Note [The entries of a base point, kept]). The result must not be written; the
    call belongs where autograd does not record (an autograd Function's forward or backward)."""
    if base.shape != like.shape:
        return _rows(base.expand_as(like))
    return _BASE_ROWS.rows(base)


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
