"""The orthogonal constraints' Cayley map, ``base @ cayley(tril(X) - tril(X)ᴴ)`` in one
Function (lower_cayley), against the composition by autograd, and the path it takes."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tether.functional import _cayley, _lower_cayley, _small_matrices, cayley
from tether.functional._cayley import SCHUR_LEAF
from tether.functional._lower_cayley import CLOSED_FORM_MIN_BATCH, cayley_path, lower_cayley
from tether.functional._small_matrices import SMALL_BATCH, SMALL_SIZE

DOUBLE = [torch.float64, torch.complex128]
# torch's forward-mode AD loads its decompositions with torch.jit.script on first use, which
# warns that torch.jit.script is deprecated (torch's own code, not ours).
FORWARD_AD = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
# Dynamo instantiates the autograd.Function base class while tracing one (torch 2.13).
DYNAMO_FUNCTION = pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
)


pytestmark = pytest.mark.usefixtures("one_thread")


def theirs(A: torch.Tensor) -> torch.Tensor:
    """PyTorch's Cayley map, as in torch.nn.utils.parametrizations.orthogonal."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye - A / 2, eye + A / 2)


def orthonormality_error(Q: torch.Tensor) -> float:
    Q = Q.to(torch.complex128 if Q.is_complex() else torch.float64)
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (Q.mH @ Q - eye).abs().max().item()


# One shape per path of lower_cayley (cayley_path), with the dtypes that reach it.
LOWER_PATHS = {
    "closed_form-2": ((SMALL_BATCH, 2, 2), [torch.float64]),
    "closed_form-3": ((2, CLOSED_FORM_MIN_BATCH[3] // 2, 3, 3), [torch.float64]),
    "small-3": ((SMALL_BATCH, 3, 3), DOUBLE),
    "small-5": ((SMALL_BATCH, 5, 5), DOUBLE),
    "lapack": ((5, 5), DOUBLE),
    "lapack-batch": ((3, 4, 4), DOUBLE),
    "schur": ((97, 97), DOUBLE),
}
LOWER_CASES = [(path, dtype) for path, (_, dtypes) in LOWER_PATHS.items() for dtype in dtypes]


def composite(X: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """What lower_cayley fuses: tril, the skew part, cayley and the product, by autograd."""
    L = X.tril()
    Q = cayley(L - L.mH)
    return Q if base is None else base @ Q


def orthogonal_like(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(torch.randn_like(X)).Q


@pytest.mark.parametrize(
    ("device_type", "n", "dtype", "batch", "path"),
    [
        ("cpu", 2, torch.float32, SMALL_BATCH, "closed_form"),
        ("cpu", 3, torch.float64, 65536, "closed_form"),
        ("cpu", 3, torch.float32, CLOSED_FORM_MIN_BATCH[3], "closed_form"),
        ("cpu", 3, torch.float32, CLOSED_FORM_MIN_BATCH[3] - 1, "small"),
        ("cpu", 3, torch.float32, SMALL_BATCH - 1, "lapack"),
        ("cpu", 3, torch.complex64, SMALL_BATCH, "small"),
        ("cpu", 1, torch.float32, SMALL_BATCH, "small"),
        ("cpu", SMALL_SIZE, torch.float32, SMALL_BATCH, "small"),
        ("cpu", SMALL_SIZE + 1, torch.float32, SMALL_BATCH, "lapack"),
        ("cpu", SCHUR_LEAF, torch.float32, 1, "lapack"),
        ("cpu", SCHUR_LEAF + 1, torch.float32, 1, "schur"),
        ("cuda", 3, torch.float32, 1, "closed_form"),
        ("cuda", 3, torch.complex64, 1, "lapack"),
        ("cuda", 1024, torch.float32, 1, "schur"),
    ],
)
def test_cayley_path_depends_on_device_size_dtype_and_batch(device_type, n, dtype, batch, path):
    assert cayley_path(device_type, n, dtype, batch) == path


@pytest.mark.parametrize(("path", "dtype"), LOWER_CASES, ids=str)
@pytest.mark.parametrize("with_base", [True, False])
def test_lower_cayley_is_the_composition_value_and_gradients(path, dtype, with_base):
    shape = LOWER_PATHS[path][0]
    X = torch.randn(shape, dtype=dtype) * 2
    base = orthogonal_like(X) if with_base else None
    cotangent = torch.randn(shape, dtype=dtype)
    results = []
    for f in (lower_cayley, composite):
        leaf = X.clone().requires_grad_()
        base_leaf = None if base is None else base.clone().requires_grad_()
        W = f(leaf, base_leaf)
        (W * cotangent.conj()).real.sum().backward()
        results.append((W.detach(), leaf.grad, None if base is None else base_leaf.grad))
    # (a weight with its base comes out row-major; without one, LAPACK's inverse is
    # column-major, as cayley's)
    assert results[0][0].is_contiguous() or base is None
    torch.testing.assert_close(results[0], results[1])


# Each path on matrices small enough for gradgradcheck: the thresholds lowered, so that a
# batch of 2 is "many" and a 9 x 9 matrix takes the recursion.
GRADCHECK_LOWER = {
    "closed_form": [((2, 2, 2), torch.float64), ((2, 3, 3), torch.float64)],
    "small": [((2, 3, 3), torch.complex128), ((2, 4, 4), torch.float64)],
    "lapack": [((4, 4), torch.float64), ((3, 3), torch.complex128)],
    "schur": [((9, 9), torch.float64), ((9, 9), torch.complex128)],
}


@FORWARD_AD
@pytest.mark.parametrize(
    ("path", "shape", "dtype"),
    [(path, *case) for path, cases in GRADCHECK_LOWER.items() for case in cases],
    ids=str,
)
def test_lower_cayley_gradcheck_and_gradgradcheck(path, shape, dtype, monkeypatch):
    # Each module that reads a threshold holds its own name for it.
    monkeypatch.setattr(_small_matrices, "SMALL_BATCH", 2)
    monkeypatch.setattr(_lower_cayley, "SMALL_BATCH", 2)
    monkeypatch.setattr(_lower_cayley, "CLOSED_FORM_MIN_BATCH", {2: 2, 3: 2})
    monkeypatch.setattr(_cayley, "SCHUR_LEAF", 4)
    monkeypatch.setattr(_lower_cayley, "SCHUR_LEAF", 4)
    batch = math.prod(shape[:-2])
    assert cayley_path("cpu", shape[-1], dtype, batch) == path
    X = torch.randn(shape, dtype=dtype, requires_grad=True)
    base = orthogonal_like(X.detach()).requires_grad_()
    assert torch.autograd.gradcheck(lower_cayley, (X, base), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(lower_cayley, (X, base))
    assert torch.autograd.gradcheck(lambda X: lower_cayley(X), X, check_forward_ad=True)


@pytest.mark.parametrize(("path", "dtype"), LOWER_CASES, ids=str)
def test_lower_cayley_under_vmap_with_and_without_a_batched_base(path, dtype):
    shape = LOWER_PATHS[path][0]
    X = torch.randn(2, *shape, dtype=dtype)
    base = orthogonal_like(X[0])
    torch.testing.assert_close(
        torch.func.vmap(lower_cayley, (0, None))(X, base), composite(X, base)
    )
    bases = orthogonal_like(X)
    torch.testing.assert_close(torch.func.vmap(lower_cayley)(X, bases), composite(X, bases))


@pytest.mark.parametrize("shape", [(5, 5), (97, 97), (SMALL_BATCH, 3, 3)], ids=str)
def test_lower_cayley_leaves_a_column_major_input_alone(shape):
    # LAPACK's inverses are column-major: the weight of one constraint can be the next one's
    # input (a helper appended after itself), and its transpose is then contiguous.
    X = torch.randn(shape, dtype=torch.float64).mT
    before = X.clone()
    lower_cayley(X)
    assert torch.equal(X, before)


@pytest.mark.parametrize("n", [256, 1024])
def test_lower_cayley_is_as_orthogonal_as_the_composition(n):
    X = torch.randn(n, n) / math.sqrt(n)
    base = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q.float()
    floor = math.sqrt(n) * torch.finfo(torch.float32).eps
    reference = orthonormality_error(base @ theirs(X.tril() - X.tril().mT))
    assert orthonormality_error(lower_cayley(X, base)) <= 1.5 * max(reference, floor)


@pytest.mark.parametrize(("path", "dtype"), LOWER_CASES, ids=str)
@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_lower_cayley_reads_no_value_forward_or_backward(path, dtype, mode):
    # Meta and fake tensors have no values: .item(), bool(tensor) or any data-dependent
    # branch (a host synchronisation on a GPU) raises there.
    shape = LOWER_PATHS[path][0]
    with FakeTensorMode() if mode == "fake" else contextlib.nullcontext():
        device = "meta" if mode == "meta" else "cpu"
        X = torch.empty(shape, dtype=dtype, device=device, requires_grad=True)
        base = torch.empty(shape, dtype=dtype, device=device)
        W = lower_cayley(X, base)
        (grad,) = torch.autograd.grad(W, X, torch.ones_like(W))
        assert W.shape == grad.shape == X.shape


@DYNAMO_FUNCTION
@pytest.mark.parametrize("path", ["closed_form-3", "small-5", "lapack", "schur"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_lower_cayley_compiles_whole_and_matches_eager(path, backend):
    torch._dynamo.reset()
    shape = LOWER_PATHS[path][0]
    X = torch.randn(shape, dtype=torch.float64)
    base = orthogonal_like(X)
    cotangent = torch.randn_like(X)
    compiled = torch.compile(lower_cayley, fullgraph=True, backend=backend)
    results = []
    for f in (compiled, lower_cayley):
        leaf = X.clone().requires_grad_()
        W = f(leaf, base)
        (W * cotangent).sum().backward()
        results.append((W.detach(), leaf.grad))
    torch.testing.assert_close(results[0], results[1])
    torch._dynamo.reset()
