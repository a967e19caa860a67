"""Constraints on float16 and bfloat16 tensors: computed in float32, stored in the tensor's dtype.

Every registering function, with each of its maps and options, on the shapes it admits
(square, tall and wide ``nn.Linear`` weights, a ``Conv2d`` kernel, a batch of 3 x 3 matrices
for the matrix constraints). See Note [Low-precision tensors].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn

import tether
from tether.constraints import Constraint, Orthogonal, default_atol

LOW = [torch.bfloat16, torch.float16]

pytestmark = pytest.mark.usefixtures("one_thread")


class Helper(NamedTuple):
    register: Callable[[nn.Module], nn.Module]
    square_only: bool = False


HELPERS = {
    "orthogonal": Helper(tether.orthogonal),
    "orthogonal-cayley": Helper(lambda m: tether.orthogonal(m, orthogonal_map="cayley")),
    "orthogonal-householder": Helper(lambda m: tether.orthogonal(m, orthogonal_map="householder")),
    "orthogonal-householder-static": Helper(
        lambda m: tether.orthogonal(m, orthogonal_map="householder", use_trivialization=False)
    ),
    "orthogonal-matrix_exp-static": Helper(
        lambda m: tether.orthogonal(m, orthogonal_map="matrix_exp", use_trivialization=False)
    ),
    "special_orthogonal": Helper(tether.special_orthogonal, square_only=True),
    "special_orthogonal-cayley": Helper(
        lambda m: tether.special_orthogonal(m, orthogonal_map="cayley"), square_only=True
    ),
    "grassmannian": Helper(tether.grassmannian),
    "grassmannian-cayley": Helper(lambda m: tether.grassmannian(m, orthogonal_map="cayley")),
    "low_rank": Helper(lambda m: tether.low_rank(m, rank=2)),
    "fixed_rank": Helper(lambda m: tether.fixed_rank(m, rank=2)),
    "almost_orthogonal": Helper(lambda m: tether.almost_orthogonal(m, lam=0.5)),
    "positive_definite": Helper(tether.positive_definite, square_only=True),
    "positive_definite-softplus": Helper(
        lambda m: tether.positive_definite(m, map="softplus"), square_only=True
    ),
    "positive_semidefinite": Helper(tether.positive_semidefinite, square_only=True),
    "psd_low_rank": Helper(lambda m: tether.psd_low_rank(m, rank=2), square_only=True),
    "psd_fixed_rank": Helper(lambda m: tether.psd_fixed_rank(m, rank=2), square_only=True),
    "invertible": Helper(tether.invertible, square_only=True),
    "special_linear": Helper(tether.special_linear, square_only=True),
    "hurwitz": Helper(tether.hurwitz, square_only=True),
    "symmetric": Helper(tether.symmetric, square_only=True),
    "skew": Helper(tether.skew, square_only=True),
    "positive": Helper(tether.positive),
    "positive-exp": Helper(lambda m: tether.positive(m, map="exp")),
    "bounded": Helper(lambda m: tether.bounded(m, low=-0.1, high=0.2)),
    "simplex": Helper(tether.simplex),
    "sphere": Helper(tether.sphere),
    "poincare_ball": Helper(tether.poincare_ball),
    "spectral_norm": Helper(tether.spectral_norm),
    "spectral_norm-exact": Helper(lambda m: tether.spectral_norm(m, exact=True)),
    "spectral_norm-bound": Helper(lambda m: tether.spectral_norm(m, bound=2.0)),
    "weight_norm": Helper(tether.weight_norm),
}

# A constructor and an input for each shape class; the kernel (4, 3, 3, 3) is a batch of 3 x 3
# matrices for the matrix constraints.
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "square": (lambda: nn.Linear(4, 4), (2, 4)),
    "tall": (lambda: nn.Linear(3, 6), (2, 3)),
    "wide": (lambda: nn.Linear(6, 3), (2, 6)),
    "conv": (lambda: nn.Conv2d(3, 4, 3), (2, 3, 5, 5)),
}

CASES = [
    pytest.param(helper, layer, id=f"{helper}-{layer}")
    for helper, spec in HELPERS.items()
    for layer in LAYERS
    if not (spec.square_only and layer in ("tall", "wide"))
]
CONSTRAINT_CASES = [case for case in CASES if not case.values[0].startswith("weight_norm")]
# Without a base point the exponential has no right inverse: nothing can be assigned.
ASSIGNABLE_CASES = [c for c in CONSTRAINT_CASES if c.values[0] != "orthogonal-matrix_exp-static"]
# The Grassmannian of n-dimensional subspaces of Rⁿ is one point: square weights never move.
TRAINABLE_CASES = [
    c
    for c in CONSTRAINT_CASES
    if not (c.values[0].startswith("grassmannian") and c.values[1] in ("square", "conv"))
]


def registered(helper: str, layer: str, dtype: torch.dtype) -> nn.Module:
    return HELPERS[helper].register(LAYERS[layer][0]().to(dtype))


def loss(module: nn.Module, layer: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(LAYERS[layer][1]).to(dtype)
    return module(x).float().sum()


def constraint_of(module: nn.Module) -> Constraint:
    constraint = module.parametrizations.weight[0]
    assert isinstance(constraint, Constraint)
    return constraint


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(("helper", "layer"), CASES)
def test_registers_with_the_module_dtype(helper, layer, dtype):
    module = registered(helper, layer, dtype)
    assert module.weight.dtype == dtype
    assert {t.dtype for t in module.parametrizations.weight.parameters()} == {dtype}


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(("helper", "layer"), CONSTRAINT_CASES)
def test_the_weight_is_in_the_set_to_the_dtype_tolerance(helper, layer, dtype):
    module = registered(helper, layer, dtype)
    W = module.weight.detach()
    assert constraint_of(module).distance(W) <= default_atol(dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(("helper", "layer"), CONSTRAINT_CASES)
def test_the_weight_is_computed_in_float32_and_rounded(helper, layer, dtype):
    # What the native low-precision computation, where it runs at all, does not give.
    module = registered(helper, layer, dtype).eval()  # eval: spectral norm's vectors stay
    plist = module.parametrizations.weight
    with torch.no_grad():
        expected = plist[0](*(original.float() for original in plist.originals()))
        assert torch.equal(module.weight, expected.to(dtype))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(("helper", "layer"), CASES)
def test_gradients_have_the_original_dtype(helper, layer, dtype):
    module = registered(helper, layer, dtype)
    loss(module, layer, dtype).backward()
    originals = module.parametrizations.weight.originals()
    assert all(t.grad is not None and t.grad.dtype == dtype for t in originals)
    assert all(bool(t.grad.isfinite().all()) for t in originals)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(("helper", "layer"), TRAINABLE_CASES)
def test_sgd_steps_keep_the_weight_in_the_set(helper, layer, dtype):
    module = registered(helper, layer, dtype)
    before = module.weight.detach().clone()
    # Steps large enough to move bfloat16 originals (smaller updates round to nothing).
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        loss(module, layer, dtype).backward()
        optimizer.step()
    W = module.weight.detach()
    assert W.dtype == dtype and not torch.equal(W, before)
    assert constraint_of(module).distance(W) <= default_atol(dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(("helper", "layer"), ASSIGNABLE_CASES)
def test_assigning_a_sample_sets_it(helper, layer, dtype):
    module = registered(helper, layer, dtype)
    constraint = constraint_of(module)
    shape = module.weight.shape
    X = constraint.sample(shape, dtype=dtype)
    assert X.dtype == dtype
    module.weight = X
    assert constraint.distance(module.weight.detach()) <= default_atol(dtype)
    scale = max(float(X.abs().max()), 1.0)
    assert torch.allclose(module.weight.float(), X.float(), atol=default_atol(dtype) * scale)


@pytest.mark.parametrize(
    ("dtype", "other"),
    [
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float64),
        (torch.float16, torch.float32),
    ],
)
@pytest.mark.parametrize("helper", HELPERS)
def test_module_to_another_dtype_after_registering(helper, dtype, other):
    module = registered(helper, "square", dtype).to(other)
    assert module.weight.dtype == other
    assert {t.dtype for t in module.parametrizations.weight[0].buffers()} <= {other}
    loss(module, "square", other).backward()
    assert module.parametrizations.weight.originals()[0].grad.dtype == other


@pytest.mark.parametrize("map", ["matrix_exp", "cayley", "householder"])
def test_orthogonal_base_is_stored_in_the_weight_dtype(map):
    module = tether.orthogonal(nn.Linear(5, 3).to(torch.bfloat16), orthogonal_map=map)
    assert module.parametrizations.weight[0].base.dtype == torch.bfloat16
    tether.update_base(module)
    assert module.parametrizations.weight[0].base.dtype == torch.bfloat16


def test_update_base_keeps_a_bfloat16_weight():
    module = tether.orthogonal(nn.Linear(4, 4).to(torch.bfloat16))
    with torch.no_grad():
        module.parametrizations.weight.original.add_(0.1)
    base = module.parametrizations.weight[0].base
    before = module.weight.detach().float()
    tether.update_base(module)
    assert module.parametrizations.weight[0].base is base  # updated in place
    atol = 4 * torch.finfo(torch.bfloat16).eps
    assert torch.allclose(module.weight.float(), before, atol=atol)


@pytest.mark.parametrize("dtype", LOW)
def test_membership_uses_the_tolerance_of_the_stored_dtype(dtype):
    constraint = Orthogonal()
    Q = constraint.sample((8, 8), dtype=torch.float32)
    rounded = Q.to(dtype)
    # Rounding moves Q off the set by more than float32's tolerance, not by more than dtype's.
    assert constraint.distance(rounded.float()) > default_atol(torch.float32)
    assert constraint.in_manifold(rounded)
    assert not constraint.in_manifold(1.2 * rounded)


@pytest.mark.parametrize("helper", [h for h in HELPERS if h != "weight_norm"])
def test_autocast_around_a_float32_model(helper):
    module = registered(helper, "square", torch.float32)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # The weight is a float32 parameter, which autocast casts where it is used.
        assert module.weight.dtype == torch.float32
        y = module(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert module.parametrizations.weight.originals()[0].grad.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_complex32_computes_in_complex64():
    module = nn.Module()
    module.register_buffer("weight", torch.randn(4, 3, dtype=torch.complex64).to(torch.complex32))
    tether.orthogonal(module)
    W = module.weight
    assert W.dtype == torch.complex32
    assert module.parametrizations.weight[0].base.dtype == torch.complex32
    assert Orthogonal().in_manifold(W)
