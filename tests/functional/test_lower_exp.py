"""The orthogonal constraints' exponential map on batches of 2 x 2 and 3 x 3 matrices,
``base @ exp(tril(X) - tril(X)ᵀ)`` in one Function (lower_exp), against the composition by
autograd: values, gradients, higher derivatives, vmap, compile, and no value read."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tether.functional._lower_exp import lower_exp, takes_lower_exp
from tether.functional._small_matrices import SMALL_BATCH

# torch's forward-mode AD loads its decompositions with torch.jit.script on first use, which
# warns that torch.jit.script is deprecated (torch's own code, not ours).
FORWARD_AD = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
# Dynamo instantiates the autograd.Function base class while tracing one (torch 2.13).
DYNAMO_FUNCTION = pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(SMALL_BATCH, 2, 2), (SMALL_BATCH, 3, 3), (4, 8, 3, 3)]


def composite(X: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """What lower_exp fuses: tril, the generator, matrix_exp and the product, by autograd."""
    L = X.tril()
    Q = torch.linalg.matrix_exp(L - L.mT)
    return Q if base is None else base @ Q


def orthogonal_like(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(torch.randn_like(X)).Q


@pytest.mark.parametrize(
    ("shape", "dtype", "takes"),
    [
        ((SMALL_BATCH, 2, 2), torch.float32, True),
        ((SMALL_BATCH, 3, 3), torch.float64, True),
        ((SMALL_BATCH - 1, 3, 3), torch.float32, False),
        ((SMALL_BATCH, 3, 3), torch.complex64, False),
        ((SMALL_BATCH, 4, 4), torch.float32, False),
        ((SMALL_BATCH, 3, 2), torch.float32, False),
    ],
    ids=str,
)
def test_takes_lower_exp_for_batches_of_real_2x2_and_3x3(shape, dtype, takes):
    assert takes_lower_exp(torch.empty(shape, dtype=dtype)) is takes


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 5.0])  # small angles, typical, several turns
def test_lower_exp_is_the_composition_value_and_gradients(shape, dtype, with_base, scale):
    X = torch.randn(shape, dtype=torch.float64) * scale
    base = orthogonal_like(X) if with_base else None
    cotangent = torch.randn(shape, dtype=torch.float64)
    results = []
    for f, cast in ((lower_exp, dtype), (composite, torch.float64)):
        leaf = X.to(cast).requires_grad_()
        base_leaf = None if base is None else base.to(cast).requires_grad_()
        W = f(leaf, base_leaf)
        (W * cotangent.to(cast)).sum().backward()
        results.append(
            (W.detach().double(), leaf.grad.double())
            + (() if base_leaf is None else (base_leaf.grad.double(),))
        )
    tolerance = 1e-5 * max(scale, 1.0) if dtype == torch.float32 else 1e-10 * max(scale, 1.0)
    torch.testing.assert_close(results[0], results[1], atol=tolerance, rtol=tolerance)


@FORWARD_AD
@pytest.mark.parametrize("shape", [(SMALL_BATCH, 2, 2), (SMALL_BATCH, 3, 3)], ids=str)
@pytest.mark.parametrize("scale", [1e-3, 1.0])
def test_lower_exp_gradcheck_gradgradcheck_and_forward_mode(shape, scale):
    X = (torch.randn(shape, dtype=torch.float64) * scale).requires_grad_()
    base = orthogonal_like(X.detach()).requires_grad_()
    assert torch.autograd.gradcheck(lower_exp, (X, base), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(lower_exp, (X, base))
    assert torch.autograd.gradcheck(lambda X: lower_exp(X), X, check_forward_ad=True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lower_exp_under_vmap_with_and_without_a_batched_base(shape):
    X = torch.randn(2, *shape, dtype=torch.float64)
    base = orthogonal_like(X[0])
    torch.testing.assert_close(torch.func.vmap(lower_exp, (0, None))(X, base), composite(X, base))
    bases = orthogonal_like(X)
    torch.testing.assert_close(torch.func.vmap(lower_exp)(X, bases), composite(X, bases))


def orthonormality_error(W: torch.Tensor) -> float:
    W = W.double()
    return (W.mT @ W - torch.eye(W.shape[-1], dtype=W.dtype)).abs().max().item()


@pytest.mark.parametrize("n", [2, 3])
def test_lower_exp_is_as_orthogonal_as_torchs_matrix_exp_in_float32(n):
    X = torch.randn(4096, n, n) * 3
    base = orthogonal_like(X)
    ours = orthonormality_error(lower_exp(X, base))
    theirs = orthonormality_error(composite(X, base))
    assert ours <= max(theirs, 16 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_lower_exp_reads_no_value_forward_or_backward(shape, mode):
    # Meta and fake tensors have no values: .item(), bool(tensor) or any data-dependent
    # branch (a host synchronisation on a GPU) raises there.
    with FakeTensorMode() if mode == "fake" else contextlib.nullcontext():
        device = "meta" if mode == "meta" else "cpu"
        X = torch.empty(shape, device=device, requires_grad=True)
        base = torch.empty(shape, device=device)
        W = lower_exp(X, base)
        (grad,) = torch.autograd.grad(W, X, torch.ones_like(W))
        assert W.shape == grad.shape == X.shape


@DYNAMO_FUNCTION
@pytest.mark.parametrize("shape", [(SMALL_BATCH, 2, 2), (SMALL_BATCH, 3, 3)], ids=str)
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_lower_exp_compiles_whole_and_matches_eager(shape, backend):
    torch._dynamo.reset()
    X = torch.randn(shape, dtype=torch.float64)
    base = orthogonal_like(X)
    cotangent = torch.randn_like(X)
    compiled = torch.compile(lower_exp, fullgraph=True, backend=backend)
    results = []
    for f in (compiled, lower_exp):
        leaf = X.clone().requires_grad_()
        W = f(leaf, base)
        (W * cotangent).sum().backward()
        results.append((W.detach(), leaf.grad))
    torch.testing.assert_close(results[0], results[1])
    torch._dynamo.reset()
