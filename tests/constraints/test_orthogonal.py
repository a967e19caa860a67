"""Orthogonal, SpecialOrthogonal, Grassmannian and update_base."""

from __future__ import annotations

import geotorch
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations as torch_parametrizations

import tether
from tether.constraints import Grassmannian, Orthogonal, SpecialOrthogonal
from tether.testing import check_parametrization

MAPS = ["matrix_exp", "cayley", "householder"]
GROUP_MAPS = ["matrix_exp", "cayley"]  # the maps SpecialOrthogonal and Grassmannian accept
SHAPES = [(4, 4), (6, 3), (3, 6), (2, 4, 4), (2, 5, 2), (1, 5), (5, 1)]


def tolerance(dtype: torch.dtype, n: int) -> float:
    return 50 * n * torch.finfo(dtype).eps


def orthonormality_error(W: torch.Tensor) -> float:
    tall = W.mT if W.shape[-2] < W.shape[-1] else W
    eye = torch.eye(tall.shape[-1], dtype=W.dtype)
    return (tall.mH @ tall - eye).abs().max().item()


def scrambled(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite the original with a Gaussian, so the weight is forward of an arbitrary tensor."""
    original = module.parametrizations.weight.original
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        drawn = torch.randn(original.shape, dtype=original.dtype, generator=generator)
        original.copy_(3 * drawn)
    return module


def scrambled_tolerance(module: nn.Module, dtype: torch.dtype, n: int) -> float:
    """:func:`tolerance` grown with the generator's size: scaling and squaring doubles the
    rounding error at each squaring, and the squarings grow with the norm of the skew matrix."""
    original = module.parametrizations.weight.original
    return tolerance(dtype, n) * max(1.0, float(torch.linalg.matrix_norm(original.detach()).max()))


def module_with(weight: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(weight.clone())
    return module


SEEDS = st.integers(0, 2**16)


@st.composite
def matrices(draw, *, square: bool = False):
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    n = draw(st.integers(1, 6))
    k = n if square else draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, n, k, dtype=dtype, generator=generator)


@given(X=matrices(), orthogonal_map=st.sampled_from(MAPS), seed=SEEDS)
def test_forward_of_any_tensor_is_orthonormal(X, orthogonal_map, seed):
    module = scrambled(tether.orthogonal(module_with(X), orthogonal_map=orthogonal_map), seed)
    assert module.weight.shape == X.shape and module.weight.dtype == X.dtype
    atol = scrambled_tolerance(module, X.dtype, max(X.shape[-2:]))
    assert orthonormality_error(module.weight) <= atol


@given(X=matrices(), orthogonal_map=st.sampled_from(MAPS))
def test_assigning_a_member_sets_it_exactly(X, orthogonal_map):
    Q = Orthogonal().sample(X.shape, dtype=X.dtype)
    module = tether.orthogonal(module_with(X), orthogonal_map=orthogonal_map)
    module.weight = Q
    assert torch.allclose(module.weight, Q, atol=tolerance(X.dtype, max(X.shape[-2:])))


@given(X=matrices())
def test_registration_keeps_an_orthogonal_weight(X):
    Q = Orthogonal().sample(X.shape, dtype=X.dtype)
    module = tether.orthogonal(module_with(Q))
    assert torch.allclose(module.weight, Q, atol=tolerance(X.dtype, max(X.shape[-2:])))


@given(X=matrices())
def test_sample_is_a_member(X):
    constraint = Orthogonal()
    assert constraint.in_manifold(constraint.sample(X.shape, dtype=X.dtype))


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_same_weights_and_training_as_pytorch(shape, orthogonal_map):
    W = torch.randn(shape)
    ours, theirs = module_with(W), module_with(W)
    torch.manual_seed(1)
    tether.orthogonal(ours, orthogonal_map=orthogonal_map)
    torch.manual_seed(1)
    torch_parametrizations.orthogonal(theirs, orthogonal_map=orthogonal_map)
    for module in (ours, theirs):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        for _ in range(5):
            optimizer.zero_grad()
            (module.weight.sum() ** 2).backward()
            optimizer.step()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)


@pytest.mark.parametrize("direction", ["torch_to_tether", "tether_to_torch"])
@pytest.mark.parametrize("shape", [(4, 4), (6, 3)], ids=str)
def test_checkpoints_load_both_ways(shape, direction):
    source, target = module_with(torch.randn(shape)), module_with(torch.randn(shape))
    make_source, make_target = tether.orthogonal, torch_parametrizations.orthogonal
    if direction == "torch_to_tether":
        make_source, make_target = make_target, make_source
    make_source(source)
    make_target(target)
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.weight, source.weight)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_unitary_for_complex_weights(dtype):
    module = tether.orthogonal(module_with(torch.randn(4, 4, dtype=dtype)))
    assert orthonormality_error(module.weight) <= tolerance(dtype, 4)


def test_householder_rejects_complex_weights():
    with pytest.raises(ValueError, match=r"householder.*complex"):
        tether.orthogonal(
            module_with(torch.randn(3, 2, dtype=torch.complex64)), orthogonal_map="householder"
        )


def test_vector_gets_an_error_naming_the_tensor_and_sphere():
    with pytest.raises(
        ValueError, match=r"orthogonal\(\) on Module.weight .*\(20,\).*tether.sphere"
    ):
        tether.orthogonal(module_with(torch.randn(20)))


def test_unknown_map_is_rejected_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"'matrix_exp', 'cayley', 'householder'.*'qr'"):
        Orthogonal("qr")  # type: ignore[arg-type]


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley"])
def test_without_trivialization_assignment_says_how_to_fix(orthogonal_map):
    module = tether.orthogonal(
        module_with(torch.randn(3, 3)), orthogonal_map=orthogonal_map, use_trivialization=False
    )
    with pytest.raises(NotImplementedError, match="use_trivialization=True"):
        module.weight = torch.eye(3)


def test_householder_without_trivialization_assigns_exactly():
    Q = Orthogonal().sample((5, 3), dtype=torch.float64)
    module = tether.orthogonal(
        module_with(torch.randn(5, 3, dtype=torch.float64)),
        orthogonal_map="householder",
        use_trivialization=False,
    )
    module.weight = Q
    torch.testing.assert_close(module.weight, Q)


@pytest.mark.parametrize("orthogonal_map", MAPS)
def test_stays_orthogonal_through_training(orthogonal_map):
    layer = tether.orthogonal(nn.Linear(8, 5), orthogonal_map=orthogonal_map)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randn(64, 5)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.mse_loss(layer(x), y).backward()
        optimizer.step()
    assert orthonormality_error(layer.weight) <= 1e-5


@pytest.mark.parametrize(
    "constraint", [Orthogonal(), SpecialOrthogonal(), Grassmannian()], ids=repr
)
def test_check_parametrization_passes(constraint):
    member = constraint.sample((5, 5), dtype=torch.float64)
    check_parametrization(constraint, member)


def test_special_orthogonal_has_determinant_one_after_training():
    layer = tether.special_orthogonal(nn.Linear(4, 4))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x, y = torch.randn(64, 4), torch.randn(64, 4)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.mse_loss(layer(x), y).backward()
        optimizer.step()
    torch.testing.assert_close(torch.linalg.det(layer.weight), torch.tensor(1.0))


def test_householder_keeps_columns_when_the_diagonal_decays():
    layer = tether.orthogonal(nn.Linear(3, 5), orthogonal_map="householder")
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(0.5)  # what weight decay does
    assert orthonormality_error(layer.weight) <= tolerance(torch.float32, 5)


def test_special_orthogonal_projects_a_reflection_onto_rotations():
    reflection = torch.diag(torch.tensor([1.0, 1.0, -1.0]))
    module = tether.special_orthogonal(module_with(reflection))
    assert SpecialOrthogonal().in_manifold(module.weight)
    assert not SpecialOrthogonal().in_manifold(reflection)


def test_special_orthogonal_sample_is_a_rotation():
    Q = SpecialOrthogonal().sample((3, 4, 4), dtype=torch.float64)
    torch.testing.assert_close(torch.linalg.det(Q), torch.ones(3, dtype=torch.float64))


@given(X=matrices(square=True), orthogonal_map=st.sampled_from(GROUP_MAPS), seed=SEEDS)
def test_special_orthogonal_forward_of_any_tensor_is_a_rotation(X, orthogonal_map, seed):
    module = tether.special_orthogonal(module_with(X), orthogonal_map=orthogonal_map)
    module = scrambled(module, seed)
    W = module.weight
    assert W.shape == X.shape and W.dtype == X.dtype
    atol = scrambled_tolerance(module, X.dtype, X.shape[-1])
    assert SpecialOrthogonal().in_manifold(W, atol=atol)


@given(X=matrices(square=True), orthogonal_map=st.sampled_from(GROUP_MAPS))
def test_special_orthogonal_round_trip_of_a_rotation_is_exact(X, orthogonal_map):
    constraint = SpecialOrthogonal(orthogonal_map)
    Q = constraint.sample(X.shape, dtype=X.dtype)
    torch.testing.assert_close(
        constraint(constraint.right_inverse(Q)), Q, atol=tolerance(X.dtype, X.shape[-1]), rtol=0
    )


@given(X=matrices(square=True), orthogonal_map=st.sampled_from(GROUP_MAPS))
def test_special_orthogonal_assigning_a_rotation_sets_it_exactly(X, orthogonal_map):
    Q = SpecialOrthogonal().sample(X.shape, dtype=X.dtype)
    module = tether.special_orthogonal(module_with(X), orthogonal_map=orthogonal_map)
    module.weight = Q
    torch.testing.assert_close(module.weight, Q, atol=tolerance(X.dtype, X.shape[-1]), rtol=0)


@given(X=matrices(square=True))
def test_special_orthogonal_registration_keeps_a_rotation(X):
    Q = SpecialOrthogonal().sample(X.shape, dtype=X.dtype)
    module = tether.special_orthogonal(module_with(Q))
    torch.testing.assert_close(module.weight, Q, atol=tolerance(X.dtype, X.shape[-1]), rtol=0)


@given(X=matrices(square=True))
def test_special_orthogonal_registration_makes_any_weight_a_rotation(X):
    module = tether.special_orthogonal(module_with(X))
    assert SpecialOrthogonal().in_manifold(module.weight, atol=tolerance(X.dtype, X.shape[-1]))


@given(X=matrices(square=True))
def test_special_orthogonal_sample_is_a_member(X):
    Q = SpecialOrthogonal().sample(X.shape, dtype=X.dtype)
    assert Q.shape == X.shape and Q.dtype == X.dtype
    assert SpecialOrthogonal().in_manifold(Q, atol=tolerance(X.dtype, X.shape[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (2, 4, 4), (2, 3, 5, 5)], ids=str)
def test_special_orthogonal_rejects_a_reflected_rotation(shape, dtype):
    reflected = SpecialOrthogonal().sample(shape, dtype=dtype)
    reflected[..., -1] *= -1  # one reflected matrix in the batch is enough to leave SO(n)
    assert Orthogonal().in_manifold(reflected)
    assert not SpecialOrthogonal().in_manifold(reflected)


def test_special_orthogonal_needs_a_square_matrix():
    with pytest.raises(ValueError, match=r"special_orthogonal\(\) on Linear.weight .*square"):
        tether.special_orthogonal(nn.Linear(3, 4))


def test_grassmannian_trains_only_the_subspace():
    layer = tether.grassmannian(nn.Linear(2, 6))
    (layer.weight.sum() ** 2).backward()
    grad = layer.parametrizations.weight.original.grad
    assert torch.count_nonzero(grad[..., :2, :]) == 0
    assert torch.count_nonzero(grad[..., 2:, :]) > 0


def spans_the_same(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """How far the columns of a tall ``X`` (rows of a wide one) are from the span of ``W``'s."""
    if W.shape[-2] < W.shape[-1]:
        W, X = W.mT, X.mT
    return (W @ (W.mT @ X) - X).abs().max()


@given(X=matrices(), orthogonal_map=st.sampled_from(GROUP_MAPS), seed=SEEDS)
def test_grassmannian_forward_of_any_tensor_is_orthonormal(X, orthogonal_map, seed):
    module = scrambled(tether.grassmannian(module_with(X), orthogonal_map=orthogonal_map), seed)
    W = module.weight
    assert W.shape == X.shape and W.dtype == X.dtype
    atol = scrambled_tolerance(module, X.dtype, max(X.shape[-2:]))
    assert Grassmannian().in_manifold(W, atol=atol)


@given(X=matrices(), orthogonal_map=st.sampled_from(GROUP_MAPS))
def test_grassmannian_round_trip_of_a_frame_is_exact(X, orthogonal_map):
    # Not only the subspace: the base is completed from the frame itself, so the frame returns.
    constraint = Grassmannian(orthogonal_map)
    Q = constraint.sample(X.shape, dtype=X.dtype)
    torch.testing.assert_close(
        constraint(constraint.right_inverse(Q)),
        Q,
        atol=tolerance(X.dtype, max(X.shape[-2:])),
        rtol=0,
    )


@given(X=matrices(), orthogonal_map=st.sampled_from(GROUP_MAPS))
def test_grassmannian_assigning_a_frame_sets_it_exactly(X, orthogonal_map):
    Q = Grassmannian().sample(X.shape, dtype=X.dtype)
    module = tether.grassmannian(module_with(X), orthogonal_map=orthogonal_map)
    module.weight = Q
    torch.testing.assert_close(module.weight, Q, atol=tolerance(X.dtype, max(X.shape[-2:])), rtol=0)


@given(X=matrices())
def test_grassmannian_registration_keeps_a_frame(X):
    Q = Grassmannian().sample(X.shape, dtype=X.dtype)
    module = tether.grassmannian(module_with(Q))
    torch.testing.assert_close(module.weight, Q, atol=tolerance(X.dtype, max(X.shape[-2:])), rtol=0)


@given(X=matrices())
def test_grassmannian_registration_keeps_the_span_of_any_weight(X):
    module = tether.grassmannian(module_with(X))
    W = module.weight.detach()
    assert Grassmannian().in_manifold(W, atol=tolerance(X.dtype, max(X.shape[-2:])))
    # relative to |X|: QR is backward stable, so the span is kept up to rounding
    scale = max(X.abs().max().item(), 1.0)
    assert spans_the_same(W, X) <= scale * tolerance(X.dtype, max(X.shape[-2:]))


@given(X=matrices())
def test_grassmannian_sample_is_a_member(X):
    Q = Grassmannian().sample(X.shape, dtype=X.dtype)
    assert Q.shape == X.shape and Q.dtype == X.dtype
    assert Grassmannian().in_manifold(Q, atol=tolerance(X.dtype, max(X.shape[-2:])))


@given(X=matrices(), orthogonal_map=st.sampled_from(GROUP_MAPS))
def test_grassmannian_ignores_the_block_that_rotates_within_the_subspace(X, orthogonal_map):
    constraint = Grassmannian(orthogonal_map)
    constraint.right_inverse(constraint.sample(X.shape, dtype=X.dtype))
    k = min(X.shape[-2:])
    moved = X.clone()
    moved[..., :k, :k] = torch.randn_like(moved[..., :k, :k])
    assert torch.equal(constraint(moved), constraint(X))


GRASSMANNIAN_SHAPES = [(6, 2), (2, 6), (5, 1), (1, 5), (3, 5, 2), (3, 2, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("orthogonal_map", GROUP_MAPS)
@pytest.mark.parametrize("shape", GRASSMANNIAN_SHAPES, ids=str)
def test_grassmannian_check_parametrization_passes_on_non_square(shape, orthogonal_map, dtype):
    constraint = Grassmannian(orthogonal_map)
    check_parametrization(constraint, constraint.sample(shape, dtype=dtype))


@pytest.mark.parametrize("orthogonal_map", GROUP_MAPS)
@pytest.mark.parametrize("features", [(2, 6), (6, 2)], ids=["tall", "wide"])
def test_grassmannian_stays_orthonormal_through_training(features, orthogonal_map):
    layer = tether.grassmannian(nn.Linear(*features), orthogonal_map=orthogonal_map)
    before = layer.weight.detach().clone()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x, y = torch.randn(64, features[0]), torch.randn(64, features[1])
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.mse_loss(layer(x), y).backward()
        optimizer.step()
    W = layer.weight.detach()
    assert spans_the_same(W, before) > 0.1  # the subspace moved
    assert orthonormality_error(W) <= 1e-5
    assert Grassmannian().in_manifold(W)


def test_update_base_keeps_the_weight_and_resets_the_original():
    layer = tether.orthogonal(nn.Linear(4, 4))
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(0.3 * torch.randn(4, 4))
    before = layer.weight.detach().clone()
    original = layer.parametrizations.weight.original
    tether.update_base(layer)
    torch.testing.assert_close(layer.weight, before)
    assert layer.parametrizations.weight.original is original
    assert torch.equal(original, -torch.eye(4))


def test_update_base_without_a_base_point_says_what_to_register():
    with pytest.raises(ValueError, match=r"update_base\(\) on Linear.weight.*tether.orthogonal"):
        tether.update_base(nn.Linear(3, 3))


def test_update_base_without_a_base_or_a_right_inverse_says_so_and_changes_nothing():
    layer = tether.orthogonal(nn.Linear(4, 4), orthogonal_map="cayley", use_trivialization=False)
    original = layer.parametrizations.weight.original
    before = original.detach().clone()
    with pytest.raises(
        NotImplementedError,
        match=r"update_base\(\) on Linear.weight: no parametrization.*"
        r"use_trivialization=True",
    ):
        tether.update_base(layer)
    assert layer.parametrizations.weight.original is original
    assert torch.equal(original, before)


@pytest.mark.parametrize("shape", [(5, 5), (7, 3)], ids=str)
def test_geotorch_agrees_on_membership(shape):
    theirs = nn.Module()
    theirs.weight = nn.Parameter(torch.randn(shape))
    geotorch.orthogonal(theirs, "weight")
    ours = tether.orthogonal(module_with(torch.randn(shape)))
    assert Orthogonal().in_manifold(theirs.weight.detach())
    assert theirs.parametrizations.weight[0].in_manifold(ours.weight.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (4, 4), (2, 3, 3)], ids=str)
def test_geotorch_agrees_on_special_orthogonal_membership(shape, dtype):
    theirs = geotorch.SO(shape).to(dtype)
    ours = SpecialOrthogonal()
    assert ours.in_manifold(theirs.sample())
    assert theirs.in_manifold(ours.sample(shape, dtype=dtype), in_so=True)
    reflected = ours.sample(shape, dtype=dtype)
    reflected[..., -1] *= -1
    assert not ours.in_manifold(reflected)
    assert not theirs.in_manifold(reflected, in_so=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(4, 4), *GRASSMANNIAN_SHAPES], ids=str)
def test_geotorch_agrees_on_grassmannian_membership(shape, dtype):
    theirs = geotorch.Grassmannian(shape).to(dtype)
    ours = Grassmannian()
    assert ours.in_manifold(theirs.sample())
    assert theirs.in_manifold(ours.sample(shape, dtype=dtype))
    stretched = 1.1 * ours.sample(shape, dtype=dtype)
    assert not ours.in_manifold(stretched)
    assert not theirs.in_manifold(stretched)


@pytest.mark.parametrize("shape", [(6, 2), (2, 6)], ids=str)
def test_geotorch_agrees_on_registered_grassmannian_weights(shape):
    theirs = nn.Module()
    theirs.weight = nn.Parameter(torch.randn(shape))
    geotorch.grassmannian(theirs, "weight")
    ours = tether.grassmannian(module_with(torch.randn(shape)))
    assert Grassmannian().in_manifold(theirs.weight.detach())
    assert theirs.parametrizations.weight[0].in_manifold(ours.weight.detach())


@pytest.mark.parametrize(
    ("constraint", "shape"),
    [(Orthogonal(), (0, 5, 2)), (SpecialOrthogonal(), (0, 3, 3)), (Grassmannian(), (0, 5, 2))],
    ids=["orthogonal", "special_orthogonal", "grassmannian"],
)
def test_an_empty_batch_is_a_member(constraint, shape):
    empty = torch.zeros(shape)
    assert constraint.distance(empty) == 0
    assert constraint.in_manifold(empty)
    assert constraint.in_manifold(constraint.sample(shape))


def test_one_object_takes_weights_of_another_dtype():
    constraint = Orthogonal()
    Q = constraint.sample((4, 4), dtype=torch.float64)
    constraint.right_inverse(Q.float())  # sets a float32 base
    torch.testing.assert_close(constraint(constraint.right_inverse(Q)), Q)
    assert constraint.base.dtype == torch.float64
