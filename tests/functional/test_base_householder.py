"""``base @ householder(X)`` for many small kernels (the orthogonal constraint's product),
against the product with householder_product's result."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tether.functional._base_householder import base_householder

REAL = [torch.float32, torch.float64]
# torch's forward-mode AD loads its decompositions with torch.jit.script on first use, which
# warns that torch.jit.script is deprecated (torch's own code, not ours).
FORWARD_AD = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
# Dynamo instantiates the autograd.Function base class while tracing one (torch 2.13).
DYNAMO_FUNCTION = pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tolerance(dtype: torch.dtype, n: int) -> float:
    return 20 * math.sqrt(n) * torch.finfo(dtype).eps


def reference_householder(X: torch.Tensor) -> torch.Tensor:
    """The product of the reflectors by torch.linalg.householder_product, signs from diag X."""
    A = X.tril(-1)
    Q = torch.linalg.householder_product(A, 2.0 / (1.0 + (A * A).sum(dim=-2)))
    return Q * torch.where(X.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)


BASE_SHAPES = [(32, 2, 2), (32, 3, 3), (4, 8, 3, 3)]


def orthogonal_like(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(torch.randn_like(X)).Q


@pytest.mark.parametrize("shape", BASE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", REAL)
def test_base_householder_is_the_product_with_the_base(shape, dtype):
    X = torch.randn(shape, dtype=dtype)
    X.diagonal(dim1=-2, dim2=-1).mul_(0.3)  # signs from |X[i, i]| < 1 too
    base = orthogonal_like(X)
    W = base_householder(X, base)
    assert W.shape == X.shape and W.dtype == dtype and W.is_contiguous()
    expected = base.double() @ reference_householder(X.double())
    assert (W.double() - expected).abs().max().item() <= tolerance(dtype, shape[-1])


@FORWARD_AD
@pytest.mark.parametrize("shape", BASE_SHAPES, ids=str)
def test_base_householder_gradcheck_gradgradcheck_and_vmap(shape):
    X = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    base = orthogonal_like(X.detach()).requires_grad_()
    assert torch.autograd.gradcheck(base_householder, (X, base), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(base_householder, (X, base))
    Xs = torch.randn(2, *shape, dtype=torch.float64)
    torch.testing.assert_close(
        torch.func.vmap(base_householder, (0, None))(Xs, base.detach()),
        base.detach() @ reference_householder(Xs),
    )


@pytest.mark.parametrize("shape", [(32, 3, 3), (5, 3, 3), (2, 4, 4)], ids=str)
@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_base_householder_reads_no_value_forward_or_backward(shape, mode):
    # No value to read on meta and fake tensors: a host synchronisation would raise.
    with FakeTensorMode() if mode == "fake" else contextlib.nullcontext():
        device = "meta" if mode == "meta" else "cpu"
        X = torch.empty(shape, device=device, requires_grad=True)
        W = base_householder(X, torch.empty(shape, device=device))
        (grad,) = torch.autograd.grad(W, X, torch.ones_like(W))
        assert W.shape == grad.shape == X.shape


@DYNAMO_FUNCTION
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_base_householder_compiles_whole_and_matches_eager(backend):
    torch._dynamo.reset()
    X = torch.randn(32, 3, 3, dtype=torch.float64)
    base = orthogonal_like(X)
    cotangent = torch.randn_like(X)
    compiled = torch.compile(base_householder, fullgraph=True, backend=backend)
    results = []
    for f in (compiled, base_householder):
        leaf = X.clone().requires_grad_()
        W = f(leaf, base)
        (W * cotangent).sum().backward()
        results.append((W.detach(), leaf.grad))
    torch.testing.assert_close(results[0], results[1])
    torch._dynamo.reset()
