"""The Householder map: compact WY form, torch's householder_product, and the reflector
loop for many small matrices, against householder_product; the path "auto" takes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tether.functional import householder
from tether.functional._householder import householder_path

REAL = [torch.float32, torch.float64]
# torch's forward-mode AD loads its decompositions with torch.jit.script on first use, which
# warns that torch.jit.script is deprecated (torch's own code, not ours).
FORWARD_AD = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


pytestmark = pytest.mark.usefixtures("one_thread")


def tolerance(dtype: torch.dtype, n: int) -> float:
    return 20 * math.sqrt(n) * torch.finfo(dtype).eps


def orthonormality_error(Q: torch.Tensor) -> float:
    Q = Q.double()
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (Q.mT @ Q - eye).abs().max().item()


def reference_householder(X: torch.Tensor) -> torch.Tensor:
    """The product of the reflectors by torch.linalg.householder_product, signs from diag X."""
    A = X.tril(-1)
    Q = torch.linalg.householder_product(A, 2.0 / (1.0 + (A * A).sum(dim=-2)))
    return Q * torch.where(X.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)


@st.composite
def talls(draw, max_n: int = 40):
    """A tall ``(*, n, k)`` matrix: Gaussian below the diagonal, scaled, any diagonal."""
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, n))
    dtype = draw(st.sampled_from(REAL))
    scale = draw(st.sampled_from([1e-3, 1.0 / math.sqrt(n), 1.0, 30.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    X = scale * torch.randn(*batch, n, k, dtype=dtype, generator=generator)
    diagonal = torch.randn(*batch, k, dtype=dtype, generator=generator)
    X.diagonal(dim1=-2, dim2=-1).copy_(diagonal)
    return X


@given(X=talls())
@pytest.mark.parametrize("algorithm", ["auto", "wy"])
def test_householder_agrees_with_householder_product(X, algorithm):
    Q = householder(X, algorithm=algorithm)
    assert Q.shape == X.shape and Q.dtype == X.dtype
    expected = reference_householder(X.double())
    assert (Q.double() - expected).abs().max().item() <= tolerance(X.dtype, X.shape[-2])


@given(X=talls())
def test_householder_has_orthonormal_columns(X):
    Q = householder(X, algorithm="wy")
    assert orthonormality_error(Q) <= tolerance(X.dtype, X.shape[-2])


@pytest.mark.parametrize("shape", [(256, 256), (1024, 64)], ids=str)
def test_householder_is_as_orthonormal_as_householder_product(shape):
    X = torch.randn(shape, generator=torch.Generator().manual_seed(0)) / math.sqrt(shape[0])
    X.diagonal().copy_(X.diagonal().sign())
    theirs = orthonormality_error(reference_householder(X))
    floor = math.sqrt(shape[0]) * torch.finfo(X.dtype).eps
    assert orthonormality_error(householder(X, algorithm="wy")) <= 1.5 * max(theirs, floor)


@FORWARD_AD
@pytest.mark.parametrize(
    "shape", [(1, 1), (4, 1), (5, 5), (7, 4), (2, 6, 3), (2, 2, 4, 4)], ids=str
)
def test_householder_gradcheck_and_gradgradcheck(shape):
    X = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def f(X):
        return householder(X, algorithm="wy")

    assert torch.autograd.gradcheck(f, X, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, X)


@pytest.mark.parametrize("shape", [(64, 64), (100, 30)], ids=str)
def test_householder_gradient_agrees_with_householder_product(shape):
    X = torch.randn(shape, dtype=torch.float64) / math.sqrt(shape[0])
    cotangent = torch.randn(shape, dtype=torch.float64)
    grads = []
    for f in (householder, reference_householder):
        Xr = X.clone().requires_grad_()
        (f(Xr) * cotangent).sum().backward()
        grads.append(Xr.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_householder_keeps_one_k_by_k_matrix_for_its_backward():
    # Peak memory: the input and one (k, k) matrix (plus two vectors) per matrix of the
    # batch, where householder_product keeps its input and its (n, k) output.
    X = torch.randn(2, 30, 10, dtype=torch.float64, requires_grad=True)
    Q = householder(X, algorithm="wy")
    saved = Q.grad_fn.saved_tensors
    assert any(t.data_ptr() == X.data_ptr() for t in saved)
    extra = sum(t.numel() for t in saved if t.data_ptr() != X.data_ptr())
    assert extra == 2 * (10 * 10 + 2 * 10)


@FORWARD_AD
def test_householder_under_vmap_jacrev_jacfwd_and_hessian():
    X = torch.randn(3, 6, 4, dtype=torch.float64)

    def f(X):
        return householder(X, algorithm="wy")

    torch.testing.assert_close(torch.func.vmap(f)(X), reference_householder(X))
    torch.testing.assert_close(
        torch.func.jacrev(f)(X[0]),
        torch.autograd.functional.jacobian(reference_householder, X[0]),  # torch's warns in vmap
    )
    torch.testing.assert_close(
        torch.func.jacfwd(f)(X[0]), torch.autograd.functional.jacobian(reference_householder, X[0])
    )
    torch.testing.assert_close(
        torch.autograd.functional.hessian(lambda X: f(X).pow(3).sum(), X[0]),
        torch.autograd.functional.hessian(lambda X: reference_householder(X).pow(3).sum(), X[0]),
    )


def test_householder_signs_come_from_the_diagonal():
    X = torch.randn(6, 4, dtype=torch.float64)
    X.diagonal().copy_(torch.tensor([0.3, -0.2, 5.0, -7.0]))  # |X[i, i]| < 1 keeps its column
    Q = householder(X, algorithm="wy")
    flipped = X.clone()
    flipped.diagonal().neg_()
    torch.testing.assert_close(householder(flipped, algorithm="wy"), -Q)
    unit = X.clone()
    unit.diagonal().copy_(unit.diagonal().sign())
    torch.testing.assert_close(Q, reference_householder(unit))


def test_householder_auto_is_householder_product_below_8_columns():
    X = torch.randn(2, 9, 7)
    assert torch.equal(householder(X), reference_householder(X))


# Batches of small matrices (Note [Householder reflectors one at a time])

SMALL_BATCHES = [(32, 1, 1), (32, 2, 2), (2, 32, 3, 3), (32, 5, 3), (32, 20, 7), (32, 9, 1)]
# Dynamo instantiates the autograd.Function base class while tracing one (torch 2.13).
DYNAMO_FUNCTION = pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
)


@pytest.mark.parametrize(
    ("shape", "grad_fn"),
    [
        ((32, 3, 3), "_SmallHouseholderBackward"),
        ((31, 3, 3), "LinalgHouseholderProductBackward0"),
        ((32, 9, 8), "_HouseholderBackward"),
    ],
    ids=str,
)
def test_householder_auto_takes_the_reflector_loop_for_many_small_matrices(shape, grad_fn):
    X = torch.randn(shape, requires_grad=True)
    Q = householder(X)
    names = set()
    node = Q.grad_fn
    while node is not None and node.next_functions:
        names.add(type(node).__name__)
        node = node.next_functions[0][0]
    assert grad_fn in names


@pytest.mark.parametrize("shape", SMALL_BATCHES, ids=str)
@pytest.mark.parametrize("dtype", REAL)
def test_householder_of_many_small_matrices_agrees_with_householder_product(shape, dtype):
    X = torch.randn(shape, dtype=dtype)
    X.diagonal(dim1=-2, dim2=-1).mul_(0.3)  # |X[i, i]| < 1: the signs still come from it
    Q = householder(X)
    assert Q.shape == X.shape and Q.dtype == dtype and Q.is_contiguous()
    expected = reference_householder(X.double())
    unit = X.double().clone()
    unit.diagonal(dim1=-2, dim2=-1).copy_(unit.diagonal(dim1=-2, dim2=-1).sign())
    expected = reference_householder(unit)
    assert (Q.double() - expected).abs().max().item() <= tolerance(dtype, shape[-2])


@FORWARD_AD
@pytest.mark.parametrize("shape", [(32, 1, 1), (32, 2, 2), (32, 3, 2), (4, 8, 3, 3)], ids=str)
def test_householder_of_many_small_matrices_gradcheck_and_gradgradcheck(shape):
    X = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(householder, X, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(householder, X)


@pytest.mark.parametrize("shape", SMALL_BATCHES, ids=str)
def test_householder_of_many_small_matrices_gradient_agrees_with_householder_product(shape):
    X = torch.randn(shape, dtype=torch.float64)
    X.diagonal(dim1=-2, dim2=-1).copy_(X.diagonal(dim1=-2, dim2=-1).sign())
    cotangent = torch.randn(shape, dtype=torch.float64)
    grads = []
    for f in (householder, reference_householder):
        leaf = X.clone().requires_grad_()
        (f(leaf) * cotangent).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])


@FORWARD_AD
def test_householder_of_many_small_matrices_under_vmap_jacrev_jacfwd_and_hessian():
    X = torch.randn(3, 32, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(householder)(X), reference_householder(X))
    one = X[0, :, :2, :2].contiguous()  # still a batch of 32, with a small Jacobian
    # (torch's own transforms warn in householder_product's backward, which has no batching
    # rule: the references come from torch.autograd.functional)
    expected = torch.autograd.functional.jacobian(reference_householder, one)
    torch.testing.assert_close(torch.func.jacrev(householder)(one), expected)
    torch.testing.assert_close(torch.func.jacfwd(householder)(one), expected)
    column = one[:, :, :1].contiguous()
    torch.testing.assert_close(
        torch.func.hessian(lambda X: householder(X).pow(3).sum())(column),
        torch.autograd.functional.hessian(lambda X: reference_householder(X).pow(3).sum(), column),
    )
    cotangent = torch.randn(32, 4, 3, dtype=torch.float64)

    def loss(f):
        return lambda X: (f(X) * cotangent).sum()

    # (householder_product's backward has no batching rule: its gradients one at a time)
    expected = torch.stack([torch.func.grad(loss(reference_householder))(x) for x in X])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss(householder)))(X), expected)


@pytest.mark.parametrize(
    ("shape", "algorithm"),
    [((32, 3, 3), "auto"), ((2, 9, 8), "wy"), ((40, 30), "wy"), ((2, 5, 3), "torch")],
    ids=str,
)
def test_householder_runs_on_the_meta_device_forward_and_backward(shape, algorithm):
    # Meta tensors have no values: a .item(), a bool(tensor) or any other read of a value
    # (a synchronisation on a GPU) raises there.
    X = torch.empty(shape, device="meta", requires_grad=True)
    Q = householder(X, algorithm=algorithm)
    assert Q.shape == X.shape and Q.device.type == "meta"
    (grad,) = torch.autograd.grad(Q, X, torch.empty_like(Q))
    assert grad.shape == X.shape


@DYNAMO_FUNCTION
@pytest.mark.parametrize("shape", [(32, 3, 3), (2, 9, 8)], ids=str)
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_householder_compiles_whole_and_matches_eager(shape, backend):
    # fullgraph=True fails on any graph break: data-dependent control flow or a read of a
    # value on the host among them.
    torch._dynamo.reset()
    X = torch.randn(shape, dtype=torch.float64)
    cotangent = torch.randn_like(X)
    compiled = torch.compile(householder, fullgraph=True, backend=backend)
    results = []
    for f in (compiled, householder):
        leaf = X.clone().requires_grad_()
        Q = f(leaf)
        (Q * cotangent).sum().backward()
        results.append((Q.detach(), leaf.grad))
    torch.testing.assert_close(results[0], results[1])
    torch._dynamo.reset()


def test_householder_rejects_complex_tensors():
    with pytest.raises(ValueError, match=r"householder\(\) needs a real tensor.*complex64"):
        householder(torch.randn(3, 2, dtype=torch.complex64))


def test_householder_rejects_an_unknown_algorithm():
    with pytest.raises(ValueError, match=r"'auto', 'wy', 'torch'; got 'qr'"):
        householder(torch.randn(3, 2), algorithm="qr")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("device_type", "k", "batch", "path"),
    [
        ("cpu", 3, 32, "loop"),
        ("cpu", 7, 65536, "loop"),
        ("cpu", 3, 31, "torch"),
        ("cpu", 8, 32, "wy"),
        ("cpu", 256, 1, "wy"),
        ("cuda", 3, 65536, "loop"),
        ("cuda", 1024, 1, "wy"),
    ],
)
def test_householder_path_depends_on_columns_and_batch(device_type, k, batch, path):
    assert householder_path(device_type, k, batch) == path
