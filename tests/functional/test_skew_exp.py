"""skew_matrix_exp: the exponential of skew matrices from one eigendecomposition ("eigh"), and
the choice among its paths (the matrix products and the closed forms have files of their own)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tether.functional import skew_matrix_exp, skew_part
from tether.functional._skew_exp import (
    CPU_EIGH_MIN,
    CPU_MATMUL_MIN_WORK,
    _algorithm,
    algorithm_for,
)
from tether.functional._skew_exp_math import _divided_differences

REAL = [torch.float32, torch.float64]
SCALES = [0.0, 1e-3, 1.0, 10.0, 100.0]
# torch's forward-mode AD loads its decompositions with torch.jit.script on first use, which
# warns that torch.jit.script is deprecated (torch's own code, not ours).
FORWARD_AD = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


pytestmark = pytest.mark.usefixtures("one_thread")


def bound(dtype: torch.dtype, n: int, norm: float) -> float:
    """``eps √n (1 + ‖A‖₂)``: the error scaling and squaring makes, up to a small factor."""
    return torch.finfo(dtype).eps * math.sqrt(n) * (1.0 + norm)


def skew(shape, dtype, generator, norm: float) -> torch.Tensor:
    """A skew(-Hermitian) matrix of 2-norm ``norm`` (each matrix of the batch)."""
    X = torch.randn(shape, dtype=dtype, generator=generator)
    A = X - X.mH
    size = torch.linalg.matrix_norm(A, 2).clamp_min(1e-30)[..., None, None]
    return A * (norm / size)


def rotations(n: int, angles: torch.Tensor, generator: torch.Generator):
    """``A = U B Uᵀ`` with ``B`` 2 x 2 rotation generators of the given angles (a zero for odd
    ``n``) and its exponential ``U R Uᵀ``, both in float64 to about eps."""
    B = torch.zeros(n, n, dtype=torch.float64)
    R = torch.eye(n, dtype=torch.float64)
    for i, angle in enumerate(angles.tolist()):
        j = 2 * i
        B[j, j + 1], B[j + 1, j] = -angle, angle
        R[j, j] = R[j + 1, j + 1] = math.cos(angle)
        R[j, j + 1], R[j + 1, j] = -math.sin(angle), math.sin(angle)
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return U @ B @ U.mT, U @ R @ U.mT


def orthogonality_error(Q: torch.Tensor) -> float:
    Q = Q.to(torch.complex128 if Q.is_complex() else torch.float64)
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (Q.mH @ Q - eye).abs().max().item()


@st.composite
def cases(draw, dtypes=REAL):
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    n = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(dtypes))
    norm = draw(st.sampled_from(SCALES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return skew((*batch, n, n), dtype, generator, norm), norm


@given(case=cases())
def test_agrees_with_torch_matrix_exp(case):
    A, norm = case
    Q = skew_matrix_exp(A, algorithm="eigh")
    assert Q.shape == A.shape and Q.dtype == A.dtype
    expected = torch.linalg.matrix_exp(A.double())
    n = A.shape[-1]
    assert (Q.double() - expected).abs().max().item() <= 10 * bound(A.dtype, n, norm)


@given(case=cases(dtypes=[*REAL, torch.complex64, torch.complex128]))
def test_is_orthogonal_or_unitary(case):
    A, norm = case
    Q = skew_matrix_exp(A, algorithm="eigh")
    assert orthogonality_error(Q) <= 10 * bound(A.dtype, A.shape[-1], norm)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_agrees_with_torch_matrix_exp(dtype):
    A = skew((3, 24, 24), dtype, torch.Generator().manual_seed(0), 5.0)
    expected = torch.linalg.matrix_exp(A.to(torch.complex128))
    error = (skew_matrix_exp(A, algorithm="eigh") - expected).abs().max().item()
    assert error <= 10 * bound(dtype, 24, 5.0)


ANGLES = {
    "distinct": lambda m, norm, g: norm * torch.rand(m, dtype=torch.float64, generator=g),
    "equal": lambda m, norm, g: torch.full((m,), norm, dtype=torch.float64),
    "zero": lambda m, norm, g: torch.zeros(m, dtype=torch.float64),
    "half zero, half equal": lambda m, norm, g: torch.cat(
        [torch.zeros(m // 2, dtype=torch.float64), torch.full((m - m // 2,), norm)]
    ),
}


@pytest.mark.parametrize("dtype", REAL)
@pytest.mark.parametrize("angles", list(ANGLES))
@pytest.mark.parametrize("norm", [1.0, 100.0])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 33, 256])
def test_matches_rotations_with_known_angles(n, norm, angles, dtype):
    generator = torch.Generator().manual_seed(n)
    A, expected = rotations(n, ANGLES[angles](n // 2, norm, generator), generator)
    Q = skew_matrix_exp(A.to(dtype), algorithm="eigh")
    assert (Q.double() - expected).abs().max().item() <= 10 * bound(dtype, n, norm)


@pytest.mark.parametrize(("dtype", "norm"), [(torch.float32, 100.0), (torch.float64, 3.0)])
def test_matches_rotations_at_n_1024(dtype, norm):
    generator = torch.Generator().manual_seed(0)
    A, expected = rotations(1024, ANGLES["distinct"](512, norm, generator), generator)
    Q = skew_matrix_exp(A.to(dtype))
    assert (Q.double() - expected).abs().max().item() <= 10 * bound(dtype, 1024, norm)
    assert orthogonality_error(Q) <= 10 * bound(dtype, 1024, norm)


@pytest.mark.parametrize("norm", [1.0, 3.0, 30.0])
def test_is_as_orthogonal_as_torch_matrix_exp(norm):
    A = skew((256, 256), torch.float32, torch.Generator().manual_seed(0), norm)
    theirs = orthogonality_error(torch.linalg.matrix_exp(A))
    assert orthogonality_error(skew_matrix_exp(A, algorithm="eigh")) <= theirs


def test_takes_the_skew_part_of_its_input():
    X = torch.randn(2, 40, 40, dtype=torch.float64)
    expected = torch.linalg.matrix_exp(skew_part(X))
    torch.testing.assert_close(skew_matrix_exp(X), expected)


# Gradients: gradcheck in float64, on X -> exp(X - Xᵀ) and on exp of the skew part of X.

GENERATORS = {
    "random": lambda n: torch.randn(n, n, dtype=torch.float64),
    "zero": lambda n: torch.zeros(n, n, dtype=torch.float64),
    "equal angles": lambda n: rotations(n, torch.full((n // 2,), 0.7), torch.Generator())[0],
    "equal blocks": lambda n: torch.block_diag(
        *[torch.tensor([[0.0, -1.3], [1.3, 0.0]], dtype=torch.float64)] * (n // 2),
        *[torch.zeros(1, 1, dtype=torch.float64)] * (n % 2),
    ),
    "near-equal angles": lambda n: rotations(
        n, 0.5 + 1e-7 * torch.arange(n // 2, dtype=torch.float64), torch.Generator()
    )[0],
    "angles past the series (2 to 7)": lambda n: rotations(
        n, torch.linspace(2.5, 7.0, n // 2, dtype=torch.float64), torch.Generator()
    )[0],
    "large norm (squarings)": lambda n: 20 * torch.randn(n, n, dtype=torch.float64),
}


@FORWARD_AD
@pytest.mark.parametrize("kind", list(GENERATORS))
@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_gradcheck_through_a_skew_generator(n, kind):
    X = GENERATORS[kind](n).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda X: skew_matrix_exp(X - X.mT, algorithm="eigh"), X, check_forward_ad=True
    )


@FORWARD_AD
@pytest.mark.parametrize("kind", list(GENERATORS))
def test_gradcheck_in_every_direction(kind):
    X = (GENERATORS[kind](5) + 0.1 * torch.randn(5, 5, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda X: skew_matrix_exp(X, algorithm="eigh"), X, check_forward_ad=True
    )


@FORWARD_AD
def test_gradcheck_batched_and_complex():
    X = torch.randn(2, 4, 4, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda X: skew_matrix_exp(X, algorithm="eigh"), X, check_forward_ad=True
    )


@pytest.mark.parametrize("norm", [0.0, 1.0, 20.0])
@pytest.mark.parametrize("n", [40, 100])
def test_gradient_agrees_with_torch(n, norm):
    A = skew((n, n), torch.float64, torch.Generator().manual_seed(n), norm)
    cotangent = torch.randn(n, n, dtype=torch.float64)
    grads = []
    for algorithm in ("eigh", "torch"):
        X = A.clone().requires_grad_()
        (skew_matrix_exp(X, algorithm=algorithm) * cotangent).sum().backward()
        grads.append(X.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0.0, atol=1e-10 * (1 + norm))


@pytest.mark.parametrize("dtype", REAL)
@pytest.mark.parametrize("n", [1, 2, 64])
def test_no_nan_gradient_at_zero(n, dtype):
    X = torch.zeros(n, n, dtype=dtype, requires_grad=True)
    (skew_matrix_exp(X - X.mT) * torch.randn(n, n, dtype=dtype)).sum().backward()
    assert X.grad is not None and torch.isfinite(X.grad).all()


@pytest.mark.parametrize("kind", ["random", "zero", "equal blocks"])
def test_second_derivatives_are_exact_with_create_graph(kind):
    X = GENERATORS[kind](4).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda X: skew_matrix_exp(X, algorithm="eigh"), X)


def test_second_derivatives_under_nested_torch_func_raise_instead_of_coming_out_wrong():
    X = torch.randn(5, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"no second derivative under this torch.func"):
        torch.func.jacrev(torch.func.jacrev(lambda X: skew_matrix_exp(X, algorithm="eigh")))(X)


@FORWARD_AD
def test_vmap_jacrev_and_jacfwd_agree_with_torch():
    X = torch.randn(3, 5, 5, dtype=torch.float64)

    def ours(X):
        return skew_matrix_exp(X, algorithm="eigh")

    def theirs(X):
        return torch.linalg.matrix_exp(skew_part(X))

    torch.testing.assert_close(torch.func.vmap(ours)(X), theirs(X))
    torch.testing.assert_close(torch.func.jacrev(ours)(X[0]), torch.func.jacrev(theirs)(X[0]))
    torch.testing.assert_close(torch.func.jacfwd(ours)(X[0]), torch.func.jacrev(theirs)(X[0]))
    cotangent = torch.randn(5, 5, dtype=torch.float64)

    def grads(f):
        return torch.func.vmap(torch.func.grad(lambda X: (f(X) * cotangent).sum()))(X)

    torch.testing.assert_close(grads(ours), grads(theirs))


# The choice of algorithm


# (device type, n, dtype) -> the path "auto" takes (Note [Choosing the algorithm])
CHOICES = [
    ("cpu", 1, torch.float32, 1, "closed_form"),
    ("cpu", 2, torch.complex64, 1, "closed_form"),
    ("cpu", 3, torch.float64, 65536, "closed_form"),
    ("cpu", 3, torch.complex128, 1, "torch"),
    ("cpu", 3, torch.complex128, 4096, "matmul"),
    ("cpu", 4, torch.float32, 2, "torch"),
    ("cpu", 4, torch.float32, 512, "matmul"),
    ("cpu", 5, torch.float32, 65536, "matmul"),
    ("cpu", 31, torch.float64, 1, "torch"),
    ("cpu", 32, torch.float64, 1, "matmul"),
    ("cpu", 191, torch.float32, 1, "matmul"),
    ("cpu", 192, torch.float32, 1, "eigh"),
    ("cpu", 127, torch.float64, 3, "matmul"),
    ("cpu", 128, torch.float64, 1, "eigh"),
    ("cpu", 95, torch.complex64, 1, "matmul"),
    ("cpu", 96, torch.complex128, 1, "eigh"),
    ("cpu", 1024, torch.float32, 8, "eigh"),
    ("cpu", 64, torch.bfloat16, 1, "torch"),
    ("cuda", 3, torch.float32, 1, "closed_form"),
    ("cuda", 3, torch.complex64, 1, "matmul"),
    ("cuda", 4, torch.float32, 1, "matmul"),
    ("cuda", 4096, torch.float64, 1, "matmul"),
    ("cuda", 64, torch.float16, 1, "torch"),
    ("mps", 256, torch.float32, 1, "matmul"),
]


@pytest.mark.parametrize(("device_type", "n", "dtype", "batch", "expected"), CHOICES)
def test_auto_takes_the_measured_fastest_path(device_type, n, dtype, batch, expected):
    assert algorithm_for(device_type, n, dtype, batch) == expected


@pytest.mark.parametrize("dtype", list(CPU_EIGH_MIN))
def test_cpu_thresholds_are_the_named_constants(dtype):
    n = CPU_EIGH_MIN[dtype]
    assert algorithm_for("cpu", n - 1, dtype) == "matmul"
    assert algorithm_for("cpu", n, dtype) == "eigh"
    assert algorithm_for("cpu", 8, dtype, CPU_MATMUL_MIN_WORK // 8**3) == "matmul"
    assert algorithm_for("cpu", 8, dtype, CPU_MATMUL_MIN_WORK // 8**3 - 1) == "torch"


@pytest.mark.parametrize(
    ("device", "shape", "expected"),
    [
        ("cpu", (2, 3, 3), "closed_form"),
        ("cpu", (2, 8, 8), "torch"),
        ("cpu", (64, 8, 8), "matmul"),
        ("cpu", (2, 40, 40), "matmul"),
        ("cpu", (200, 200), "eigh"),
        ("meta", (2, 8, 8), "matmul"),
        ("meta", (200, 200), "matmul"),
    ],
)
def test_auto_reads_the_device_type_shape_and_dtype_of_its_input(device, shape, expected):
    assert _algorithm(torch.empty(shape, device=device), "auto") == expected


@pytest.mark.parametrize(
    ("n", "grad_fn"),
    [
        (3, "_RodriguesBackward"),
        (8, "LinalgMatrixExpBackward0"),
        (40, "_SkewExpMatmulBackward"),
        (200, "_SkewExpBackward"),
    ],
)
def test_auto_runs_the_path_it_chose(n, grad_fn):
    X = torch.randn(n, n, requires_grad=True)
    assert type(skew_matrix_exp(X).grad_fn).__name__ == grad_fn


@pytest.mark.parametrize("algorithm", ["closed_form", "eigh", "matmul", "torch"])
def test_every_algorithm_can_be_forced(algorithm):
    X = torch.randn(2, 3, 3, dtype=torch.float64)
    expected = torch.linalg.matrix_exp(skew_part(X))
    torch.testing.assert_close(skew_matrix_exp(X, algorithm=algorithm), expected)


def test_unknown_algorithm_is_rejected_with_the_allowed_values():
    allowed = "'auto', 'closed_form', 'eigh', 'matmul', 'torch'"
    with pytest.raises(ValueError, match=rf"{allowed}; got 'pade'"):
        skew_matrix_exp(torch.zeros(2, 2), algorithm="pade")  # type: ignore[arg-type]


# Under torch.compile: two custom operators (Note [The skew exponential under torch.compile])


def eigh(X: torch.Tensor) -> torch.Tensor:
    return skew_matrix_exp(X, algorithm="eigh")


OP_CASES = {
    "float64": ((33, 33), torch.float64, 1.0),
    "batched float32, squarings": ((2, 33, 33), torch.float32, 40.0),
    "complex128": ((34, 34), torch.complex128, 3.0),
}


@pytest.mark.parametrize(("shape", "dtype", "norm"), list(OP_CASES.values()), ids=list(OP_CASES))
def test_custom_operators_pass_torch_opcheck(shape, dtype, norm):
    generator = torch.Generator().manual_seed(0)
    X = skew(shape, dtype, generator, norm).requires_grad_()
    torch.library.opcheck(torch.ops.tether.skew_exp.default, (X,))
    _, theta, V, W, k = torch.ops.tether.skew_exp(X.detach())
    grad = torch.randn(shape, dtype=dtype, generator=generator)
    torch.library.opcheck(torch.ops.tether.skew_exp_backward.default, (grad, theta, V, W, k))


@pytest.mark.parametrize("norm", [0.0, 3.0, 50.0])
def test_compiled_value_and_gradient_match_eager(norm):
    torch._dynamo.reset()
    X = skew((2, 40, 40), torch.float64, torch.Generator().manual_seed(1), norm)
    G = torch.randn_like(X)
    compiled = torch.compile(eigh, fullgraph=True, backend="aot_eager")
    results = []
    for function in (compiled, eigh):
        leaf = X.clone().requires_grad_()
        Q = function(leaf)
        (Q * G).sum().backward()
        results.append((Q.detach(), leaf.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


def test_compiled_graph_holds_the_custom_operator_without_breaks():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(eigh)(torch.randn(40, 40))
    assert explanation.graph_break_count == 0
    (graph,) = explanation.graphs
    targets = {str(node.target) for node in graph.graph.nodes}
    assert "tether.skew_exp.default" in targets
    assert not any("matrix_exp" in target for target in targets)


@FORWARD_AD
def test_gradcheck_through_the_compiled_operators():
    torch._dynamo.reset()
    compiled = torch.compile(eigh, backend="aot_eager")
    X = skew((33, 33), torch.float64, torch.Generator().manual_seed(2), 12.0).requires_grad_()
    assert torch.autograd.gradcheck(compiled, (X,))


def test_compiled_second_derivatives_raise_instead_of_coming_out_wrong():
    torch._dynamo.reset()
    compiled = torch.compile(eigh, backend="aot_eager")
    X = torch.randn(33, 33, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(compiled(X).sum(), X, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_export_takes_torch_matrix_exp_so_that_the_program_needs_only_torch():
    class Exponential(torch.nn.Module):
        def forward(self, X: torch.Tensor) -> torch.Tensor:
            return skew_matrix_exp(X)

    program = torch.export.export(Exponential(), (torch.randn(40, 40),))
    targets = {str(node.target) for node in program.graph.nodes}
    assert any("matrix_exp" in target for target in targets)
    assert not any("tether" in target for target in targets)


# The divided differences of the backward, against 40-digit arithmetic


def reference_divided_differences(a: float, b: float) -> tuple[float, float]:
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40

    def f(x):
        return mpmath.cos(mpmath.sqrt(x)) - 1

    def s(x):
        return mpmath.sin(mpmath.sqrt(x)) / mpmath.sqrt(x) if x else mpmath.mpf(1)

    x, y = mpmath.mpf(a) ** 2, mpmath.mpf(b) ** 2
    if x == y:  # the derivatives, from their series (exact at 0)
        d_f = mpmath.nsum(lambda m: (-1) ** m * m * x ** (m - 1) / mpmath.factorial(2 * m), [1, 60])
        d_s = mpmath.nsum(
            lambda m: (-1) ** m * m * x ** (m - 1) / mpmath.factorial(2 * m + 1), [1, 60]
        )
        return float(d_f), float(d_s)
    return float((f(x) - f(y)) / (x - y)), float((s(x) - s(y)) / (x - y))


@pytest.mark.parametrize("dtype", REAL)
def test_divided_differences_are_accurate_for_close_and_equal_angles(dtype):
    generator = torch.Generator().manual_seed(0)
    base = torch.cat(
        [
            8 * torch.rand(12, dtype=torch.float64, generator=generator),
            1.2 * torch.rand(8, dtype=torch.float64, generator=generator),
            torch.tensor([0.0, 1e-9, 0.95, 1.0, 1.05, 4.4934], dtype=torch.float64),
        ]
    )
    offsets = [0.0, 1e-9, 1e-5, 0.03, 0.12]
    theta = torch.cat([base + offset for offset in offsets]).to(dtype)
    gamma_f, gamma_s = _divided_differences(theta)
    angles = theta.double().tolist()
    pairs = torch.randint(0, len(angles), (400, 2), generator=generator).tolist()
    for i, j in [(i, i) for i in range(len(angles))] + pairs:
        scale = 1 / (1 + angles[i] ** 2 + angles[j] ** 2)  # of both Γ
        expected_f, expected_s = reference_divided_differences(angles[i], angles[j])
        tolerance = 100 * torch.finfo(dtype).eps * max(scale, abs(expected_f))
        assert abs(gamma_f[i, j].item() - expected_f) <= tolerance
        tolerance = 100 * torch.finfo(dtype).eps * max(scale, abs(expected_s))
        assert abs(gamma_s[i, j].item() - expected_s) <= tolerance


@pytest.mark.parametrize("dtype", REAL)
def test_divided_differences_from_the_series_are_accurate_up_to_angle_2(dtype):
    # The path the backward takes when no angle exceeds 2 (small or fresh weights).
    generator = torch.Generator().manual_seed(1)
    base = torch.cat(
        [
            2 * torch.rand(10, dtype=torch.float64, generator=generator),
            torch.tensor([0.0, 1e-9, 0.05, 1.0], dtype=torch.float64),
        ]
    )
    close = (base + 1e-6).clamp(max=2.0)
    theta = torch.cat([base, close, torch.tensor([2.0], dtype=torch.float64)]).to(dtype)
    gamma_f, gamma_s = _divided_differences(theta, theta.max().item())
    angles = theta.double().tolist()
    for i in range(len(angles)):
        for j in range(len(angles)):
            scale = 1 / (1 + angles[i] ** 2 + angles[j] ** 2)
            expected_f, expected_s = reference_divided_differences(angles[i], angles[j])
            tolerance = 100 * torch.finfo(dtype).eps * max(scale, abs(expected_f))
            assert abs(gamma_f[i, j].item() - expected_f) <= tolerance
            tolerance = 100 * torch.finfo(dtype).eps * max(scale, abs(expected_s))
            assert abs(gamma_s[i, j].item() - expected_s) <= tolerance
