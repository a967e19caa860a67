"""What geotorch users rely on: sample() without arguments, update_base everywhere, torus, f=."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import tether
from tether.constraints import (
    AlmostOrthogonal,
    Bounded,
    Constraint,
    FixedRank,
    Grassmannian,
    Hurwitz,
    Invertible,
    LowRank,
    Orthogonal,
    PoincareBall,
    Positive,
    PositiveDefinite,
    PositiveSemidefinite,
    PSDFixedRank,
    PSDLowRank,
    Simplex,
    Skew,
    SpecialLinear,
    SpecialOrthogonal,
    SpectralNorm,
    Sphere,
    Symmetric,
    register_constraint,
)

Register = Callable[[nn.Module], nn.Module]

# Every registering function with a constraint of tether's (weight_norm is a plain module),
# on a 5 x 5 weight (4 x 6 where the shape matters to the constraint).
REGISTER: dict[str, Register] = {
    "orthogonal": tether.orthogonal,
    "orthogonal_wide": tether.orthogonal,
    "special_orthogonal": tether.special_orthogonal,
    "grassmannian": tether.grassmannian,
    "low_rank": lambda m: tether.low_rank(m, "weight", 2),
    "fixed_rank": lambda m: tether.fixed_rank(m, "weight", 2),
    "almost_orthogonal": lambda m: tether.almost_orthogonal(m, "weight", 0.5),
    "positive_definite": tether.positive_definite,
    "positive_semidefinite": tether.positive_semidefinite,
    "psd_low_rank": lambda m: tether.psd_low_rank(m, "weight", 2),
    "psd_fixed_rank": lambda m: tether.psd_fixed_rank(m, "weight", 2),
    "invertible": tether.invertible,
    "special_linear": tether.special_linear,
    "hurwitz": tether.hurwitz,
    "symmetric": tether.symmetric,
    "skew": tether.skew,
    "positive": tether.positive,
    "bounded": lambda m: tether.bounded(m, low=-1.0, high=2.0),
    "simplex": tether.simplex,
    "sphere": tether.sphere,
    "poincare_ball": tether.poincare_ball,
    "spectral_norm": tether.spectral_norm,
}
SHAPES = {"orthogonal_wide": (4, 6), "grassmannian": (6, 4), "low_rank": (4, 6)}


def registered(kind: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    n, k = SHAPES.get(kind, (5, 5))
    layer = nn.Linear(k, n, bias=False).to(dtype)
    if kind in ("positive_definite", "positive_semidefinite", "psd_low_rank", "psd_fixed_rank"):
        with torch.no_grad():
            layer.weight.copy_(layer.weight @ layer.weight.T + 0.1 * torch.eye(n, dtype=dtype))
    return REGISTER[kind](layer)


def weight_of(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def original(layer: nn.Module, name: str) -> torch.Tensor:
    """``layer.parametrizations.weight.<name>``, typed."""
    return layer.get_parameter(f"parametrizations.weight.{name}")


def constraint_of(layer: nn.Module) -> Constraint:
    constraint = layer.get_submodule("parametrizations.weight.0")
    assert isinstance(constraint, Constraint)
    return constraint


def orthogonal_of(layer: nn.Module) -> Orthogonal:
    constraint = constraint_of(layer)
    assert isinstance(constraint, Orthogonal)
    return constraint


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", REGISTER)
def test_sample_without_arguments_draws_like_the_registered_tensor(
    kind: str, dtype: torch.dtype
) -> None:
    layer = registered(kind, dtype)
    constraint = constraint_of(layer)
    X = constraint.sample()
    assert (X.shape, X.dtype, X.device) == (layer.weight.shape, dtype, layer.weight.device)
    assert constraint.in_manifold(X)


@pytest.mark.parametrize("kind", ["orthogonal", "low_rank", "sphere"])
def test_sample_follows_the_module_to_another_dtype(kind: str) -> None:
    layer = registered(kind, torch.float32).to(torch.float64)
    assert constraint_of(layer).sample().dtype == torch.float64


@pytest.mark.parametrize("kind", ["orthogonal", "almost_orthogonal", "positive_definite"])
def test_sample_without_arguments_can_be_assigned(kind: str) -> None:
    layer = registered(kind)
    X = constraint_of(layer).sample()
    layer.weight = X
    eps = torch.finfo(X.dtype).eps
    torch.testing.assert_close(layer.weight, X, atol=1e3 * eps, rtol=0)


def test_sample_of_a_shape_keeps_working_on_a_registered_constraint() -> None:
    constraint = constraint_of(registered("orthogonal"))
    Q = constraint.sample((3, 2), dtype=torch.float32)
    assert (Q.shape, Q.dtype) == (torch.Size([3, 2]), torch.float32)


def test_sample_without_a_shape_on_an_unregistered_constraint_says_what_to_do() -> None:
    with pytest.raises(TypeError, match=r"Orthogonal\.sample\(\) needs a shape"):
        Orthogonal().sample()


def test_sample_in_bfloat16_is_drawn_in_float32_and_rounded() -> None:
    layer = registered("orthogonal", torch.bfloat16)
    Q = constraint_of(layer).sample()
    assert Q.dtype == torch.bfloat16
    assert constraint_of(layer).in_manifold(Q)


# spectral_norm's right inverse keeps the value as the original, as PyTorch's does, so
# re-assigning divides by the estimated sigma once more: the weight moves by its error.
@pytest.mark.parametrize("kind", [kind for kind in REGISTER if kind != "spectral_norm"])
def test_update_base_keeps_the_weight(kind: str) -> None:
    layer = registered(kind)
    with torch.no_grad():
        for each in layer.get_submodule("parametrizations.weight").parameters():
            each.add_(0.01 * torch.randn_like(each))
    before = weight_of(layer).detach().clone()
    tether.update_base(layer)
    eps = torch.finfo(before.dtype).eps
    torch.testing.assert_close(weight_of(layer), before, atol=1e4 * eps, rtol=0)


def test_update_base_without_a_base_rewrites_the_originals() -> None:
    layer = registered("low_rank")
    with torch.no_grad():
        original(layer, "original0").mul_(3.0)  # not orthonormal any more
    tether.update_base(layer)
    U = original(layer, "original0")
    eye = torch.eye(2, dtype=U.dtype)
    torch.testing.assert_close(U.T @ U, eye, atol=100 * torch.finfo(U.dtype).eps, rtol=0)


def test_update_base_on_a_plain_tensor_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="has no parametrization"):
        tether.update_base(nn.Linear(3, 3))


@pytest.mark.parametrize("shape", [(6, 6), (7, 7), (6, 3), (3, 6), (2, 4, 4)])
@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
def test_torus_sample_is_a_member(shape: tuple[int, ...], orthogonal_map: str) -> None:
    constraint = Orthogonal(orthogonal_map)  # type: ignore[arg-type]
    Q = constraint.sample(shape, distribution="torus", dtype=torch.float64)
    assert Q.shape == shape
    assert constraint.in_manifold(Q)


def test_torus_eigenvalue_angles_are_spread() -> None:
    n = 400
    layer = tether.orthogonal(nn.Linear(n, n).double())
    Q = orthogonal_of(layer).sample("torus", generator=torch.Generator().manual_seed(0))
    angles = torch.linalg.eigvals(Q).angle().abs()
    # |θ| uniform on (0, π): each third of the half circle holds about a third of them
    # (n / 3 ± 2 n / 27 at 5 standard deviations, for n / 2 independent angles).
    counts = torch.histc(angles, bins=3, min=0.0, max=math.pi)
    assert bool((counts >= n / 6).all()), counts


def test_torus_is_a_rotation_for_special_orthogonal() -> None:
    Q = SpecialOrthogonal().sample((5, 5), distribution="torus", dtype=torch.float64)
    assert float(torch.linalg.det(Q)) == pytest.approx(1.0)


def test_torus_init_draws_the_angles() -> None:
    Q = Orthogonal().sample((4, 4), distribution="torus", init_=nn.init.zeros_)
    torch.testing.assert_close(Q, torch.eye(4))


def test_uniform_sample_assigns_as_in_geotorch() -> None:
    layer = registered("orthogonal")
    Q = orthogonal_of(layer).sample("uniform")
    layer.weight = Q
    torch.testing.assert_close(weight_of(layer), Q, atol=1e3 * torch.finfo(Q.dtype).eps, rtol=0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.sample("haar"), ValueError, "'uniform', 'torus'"),
        (lambda c: c.sample("torus", distribution="torus"), TypeError, "twice"),
        (lambda c: c.sample((3, 3), init_=nn.init.zeros_), ValueError, "torus"),
    ],
)
def test_bad_distribution_arguments(
    call: Callable[[Orthogonal], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call(Orthogonal())


@pytest.mark.parametrize("f", ["sin", "tanh", "scaled_sigmoid", (torch.tanh, torch.atanh)])
def test_almost_orthogonal_f_keeps_the_singular_values_in_the_interval(f: object) -> None:
    layer = tether.almost_orthogonal(nn.Linear(5, 4).double(), "weight", 0.5, f)  # type: ignore[arg-type]
    with torch.no_grad():
        original(layer, "original1").mul_(10.0)
    sigma = torch.linalg.svdvals(layer.weight)
    eps = torch.finfo(sigma.dtype).eps
    assert bool(((sigma >= 0.5 - 10 * eps) & (sigma <= 1.5 + 10 * eps)).all())


@pytest.mark.parametrize("f", ["sin", "tanh", "scaled_sigmoid"])
def test_almost_orthogonal_f_sets_a_member(f: str) -> None:
    constraint = AlmostOrthogonal(0.5, f)
    X = constraint.sample((4, 3), dtype=torch.float64)
    layer = nn.Linear(3, 4, bias=False).double()
    tether.register_parametrization(layer, "weight", constraint)
    layer.weight = X
    torch.testing.assert_close(layer.weight, X, atol=1e4 * torch.finfo(X.dtype).eps, rtol=0)


@pytest.mark.parametrize("f", ["relu", torch.tanh, 3])
def test_almost_orthogonal_f_refused_lists_the_choices(f: object) -> None:
    with pytest.raises(ValueError, match="'sin', 'tanh', 'scaled_sigmoid'"):
        AlmostOrthogonal(0.1, f)  # type: ignore[arg-type]


def test_fixed_rank_f_softplus_is_the_default_map() -> None:
    layer = tether.fixed_rank(nn.Linear(4, 4).double(), "weight", 2, "softplus")
    assert int(torch.linalg.matrix_rank(layer.weight)) == 2


def test_fixed_rank_other_f_is_refused() -> None:
    with pytest.raises(ValueError, match="'softplus'"):
        tether.fixed_rank(nn.Linear(4, 4), "weight", 2, "sigmoid")


@pytest.mark.parametrize("function", [tether.low_rank, tether.fixed_rank, tether.psd_low_rank])
def test_missing_rank_is_a_type_error(function: Callable[..., nn.Module]) -> None:
    with pytest.raises(TypeError, match="missing required argument 'rank'"):
        function(nn.Linear(4, 4))


@pytest.mark.parametrize(
    "function",
    [
        tether.orthogonal,
        tether.special_orthogonal,
        tether.grassmannian,
        tether.low_rank,
        tether.fixed_rank,
        tether.almost_orthogonal,
        tether.positive_definite,
        tether.sphere,
        tether.bounded,
        tether.symmetric,
    ],
)
def test_helpers_document_their_arguments(function: Callable[..., nn.Module]) -> None:
    assert "Args:\n        module:" in (function.__doc__ or "")


@pytest.mark.parametrize("shape", [(3, 2), (1, 3), (4,)])
@pytest.mark.parametrize("constraint", [Skew, Symmetric])
def test_subspace_called_on_a_non_square_tensor_raises(
    constraint: type[Constraint], shape: tuple[int, ...]
) -> None:
    # geotorch's Skew()(X) and Symmetric()(X) refuse it; a (1, 3) X once broadcast to (3, 3).
    with pytest.raises(ValueError, match=r"square matrix"):
        constraint()(torch.rand(shape))


# size=, as geotorch's classes take it: every constraint class (SpectralNorm is built from
# the weight itself), with a size it takes and one it has no member of.
Build = Callable[..., Constraint]
SIZED: dict[str, tuple[Build, tuple[int, ...], tuple[int, ...]]] = {
    "Orthogonal": (Orthogonal, (7, 3), (3,)),
    "SpecialOrthogonal": (SpecialOrthogonal, (4, 4), (4, 3)),
    "Grassmannian": (Grassmannian, (6, 4), (6,)),
    "LowRank": (lambda **kw: LowRank(2, **kw), (4, 6), (1, 6)),
    "FixedRank": (lambda **kw: FixedRank(2, **kw), (4, 6), (4, 1)),
    "AlmostOrthogonal": (lambda **kw: AlmostOrthogonal(0.5, **kw), (5, 5), (5,)),
    "PositiveDefinite": (PositiveDefinite, (4, 4), (4, 3)),
    "PositiveSemidefinite": (PositiveSemidefinite, (4, 4), (4, 3)),
    "PSDLowRank": (lambda **kw: PSDLowRank(2, **kw), (4, 4), (1, 1)),
    "PSDFixedRank": (lambda **kw: PSDFixedRank(2, **kw), (4, 4), (4, 3)),
    "Invertible": (Invertible, (4, 4), (4, 3)),
    "SpecialLinear": (SpecialLinear, (4, 4), (4, 3)),
    "Hurwitz": (Hurwitz, (4, 4), (4, 3)),
    "Symmetric": (Symmetric, (4, 4), (4, 3)),
    "Skew": (Skew, (2, 4, 4), (4, 3)),
    "Positive": (Positive, (3, 4), (3, 0)),
    "Bounded": (lambda **kw: Bounded(-1.0, 2.0, **kw), (3, 4), (0,)),
    "Simplex": (Simplex, (3, 4), ()),
    "Sphere": (Sphere, (3, 4), (0, 4)),
    "PoincareBall": (PoincareBall, (3, 4), ()),
}


def test_every_constraint_class_is_tried_with_size() -> None:
    classes = {
        name
        for name in tether.constraints.__all__
        if isinstance(cls := getattr(tether.constraints, name), type)
        and issubclass(cls, Constraint)
        and cls not in (Constraint, SpectralNorm)
    }
    assert classes == set(SIZED)


@pytest.mark.parametrize("name", SIZED)
def test_sample_after_size_draws_a_member_of_that_size(name: str) -> None:
    build, size, _ = SIZED[name]
    constraint = build(size=size)
    X = constraint.sample(dtype=torch.float64)
    assert X.shape == size
    assert constraint.in_manifold(X)


@pytest.mark.parametrize("name", SIZED)
def test_impossible_size_raises_at_construction(name: str) -> None:
    build, _, bad = SIZED[name]
    with pytest.raises(ValueError, match=re.escape(f"size={bad}")):
        build(size=bad)


@pytest.mark.parametrize("name", SIZED)
def test_registering_on_another_shape_names_both(name: str) -> None:
    build, size, _ = SIZED[name]
    other = tuple(d + 1 for d in size)
    module = nn.Module()
    module.weight = nn.Parameter(torch.randn(other, dtype=torch.float64))
    expected = rf"size={re.escape(str(size))}.*Module\.weight has shape {re.escape(str(other))}"
    with pytest.raises(ValueError, match=expected):
        register_constraint(module, "weight", build(size=size))


@pytest.mark.parametrize("name", SIZED)
def test_registering_on_the_size_keeps_working(name: str) -> None:
    build, size, _ = SIZED[name]
    module = nn.Module()
    module.weight = nn.Parameter(build(size=size).sample(dtype=torch.float64))
    register_constraint(module, "weight", build(size=size))
    assert constraint_of(module).sample().shape == size


def test_register_parametrization_with_another_shape_names_both() -> None:
    with pytest.raises(ValueError, match=r"size=\(7, 3\).*has shape \(4, 4\)"):
        tether.register_parametrization(nn.Linear(4, 4), "weight", Orthogonal(size=(7, 3)))


def test_sample_of_a_shape_overrides_size() -> None:
    assert Orthogonal(size=(7, 3)).sample((3, 5)).shape == (3, 5)


# lower=: geotorch's triangle maps. Its defaults build from the lower triangle; tether's
# default (lower=None) stays the projection.
def triangle_map(kind: str, lower: bool, X: torch.Tensor) -> torch.Tensor:
    T = X.tril(-1) if lower else X.triu(1)
    D = torch.diag_embed(X.diagonal(dim1=-2, dim2=-1))
    return T - T.mT if kind == "skew" else T + T.mT + D


SUBSPACES = {"skew": Skew, "symmetric": Symmetric}


@pytest.mark.parametrize("lower", [True, False])
@pytest.mark.parametrize("kind", SUBSPACES)
def test_lower_builds_from_one_triangle(kind: str, lower: bool) -> None:
    X = torch.randn(2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(SUBSPACES[kind](lower)(X), triangle_map(kind, lower, X))


@pytest.mark.parametrize("kind", SUBSPACES)
def test_lower_none_is_the_projection(kind: str) -> None:
    X = torch.randn(4, 4, dtype=torch.float64)
    sign = -1 if kind == "skew" else 1
    torch.testing.assert_close(SUBSPACES[kind]()(X), (X + sign * X.T) / 2)


@pytest.mark.parametrize("lower", [None, True, False])
@pytest.mark.parametrize("kind", SUBSPACES)
def test_lower_sets_a_complex_member_exactly(kind: str, lower: bool | None) -> None:
    layer = nn.Module()
    layer.weight = nn.Parameter(torch.randn(4, 4, dtype=torch.complex128))
    helper = tether.skew if kind == "skew" else tether.symmetric
    helper(layer, lower=lower)
    constraint = constraint_of(layer)
    assert isinstance(constraint, (Skew, Symmetric))
    assert constraint.lower is lower
    A = constraint.sample()
    layer.weight = A
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(layer.weight, A, atol=10 * eps, rtol=0)
    assert constraint.in_manifold(constraint(torch.randn(4, 4, dtype=torch.complex128)))


@pytest.mark.parametrize("kind", SUBSPACES)
def test_lower_leaves_the_other_triangle_of_the_original_out(kind: str) -> None:
    layer = SUBSPACES[kind](lower=True)
    X = torch.randn(4, 4, requires_grad=True)
    layer(X).square().sum().backward()
    assert X.grad is not None
    assert torch.equal(X.grad.triu(1), torch.zeros(4, 4))
    assert int(X.grad.tril(-1).count_nonzero()) == 6


@pytest.mark.parametrize("kind", SUBSPACES)
def test_lower_of_another_type_is_refused(kind: str) -> None:
    with pytest.raises(TypeError, match=r"lower=None.*got 'yes'"):
        SUBSPACES[kind]("yes")  # type: ignore[arg-type]
