"""Batches of many small matrices: the batch-last layout, and ``base @ Q`` in entries."""

from __future__ import annotations

import gc

import pytest
import torch

from tether.functional import _small_matrices
from tether.functional._small_matrices import (
    SMALL_BATCH,
    base_product,
    base_rows,
    batch_first,
    batch_last,
)

# torch's forward-mode AD loads its decompositions with torch.jit.script on first use, which
# warns that torch.jit.script is deprecated (torch's own code, not ours).
FORWARD_AD = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_batch_first_undoes_batch_last():
    X = torch.randn(2, 3, 4, 5)
    assert batch_last(X).shape == (4, 5, 6)
    assert torch.equal(batch_first(batch_last(X), (2, 3)), X)


@FORWARD_AD
@pytest.mark.parametrize("shape", [(SMALL_BATCH, 2, 2), (SMALL_BATCH, 3, 3), (5, 3, 3)], ids=str)
def test_base_product_value_and_derivatives(shape):
    base = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    Q = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(base_product(base, Q), base @ Q)
    assert torch.autograd.gradcheck(base_product, (base, Q), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(base_product, (base, Q))
    batched = torch.randn(2, *shape, dtype=torch.float64)
    torch.testing.assert_close(
        torch.func.vmap(base_product, (None, 0))(base.detach(), batched), base.detach() @ batched
    )


def rows_of(base: torch.Tensor) -> torch.Tensor:
    return base.reshape(-1, base.shape[-1] * base.shape[-2]).mT


def test_base_rows_are_kept_until_the_base_is_written():
    base = torch.randn(40, 3, 3)
    rows = base_rows(base, base)
    assert torch.equal(rows, rows_of(base)) and rows.is_contiguous()
    assert base_rows(base, base) is rows
    with torch.no_grad():
        base.mul_(2.0)
    moved = base_rows(base, base)
    assert moved is not rows and torch.equal(moved, rows_of(base))
    base.set_(torch.randn(40, 3, 3))  # a new storage
    assert torch.equal(base_rows(base, base), rows_of(base))


@pytest.mark.parametrize("kind", ["requires_grad", "inference", "broadcast"])
def test_base_rows_are_computed_afresh_where_a_write_could_go_unseen(kind):
    # gradcheck perturbs inputs through .data, which keeps the version counter; inference
    # tensors have none; a broadcast base is a new view at every call.
    like = torch.randn(40, 3, 3)
    if kind == "requires_grad":
        base = torch.randn(40, 3, 3, requires_grad=True)
    elif kind == "inference":
        with torch.inference_mode():
            base = torch.randn(40, 3, 3)
    else:
        base = torch.randn(3, 3)
    with torch.no_grad():  # as inside the maps' autograd Functions
        first = base_rows(base, like)
        assert base_rows(base, like) is not first
        torch.testing.assert_close(first, rows_of(base.expand_as(like)))
        if kind == "requires_grad":
            base.data.add_(1.0)
            torch.testing.assert_close(base_rows(base, like), rows_of(base))


def test_kept_rows_go_with_their_base():
    base = torch.randn(40, 3, 3)
    base_rows(base, base)
    key = id(base)
    assert key in _small_matrices._BASE_ROWS._kept
    del base
    gc.collect()
    assert key not in _small_matrices._BASE_ROWS._kept
