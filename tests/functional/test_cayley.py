"""The Cayley map: one inverse forward (Schur complements, closed forms for small batches),
two products backward, against torch's ``solve(I - A/2, I + A/2)``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tether.functional import cayley
from tether.functional._cayley import SCHUR_LEAF, _large_inverse, _small_inverse
from tether.functional._small_matrices import (
    SMALL_BATCH,
    batch_first,
    batch_last,
    takes_small_path,
)

DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]
DOUBLE = [torch.float64, torch.complex128]
# torch's forward-mode AD loads its decompositions with torch.jit.script on first use, which
# warns that torch.jit.script is deprecated (torch's own code, not ours).
FORWARD_AD = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
# Dynamo instantiates the autograd.Function base class while tracing one (torch 2.13).
DYNAMO_FUNCTION = pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
)
# One shape per path of algorithm="auto": LAPACK's inverse, the Schur recursion (with an
# odd split), a batch of small matrices (closed forms, and the recursion on them).
PATHS = {
    "lapack": (5, 5),
    "lapack-batch": (4, 3, 3),
    "schur": (97, 97),
    "schur-batch": (2, 60, 60),
    "small-1": (SMALL_BATCH, 1, 1),
    "small-2": (SMALL_BATCH, 2, 2),
    "small-3": (2, SMALL_BATCH, 3, 3),
    "small-5": (SMALL_BATCH, 5, 5),
    "small-8": (SMALL_BATCH, 8, 8),
}
# Small enough for gradcheck and gradgradcheck in a second or so.
GRADCHECK_PATHS = ["lapack", "lapack-batch", "small-1", "small-2", "small-3", "small-5"]

pytestmark = pytest.mark.usefixtures("one_thread")


def tolerance(dtype: torch.dtype, n: int) -> float:
    return 50 * math.sqrt(n) * torch.finfo(dtype).eps


def skew(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0, device="cpu"):
    """A skew (skew-Hermitian) matrix with a spectral norm of about ``2 scale``."""
    X = torch.randn(shape, dtype=dtype, device=device) * (scale / math.sqrt(shape[-1]))
    return X - X.mH


def theirs(A: torch.Tensor) -> torch.Tensor:
    """PyTorch's Cayley map, as in torch.nn.utils.parametrizations.orthogonal."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye - A / 2, eye + A / 2)


def orthonormality_error(Q: torch.Tensor) -> float:
    Q = Q.to(torch.complex128 if Q.is_complex() else torch.float64)
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (Q.mH @ Q - eye).abs().max().item()


# The paths "auto" takes


@pytest.mark.parametrize(
    ("shape", "small"),
    [
        ((SMALL_BATCH, 3, 3), True),
        ((SMALL_BATCH - 1, 3, 3), False),
        ((4, 8, SMALL_BATCH, 8, 8), True),
        ((SMALL_BATCH, 9, 9), False),
        ((3, 3), False),
    ],
    ids=str,
)
def test_small_path_is_for_many_small_matrices(shape, small):
    assert takes_small_path(torch.empty(shape)) == small


@pytest.mark.parametrize("n", [SCHUR_LEAF, SCHUR_LEAF + 1, 2 * SCHUR_LEAF + 3])
def test_large_inverse_is_lapacks_up_to_the_leaf_and_schurs_above(n):
    M = torch.eye(n, dtype=torch.float64) - skew((n, n), torch.float64) / 2
    inverse = _large_inverse(M)
    if n <= SCHUR_LEAF:
        assert torch.equal(inverse, torch.linalg.inv(M))
    else:
        torch.testing.assert_close(inverse, torch.linalg.inv(M))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("dtype", DOUBLE)
def test_small_inverse_in_the_batch_last_layout(n, dtype):
    M = torch.eye(n, dtype=dtype) - skew((6, n, n), dtype, scale=3.0) / 2
    inverse = batch_first(_small_inverse(batch_last(M)), (6,))
    torch.testing.assert_close(inverse, torch.linalg.inv(M))


# Values


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_torchs_cayley_map(path, dtype, device):
    A = skew(PATHS[path], dtype, scale=2.0, device=device)
    Q = cayley(A)
    assert Q.shape == A.shape and Q.dtype == dtype and Q.device == A.device
    # (LAPACK's inverses are column-major, as torch's solve is; the batch-last layout is not
    # given back, so that a kernel's weight can be viewed as a matrix as usual)
    assert Q.is_contiguous() or not path.startswith("small")
    expected = theirs(A.to(torch.complex128 if dtype.is_complex else torch.float64))
    assert (Q - expected).abs().max().item() <= tolerance(dtype, A.shape[-1])


@st.composite
def skews(draw):
    """A skew matrix of any shape and dtype that reaches each path, and of any norm."""
    n = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 50, 100]))
    batch = draw(st.sampled_from([(), (2,), (SMALL_BATCH,)]))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    X = torch.randn(*batch, n, n, dtype=dtype, generator=generator) * (scale / math.sqrt(n))
    return X - X.mH


@given(A=skews())
def test_is_orthogonal_and_agrees_with_torch_on_any_skew_matrix(A):
    Q = cayley(A)
    n = A.shape[-1]
    assert orthonormality_error(Q) <= tolerance(A.dtype, n)
    wide = torch.complex128 if A.is_complex() else torch.float64
    assert (Q.to(wide) - theirs(A.to(wide))).abs().max().item() <= tolerance(A.dtype, n)


@pytest.mark.parametrize("n", [256, 1024])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_is_as_orthogonal_as_torchs(n, scale):
    A = skew((n, n), torch.float32, scale)
    floor = math.sqrt(n) * torch.finfo(torch.float32).eps
    ours, reference = orthonormality_error(cayley(A)), orthonormality_error(theirs(A))
    assert ours <= 1.5 * max(reference, floor)


@pytest.mark.parametrize("path", ["lapack", "schur", "small-3"])
def test_lu_takes_lapacks_inverse_for_any_matrix(path):
    # Not skew, with a Hermitian part far beyond 2I: the blocks of "auto" need not be
    # invertible, LAPACK's pivoted LU does not care.
    A = 5 * torch.randn(PATHS[path], dtype=torch.float64)
    torch.testing.assert_close(cayley(A, algorithm="lu"), theirs(A))


def test_auto_takes_any_matrix_whose_hermitian_part_is_below_2i():
    A = skew((97, 97), torch.float64, 3.0) + 0.5 * torch.eye(97, dtype=torch.float64)
    torch.testing.assert_close(cayley(A), theirs(A))


# Gradients


@FORWARD_AD
@pytest.mark.parametrize("path", GRADCHECK_PATHS)
@pytest.mark.parametrize("dtype", DOUBLE)
def test_gradcheck_and_gradgradcheck(path, dtype):
    # Any matrix, not only skew ones: the map and its derivatives hold for all of them.
    shape = PATHS[path]
    if math.prod(shape) > 200:  # the (2, 32, 3, 3) batch: gradgradcheck would take long
        shape = shape[1:]
    A = skew(shape, dtype) + 0.1 * torch.randn(shape, dtype=dtype)
    A.requires_grad_()
    assert torch.autograd.gradcheck(cayley, A, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(cayley, A)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DOUBLE)
def test_gradient_agrees_with_torchs(path, dtype):
    A = skew(PATHS[path], dtype, scale=2.0)
    cotangent = torch.randn_like(A)
    grads = []
    for f in (cayley, theirs):
        leaf = A.clone().requires_grad_()
        (f(leaf) * cotangent.conj()).real.sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("path", ["schur", "small-3"])
def test_backward_keeps_only_the_output(path):
    A = skew(PATHS[path], torch.float64).requires_grad_()
    Q = cayley(A)
    saved = Q.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].data_ptr() == Q.data_ptr()


@FORWARD_AD
@pytest.mark.parametrize(
    "shape", [(SMALL_BATCH, 2, 3, 3), (2, SMALL_BATCH, 3, 3), (3, 5, 5), (2, 60, 60)], ids=str
)
def test_under_vmap_jacrev_jacfwd_and_hessian(shape):
    # vmap's dimension joins the batch: (32, 2, 3, 3) takes the small path under vmap too.
    A = skew(shape, torch.float64)
    torch.testing.assert_close(torch.func.vmap(cayley)(A), theirs(A))
    one = A[0, ..., :2, :2].contiguous()  # the same path as A[0], with small Jacobians
    torch.testing.assert_close(torch.func.jacrev(cayley)(one), torch.func.jacrev(theirs)(one))
    torch.testing.assert_close(torch.func.jacfwd(cayley)(one), torch.func.jacrev(theirs)(one))
    torch.testing.assert_close(
        torch.func.hessian(lambda A: cayley(A).pow(3).sum())(one),
        torch.func.hessian(lambda A: theirs(A).pow(3).sum())(one),
    )
    cotangent = torch.randn_like(A[0])

    def grads(f):
        return torch.func.vmap(torch.func.grad(lambda A: (f(A) * cotangent).sum()))(A)

    torch.testing.assert_close(grads(cayley), grads(theirs))


# Errors


@pytest.mark.parametrize("shape", [(3,), (3, 4), (2, 4, 3)], ids=str)
def test_rejects_matrices_that_are_not_square(shape):
    with pytest.raises(ValueError, match=r"cayley\(\) needs square matrices.*got shape"):
        cayley(torch.randn(shape))


def test_rejects_an_unknown_algorithm():
    with pytest.raises(ValueError, match=r"'auto' or 'lu'; got 'qr'"):
        cayley(torch.randn(3, 3), algorithm="qr")  # type: ignore[arg-type]


# No host synchronisation, and torch.compile


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("algorithm", ["auto", "lu"])
def test_runs_on_the_meta_device_forward_and_backward(path, algorithm):
    # Meta tensors have no values: a .item(), a bool(tensor) or any other read of a value
    # (a synchronisation on a GPU) raises there.
    A = torch.empty(PATHS[path], device="meta", requires_grad=True)
    Q = cayley(A, algorithm=algorithm)
    assert Q.shape == A.shape and Q.device.type == "meta"
    (grad,) = torch.autograd.grad(Q, A, torch.empty_like(Q))
    assert grad.shape == A.shape


@DYNAMO_FUNCTION
@pytest.mark.parametrize("path", ["lapack", "schur", "small-2", "small-5"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiles_whole_and_matches_eager(path, backend):
    # fullgraph=True fails on any graph break: data-dependent control flow or a read of a
    # value on the host among them.
    torch._dynamo.reset()
    A = skew(PATHS[path], torch.float64)
    cotangent = torch.randn_like(A)
    compiled = torch.compile(cayley, fullgraph=True, backend=backend)
    results = []
    for f in (compiled, cayley):
        leaf = A.clone().requires_grad_()
        Q = f(leaf)
        (Q * cotangent).sum().backward()
        results.append((Q.detach(), leaf.grad))
    torch.testing.assert_close(results[0], results[1])
    torch._dynamo.reset()
