"""The closed forms of skew_matrix_exp for n <= 3: rotations, Rodrigues' formula, SU(2)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tether.functional import skew_matrix_exp, skew_part
from tether.functional._skew_exp_small import _coefficients, _slopes, has_closed_form

# torch's forward-mode AD loads its decompositions with torch.jit.script on first use, which
# warns that torch.jit.script is deprecated (torch's own code, not ours).
FORWARD_AD = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
# Dynamo (torch 2.13) warns that it instantiates the autograd Functions it traces (its own doing).
DYNAMO_FUNCTION = pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
)
# (n, dtype) with a closed form
CASES = [
    (1, torch.float32),
    (1, torch.float64),
    (2, torch.float32),
    (2, torch.float64),
    (3, torch.float32),
    (3, torch.float64),
    (1, torch.complex64),
    (1, torch.complex128),
    (2, torch.complex64),
    (2, torch.complex128),
]
DOUBLE = [(n, dtype) for n, dtype in CASES if dtype in (torch.float64, torch.complex128)]


pytestmark = pytest.mark.usefixtures("one_thread")


def closed_form(X: torch.Tensor) -> torch.Tensor:
    return skew_matrix_exp(X, algorithm="closed_form")


def reference(X: torch.Tensor) -> torch.Tensor:
    """``exp`` of the skew part, by torch in double precision."""
    wide = torch.complex128 if X.is_complex() else torch.float64
    return torch.linalg.matrix_exp(skew_part(X.to(wide)))


def orthogonality_error(Q: torch.Tensor) -> float:
    Q = Q.to(torch.complex128 if Q.is_complex() else torch.float64)
    return (Q.mH @ Q - torch.eye(Q.shape[-1], dtype=Q.dtype)).abs().max().item()


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@st.composite
def matrices(draw):
    n, dtype = draw(st.sampled_from(CASES))
    batch = draw(st.sampled_from([(), (5,), (2, 3), (0,)]))
    scale = draw(st.sampled_from([0.0, 1e-8, 1e-3, 1.0, 3.0, 100.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return scale * torch.randn(*batch, n, n, dtype=dtype, generator=generator), scale


@given(case=matrices())
def test_agrees_with_torch_matrix_exp_and_is_orthogonal(case):
    X, scale = case
    Q = closed_form(X)
    assert Q.shape == X.shape and Q.dtype == X.dtype
    if X.numel():
        # the error of an angle of size 100 is eps 100, as for any method
        tolerance = 10 * eps(X.dtype) * (1 + scale)
        assert (Q - reference(X)).abs().max().item() <= tolerance
        assert orthogonality_error(Q) <= 10 * eps(X.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotation_by_known_angles(dtype):
    angles = torch.tensor([0.0, 1e-9, 0.5, math.pi / 2, math.pi, 3.0, -2.0], dtype=dtype)
    X = torch.zeros(len(angles), 2, 2, dtype=dtype)
    X[:, 1, 0], X[:, 0, 1] = angles, -angles
    expected = torch.stack(
        [torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], dim=-1
    ).reshape(-1, 2, 2)
    torch.testing.assert_close(closed_form(X), expected, rtol=0, atol=2 * eps(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rodrigues_fixes_the_axis_and_turns_by_its_length(dtype):
    axis = torch.tensor([1.0, -2.0, 2.0], dtype=dtype) / 3
    angle = 1.2
    a = angle * axis
    A = torch.zeros(3, 3, dtype=dtype)
    A[2, 1], A[0, 2], A[1, 0] = a[0], a[1], a[2]
    Q = closed_form(A - A.mT)
    torch.testing.assert_close(Q @ axis, axis, rtol=0, atol=4 * eps(dtype))
    assert Q.trace().item() == pytest.approx(1 + 2 * math.cos(angle), abs=8 * eps(dtype))


def test_takes_the_skew_part_and_reads_non_contiguous_input():
    X = torch.randn(4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(closed_form(X.mT), reference(X.mT))
    torch.testing.assert_close(
        closed_form(X[:, None].expand(4, 2, 3, 3)), reference(X)[:, None].expand(4, 2, 3, 3)
    )


@pytest.mark.parametrize(
    ("n", "is_complex", "expected"),
    [
        (1, False, True),
        (2, False, True),
        (3, False, True),
        (4, False, False),
        (1, True, True),
        (2, True, True),
        (3, True, False),
    ],
)
def test_has_closed_form(n, is_complex, expected):
    assert has_closed_form(n, is_complex) is expected


@pytest.mark.parametrize("shape", [(4, 4), (3, 3)])
def test_closed_form_for_other_shapes_is_rejected(shape):
    dtype = torch.complex64 if shape == (3, 3) else torch.float32
    with pytest.raises(
        ValueError, match=r"closed forms for n <= 3 \(real\) and n <= 2 \(complex\)"
    ):
        closed_form(torch.zeros(shape, dtype=dtype))


# The coefficients and their slopes, against 40-digit arithmetic


def reference_coefficients(t: float) -> tuple[float, float, float, float, float]:
    """``c``, ``s₁``, ``s₂``, ``s₁'``, ``s₂'`` at ``t``, from their series to 40 digits."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    x = mpmath.mpf(t)

    def series(offset: int, slope: bool) -> float:
        if slope:
            terms = (
                m * (-1) ** m * x ** (m - 1) / mpmath.factorial(2 * m + offset)
                for m in range(1, 80)
            )
        else:
            terms = ((-x) ** m / mpmath.factorial(2 * m + offset) for m in range(80))
        return float(mpmath.fsum(terms))

    return series(0, False), series(1, False), series(2, False), series(1, True), series(2, True)


ANGLES = [0.0, 1e-12, 1e-4, 0.3, 1.0, 1.9, 1.99999, 2.0, 2.00001, 2.1, 3.0, math.pi, 5.0, 20.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("theta", ANGLES)
def test_coefficients_and_slopes_are_accurate_on_both_sides_of_the_series(theta, dtype):
    # θ = 2 is where the slopes switch from their series to the quotients.
    t = torch.tensor([theta * theta], dtype=dtype)
    c, s1, s2 = _coefficients(t)
    computed = (c, s1, s2, *_slopes(t, c, s1, s2))
    for value, expected in zip(computed, reference_coefficients(t.item()), strict=True):
        # absolute, on the scale of the functions' envelopes (which decay like 1/θ or faster):
        # near their zeros, rounding θ alone moves them by eps θ |f'(θ)|
        tolerance = 16 * eps(dtype) * max(abs(expected), 1 / (1 + theta))
        assert abs(value.item() - expected) <= tolerance


# Gradients: gradcheck in float64, at angle 0, small, around the switch to the series (θ = 2)
# and large

SCALES = {"zero": 0.0, "tiny": 1e-9, "small": 1e-3, "unit": 1.0, "around 2": 2.0, "large": 30.0}


def near(n: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """A batch of ``n x n`` matrices whose skew parts have 2-norm ``scale`` (near it for n = 3)."""
    generator = torch.Generator().manual_seed(n)
    X = torch.randn(3, n, n, dtype=dtype, generator=generator)
    A = skew_part(X)
    size = torch.linalg.matrix_norm(A, 2).clamp_min(1e-30)[..., None, None]
    jitter = 1e-3 * scale * torch.randn(3, n, n, dtype=dtype, generator=generator)
    return A * (scale / size) + jitter


@FORWARD_AD
@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize(("n", "dtype"), DOUBLE)
def test_gradcheck(n, dtype, scale):
    X = near(n, dtype, SCALES[scale]).requires_grad_()
    assert torch.autograd.gradcheck(closed_form, X, check_forward_ad=True, check_batched_grad=True)


@pytest.mark.parametrize(("n", "dtype"), DOUBLE)
def test_gradient_agrees_with_torch(n, dtype):
    X = near(n, dtype, 1.5)
    G = torch.randn_like(X)
    grads = []
    for function in (closed_form, reference):
        leaf = X.clone().requires_grad_()
        (function(leaf) * G.conj()).real.sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=100 * eps(dtype))


@pytest.mark.parametrize("n", [2, 3])
def test_no_nan_gradient_at_zero(n):
    dtype = torch.float32 if n == 3 else torch.complex64
    X = torch.zeros(5, n, n, dtype=dtype, requires_grad=True)
    closed_form(X).abs().sum().backward()
    assert (
        X.grad is not None
        and torch.isfinite(
            torch.view_as_real(X.grad.resolve_conj()) if X.grad.is_complex() else X.grad
        ).all()
    )


@pytest.mark.parametrize(("n", "dtype"), [(3, torch.float64), (2, torch.complex128)])
def test_second_derivatives_are_exact_with_create_graph(n, dtype):
    X = near(n, dtype, 1.0).requires_grad_()
    assert torch.autograd.gradgradcheck(closed_form, X)


@pytest.mark.parametrize(("n", "dtype"), [(3, torch.float64), (2, torch.complex128)])
def test_second_derivatives_under_nested_torch_func_raise(n, dtype):
    X = near(n, dtype, 1.0)[0]
    if dtype.is_complex:  # jacrev takes and returns real tensors: split the complex ones

        def function(Y):
            return torch.view_as_real(closed_form(torch.view_as_complex(Y)))

        X = torch.view_as_real(X)
    else:
        function = closed_form
    with pytest.raises(RuntimeError, match=r"closed form\) has no second derivative"):
        torch.func.jacrev(torch.func.jacrev(function))(X)


@FORWARD_AD
def test_vmap_jacrev_and_jacfwd_agree_with_torch():
    X = near(3, torch.float64, 1.0)

    def theirs(X):
        return torch.linalg.matrix_exp(skew_part(X))

    torch.testing.assert_close(torch.func.vmap(closed_form)(X), theirs(X))
    torch.testing.assert_close(
        torch.func.jacrev(closed_form)(X[0]), torch.func.jacrev(theirs)(X[0])
    )
    torch.testing.assert_close(
        torch.func.jacfwd(closed_form)(X[0]), torch.func.jacrev(theirs)(X[0])
    )
    cotangent = torch.randn(3, 3, dtype=torch.float64)

    def grads(f):
        return torch.func.vmap(torch.func.grad(lambda X: (f(X) * cotangent).sum()))(X)

    torch.testing.assert_close(grads(closed_form), grads(theirs))


# Under torch.compile: traceable code, no graph breaks


@DYNAMO_FUNCTION
@pytest.mark.parametrize(
    ("n", "dtype"), [(2, torch.float32), (3, torch.float64), (2, torch.complex128)]
)
def test_compiles_without_graph_breaks_and_matches_eager(n, dtype):
    torch._dynamo.reset()
    X = near(n, dtype, 1.0)
    G = torch.randn_like(X)
    explanation = torch._dynamo.explain(closed_form)(X)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(closed_form, fullgraph=True, backend="aot_eager")
    results = []
    for function in (compiled, closed_form):
        leaf = X.clone().requires_grad_()
        Q = function(leaf)
        (Q * G.conj()).real.sum().backward()
        results.append((Q.detach(), leaf.grad))
    torch.testing.assert_close(results[0], results[1])


def test_auto_takes_the_closed_forms_for_a_batch_of_3_x_3():
    X = torch.randn(4, 3, 3, requires_grad=True)
    assert type(skew_matrix_exp(X).grad_fn).__name__ == "_RodriguesBackward"
