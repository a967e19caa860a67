"""Batches of many small matrices: the batch-last layout, and ``base @ Q`` in entries."""

from __future__ import annotations

import pytest
import torch

from tether.functional._small_matrices import SMALL_BATCH, base_product, batch_first, batch_last

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
