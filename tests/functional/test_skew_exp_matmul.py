"""skew_matrix_exp(algorithm="matmul"): Taylor scaling and squaring from matrix products, and
its Fréchet derivative through the same recurrence."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tether.functional import skew_matrix_exp, skew_part
from tether.functional._skew_exp_matmul import _DEGREES, _THETA, schedule

REAL = [torch.float32, torch.float64]
FORWARD_AD = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


pytestmark = pytest.mark.usefixtures("one_thread")


def matmul(X: torch.Tensor) -> torch.Tensor:
    return skew_matrix_exp(X, algorithm="matmul")


def bound(dtype: torch.dtype, n: int, norm: float) -> float:
    """``eps √n (1 + ‖A‖₂)``: the error scaling and squaring makes, up to a small factor."""
    return torch.finfo(dtype).eps * math.sqrt(n) * (1.0 + norm)


def skew(shape, dtype, generator, norm) -> torch.Tensor:
    """Skew(-Hermitian) matrices of 2-norm ``norm`` (a number, or one per matrix)."""
    X = torch.randn(shape, dtype=dtype, generator=generator)
    A = X - X.mH
    size = torch.linalg.matrix_norm(A, 2).clamp_min(1e-30)[..., None, None]
    return A * (torch.as_tensor(norm, dtype=size.dtype)[..., None, None] / size)


def orthogonality_error(Q: torch.Tensor) -> float:
    Q = Q.to(torch.complex128 if Q.is_complex() else torch.float64)
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (Q.mH @ Q - eye).abs().max().item()


def reference(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_exp(
        skew_part(A.to(torch.complex128 if A.is_complex() else torch.float64))
    )


# The degree and the scaling (Note [Skew exponential from matrix products])


def reference_theta(m: int, unit_roundoff: float) -> float:
    """The largest ‖X‖ with Σ_{j>m} |cⱼ| ‖X‖ʲ⁻¹ ≤ u, h(x) = log(e⁻ˣ T_m(x)) = Σ cⱼ xʲ."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    terms = 100
    taylor = [
        mpmath.mpf(1) / mpmath.factorial(k) if k <= m else mpmath.mpf(0) for k in range(terms)
    ]
    coefficients = mpmath.taylor(
        lambda x: mpmath.log(mpmath.exp(-x) * mpmath.polyval(taylor[::-1], x)), 0, terms - 1
    )

    def excess(x):
        return (
            sum(abs(c) * x ** (j - 1) for j, c in enumerate(coefficients) if j > m) - unit_roundoff
        )

    low, high = mpmath.mpf(0), mpmath.mpf(8)
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if excess(middle) < 0 else (low, middle)
    return float(low)


@pytest.mark.parametrize("k", [1, 4, 7])
@pytest.mark.parametrize(
    ("precision", "unit_roundoff"), [("single", 2.0**-24), ("double", 2.0**-53)]
)
def test_theta_is_the_largest_norm_with_a_backward_error_below_the_unit_roundoff(
    k, precision, unit_roundoff
):
    expected = reference_theta(_DEGREES[k - 1], unit_roundoff)
    assert _THETA[precision][k - 1] == pytest.approx(expected, rel=1e-6)


def test_degrees_are_the_highest_that_k_products_reach():
    # q + r - 2 products for degree q r: the most is ⌊(k + 2)² / 4⌋
    assert tuple((k + 2) ** 2 // 4 for k in range(1, 10)) == _DEGREES


@pytest.mark.parametrize("precision", ["single", "double"])
@pytest.mark.parametrize("norm", [0.0, 1e-9, 1e-3, 0.3, 1.0, 3.0, 7.0, 100.0, 1e6])
def test_schedule_covers_the_bound_with_the_fewest_products(norm, precision):
    q, r, s = schedule(norm, precision)
    k = q + r - 2
    assert q * r == _DEGREES[k - 1]
    assert norm <= _THETA[precision][k - 1] * 2**s
    fewest = min(
        j + max(0, math.ceil(math.log2(norm / theta))) if norm > theta else j
        for j, theta in enumerate(_THETA[precision], start=1)
    )
    assert k + s == fewest


@pytest.mark.parametrize("norm", [math.nan, math.inf])
def test_schedule_of_a_non_finite_bound_does_no_squaring(norm):
    assert schedule(norm, "double") == (2, 1, 0)


def test_a_nan_comes_out_as_nan():
    X = torch.zeros(4, 4, dtype=torch.float64)
    X[1, 2] = math.nan
    assert matmul(X).isnan().any()


# Values


@st.composite
def cases(draw, dtypes=(*REAL, torch.complex64, torch.complex128)):
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    n = draw(st.integers(1, 24))
    dtype = draw(st.sampled_from(dtypes))
    norm = draw(st.sampled_from([0.0, 1e-3, 1.0, 10.0, 100.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return skew((*batch, n, n), dtype, generator, norm), norm


@given(case=cases())
def test_agrees_with_torch_matrix_exp_and_is_orthogonal(case):
    A, norm = case
    Q = matmul(A)
    assert Q.shape == A.shape and Q.dtype == A.dtype
    n = A.shape[-1]
    assert (Q.to(reference(A).dtype) - reference(A)).abs().max().item() <= 10 * bound(
        A.dtype, n, norm
    )
    assert orthogonality_error(Q) <= 10 * bound(A.dtype, n, norm)


@pytest.mark.parametrize("dtype", REAL)
def test_a_batch_of_different_norms_shares_one_schedule_and_stays_accurate(dtype):
    norms = torch.tensor([0.0, 1e-6, 1.0, 50.0])
    A = skew((4, 16, 16), dtype, torch.Generator().manual_seed(0), norms)
    error = (matmul(A).double() - reference(A)).abs().amax((-2, -1))
    for e, norm in zip(error.tolist(), norms.tolist(), strict=True):
        assert e <= 10 * bound(dtype, 16, 50.0 if norm else 0.0)


def test_takes_the_skew_part_of_its_input_and_reads_non_contiguous_input():
    X = torch.randn(2, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(matmul(X.mT), reference(X.mT))
    torch.testing.assert_close(matmul(X[:, ::2, ::2]), reference(X[:, ::2, ::2]))


def test_an_empty_batch():
    assert matmul(torch.zeros(0, 5, 5)).shape == (0, 5, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("norm", [1.0, 3.0, 30.0])
def test_is_as_orthogonal_as_torch_matrix_exp(norm, dtype):
    A = skew((256, 256), dtype, torch.Generator().manual_seed(0), norm)
    theirs = orthogonality_error(torch.linalg.matrix_exp(A))
    assert orthogonality_error(matmul(A)) <= theirs


# Gradients: gradcheck in float64

GENERATORS = {
    "random": lambda n: torch.randn(n, n, dtype=torch.float64),
    "zero": lambda n: torch.zeros(n, n, dtype=torch.float64),
    "tiny": lambda n: 1e-8 * torch.randn(n, n, dtype=torch.float64),
    "equal blocks": lambda n: torch.block_diag(
        *[torch.tensor([[0.0, -1.3], [1.3, 0.0]], dtype=torch.float64)] * (n // 2),
        *[torch.zeros(1, 1, dtype=torch.float64)] * (n % 2),
    ),
    "large norm (squarings)": lambda n: 20 * torch.randn(n, n, dtype=torch.float64),
}


@FORWARD_AD
@pytest.mark.parametrize("kind", list(GENERATORS))
@pytest.mark.parametrize("n", [1, 4, 7])
def test_gradcheck(n, kind):
    X = GENERATORS[kind](n).requires_grad_()
    assert torch.autograd.gradcheck(matmul, X, check_forward_ad=True)


@FORWARD_AD
def test_gradcheck_batched_and_complex():
    X = (3 * torch.randn(2, 5, 5, dtype=torch.complex128)).requires_grad_()
    assert torch.autograd.gradcheck(matmul, X, check_forward_ad=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("norm", [0.0, 1.0, 20.0])
def test_gradient_agrees_with_torch(norm, dtype):
    A = skew((40, 40), dtype, torch.Generator().manual_seed(1), norm)
    cotangent = torch.randn(40, 40, dtype=dtype)
    grads = []
    for algorithm in ("matmul", "torch"):
        X = A.clone().requires_grad_()
        (skew_matrix_exp(X, algorithm=algorithm) * cotangent.conj()).real.sum().backward()
        grads.append(X.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0.0, atol=1e-11 * (1 + norm))


def test_second_derivatives_are_exact_with_create_graph():
    X = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(matmul, X)


def test_second_derivatives_under_nested_torch_func_raise_instead_of_coming_out_wrong():
    X = torch.randn(5, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"algorithm='matmul'\) has no second derivative"):
        torch.func.jacrev(torch.func.jacrev(matmul))(X)


@FORWARD_AD
def test_vmap_jacrev_and_jacfwd_agree_with_torch():
    X = torch.randn(3, 5, 5, dtype=torch.float64)

    def theirs(X):
        return torch.linalg.matrix_exp(skew_part(X))

    torch.testing.assert_close(torch.func.vmap(matmul)(X), theirs(X))
    torch.testing.assert_close(torch.func.jacrev(matmul)(X[0]), torch.func.jacrev(theirs)(X[0]))
    torch.testing.assert_close(torch.func.jacfwd(matmul)(X[0]), torch.func.jacrev(theirs)(X[0]))
    cotangent = torch.randn(5, 5, dtype=torch.float64)

    def grads(f):
        return torch.func.vmap(torch.func.grad(lambda X: (f(X) * cotangent).sum()))(X)

    torch.testing.assert_close(grads(matmul), grads(theirs))


# Under torch.compile: two custom operators (Note [The matmul path under torch.compile])

OP_CASES = {
    "float64": ((1, 9, 9), torch.float64, 1.0),
    "batched float32, squarings": ((2, 9, 9), torch.float32, 40.0),
    "complex128": ((1, 6, 6), torch.complex128, 3.0),
}


@pytest.mark.parametrize(("shape", "dtype", "norm"), list(OP_CASES.values()), ids=list(OP_CASES))
def test_custom_operators_pass_torch_opcheck(shape, dtype, norm):
    generator = torch.Generator().manual_seed(0)
    X = skew(shape, dtype, generator, norm).requires_grad_()
    torch.library.opcheck(torch.ops.tether.skew_exp_matmul.default, (X,))
    _, plan = torch.ops.tether.skew_exp_matmul(X.detach())
    grad = torch.randn(shape, dtype=dtype, generator=generator)
    torch.library.opcheck(
        torch.ops.tether.skew_exp_matmul_backward.default, (X.detach(), grad, plan)
    )


@pytest.mark.parametrize("norm", [0.0, 3.0, 50.0])
def test_compiled_value_and_gradient_match_eager(norm):
    torch._dynamo.reset()
    X = skew((2, 20, 20), torch.float64, torch.Generator().manual_seed(1), norm)
    G = torch.randn_like(X)
    compiled = torch.compile(matmul, fullgraph=True, backend="aot_eager")
    results = []
    for function in (compiled, matmul):
        leaf = X.clone().requires_grad_()
        Q = function(leaf)
        (Q * G).sum().backward()
        results.append((Q.detach(), leaf.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


def test_compiled_graph_holds_the_custom_operator_without_breaks():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(matmul)(torch.randn(20, 20))
    assert explanation.graph_break_count == 0
    (graph,) = explanation.graphs
    targets = {str(node.target) for node in graph.graph.nodes}
    assert "tether.skew_exp_matmul.default" in targets
    assert not any("matrix_exp" in target for target in targets)


def test_gradcheck_through_the_compiled_operators():
    torch._dynamo.reset()
    compiled = torch.compile(matmul, backend="aot_eager")
    X = skew((2, 7, 7), torch.complex128, torch.Generator().manual_seed(2), 12.0).requires_grad_()
    assert torch.autograd.gradcheck(compiled, (X,))


def test_compiled_second_derivatives_raise_instead_of_coming_out_wrong():
    torch._dynamo.reset()
    compiled = torch.compile(matmul, backend="aot_eager")
    X = torch.randn(9, 9, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(compiled(X).sum(), X, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()
