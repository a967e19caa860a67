"""Sphere and PoincareBall, and their registering functions sphere and poincare_ball."""

from __future__ import annotations

import copy
import math
import pickle

import geotorch
import pytest
import torch
from geotorch.sphere import SphereEmbedded
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import tether
from tether.constraints import PoincareBall, Sphere, default_atol
from tether.testing import check_parametrization

DTYPES = [torch.float32, torch.float64]
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)


def randn(shape, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, dtype=dtype, generator=generator)


@st.composite
def shapes_and_dims(draw):
    """A small shape (vector, matrix, batch of matrices, kernel) and a ``dim`` for it."""
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    ndim = len(shape)
    options = [None, -1, 0, tuple(range(1, ndim)) or 0, list(range(ndim))]
    return shape, draw(st.sampled_from(options))


def norms(X, dim):
    return torch.linalg.vector_norm(X, dim=dim)


# Sphere


@given(shapes_and_dims(), dtypes, seeds, st.sampled_from([0.5, 1.0, 4.0]))
def test_sphere_forward_is_a_member(shape_dim, dtype, seed, radius):
    shape, dim = shape_dim
    sphere = Sphere(radius, dim=dim)
    Y = sphere(randn(shape, dtype, seed, scale=10.0))
    assert Y.shape == shape and Y.dtype == dtype
    assert sphere.in_manifold(Y)


@given(shapes_and_dims(), dtypes, seeds, st.sampled_from([0.5, 1.0, 4.0]))
def test_sphere_right_inverse_sets_sampled_members(shape_dim, dtype, seed, radius):
    shape, dim = shape_dim
    sphere = Sphere(radius, dim=dim)
    generator = torch.Generator().manual_seed(seed)
    X = sphere.sample(shape, dtype=dtype, generator=generator)
    assert X.shape == shape and X.dtype == dtype
    assert sphere.in_manifold(X)
    assert torch.allclose(sphere(sphere.right_inverse(X)), X, atol=default_atol(dtype))


def test_sphere_sample_is_reproducible_and_uniform():
    sphere = Sphere(dim=-1)
    first = sphere.sample((2000, 3), generator=torch.Generator().manual_seed(0))
    again = sphere.sample((2000, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    # Uniform on S²: each coordinate is uniform on [-1, 1] (Archimedes), mean 0, variance 1/3.
    assert torch.allclose(first.mean(dim=0), torch.zeros(3), atol=0.05)
    assert torch.allclose(first.var(dim=0), torch.full((3,), 1 / 3), atol=0.03)


@pytest.mark.parametrize("dim", [None, -1, (1, 2)])
def test_sphere_projects_non_members_to_the_nearest_point(dim):
    X = randn((2, 3, 4), torch.float64, 0)
    sphere = Sphere(3.0, dim=dim)
    Y = sphere(sphere.right_inverse(X))
    assert torch.allclose(Y, 3.0 * X / torch.linalg.vector_norm(X, dim=dim, keepdim=True))


@pytest.mark.parametrize("dim", [None, -1])
def test_sphere_distance_is_the_worst_slice(dim):
    X = torch.tensor([[3.0, 4.0], [0.6, 0.8]])
    # The whole tensor has norm √26; the worst row has norm 5.
    expected = math.sqrt(26.0) - 1 if dim is None else 4.0
    assert math.isclose(float(Sphere(dim=dim).distance(X)), expected, rel_tol=1e-6)


@pytest.mark.parametrize("dim", [None, -1, (0, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sphere_check_parametrization(dim, dtype):
    sphere = Sphere(2.0, dim=dim)
    check_parametrization(sphere, sphere.sample((3, 4, 2), dtype=dtype))


@pytest.mark.parametrize("dim", [None, 1])
def test_sphere_gradcheck(dim):
    X = randn((3, 4), torch.float64, 1).requires_grad_()
    assert torch.autograd.gradcheck(Sphere(2.0, dim=dim), (X,))


def test_sphere_on_a_linear_layer_keeps_a_member():
    layer = nn.Linear(4, 3)
    X = Sphere(dim=-1).sample((3, 4))
    with torch.no_grad():
        layer.weight.copy_(X)
    tether.sphere(layer, dim=-1)
    assert torch.allclose(layer.weight, X, atol=1e-6)


def test_sphere_on_a_linear_layer_projects_the_weight():
    layer = nn.Linear(4, 3)
    W = layer.weight.detach().clone()
    tether.sphere(layer, radius=2.0)
    assert torch.allclose(layer.weight, 2.0 * W / W.norm(), atol=1e-6)
    assert type(layer).__name__ == "ParametrizedLinear"


@pytest.mark.parametrize("dim", [None, -1])
def test_sphere_training_stays_on_the_sphere(dim):
    torch.manual_seed(0)
    layer = tether.sphere(nn.Linear(5, 4), radius=2.0, dim=dim)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x, y = torch.randn(32, 5), torch.randn(32, 4)
    first = None
    for _ in range(200):
        loss = nn.functional.mse_loss(layer(x), y)
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < first
    assert Sphere(2.0, dim=dim).in_manifold(layer.weight.detach())


def test_sphere_dim_counts_the_other_way_from_weight_norm():
    # weight_norm(dim=0) keeps dimension 0: one norm per output filter, i.e. the norm runs over
    # the other dimensions, which is sphere's dim=(1, 2, 3) on a Conv2d kernel.
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 3, 2), dim=0)
    with torch.no_grad():
        conv.parametrizations.weight.original0.fill_(1.5)
    V = conv.parametrizations.weight.original1.detach()
    assert torch.allclose(Sphere(1.5, dim=(1, 2, 3))(V), conv.weight, atol=1e-6)


def test_sphere_rows_agree_with_geotorch():
    rows = Sphere(dim=-1)
    ours = rows.sample((5, 4))
    assert bool(SphereEmbedded((5, 4)).in_manifold(ours))
    theirs = SphereEmbedded((5, 4)).sample()
    assert rows.in_manifold(theirs)
    X = torch.randn(5, 4)
    assert torch.allclose(rows(X), SphereEmbedded((5, 4))(X), atol=1e-6)


def test_sphere_default_is_the_whole_tensor_unlike_geotorch():
    layer = geotorch.sphere(nn.Linear(4, 5), "weight")
    W = layer.weight.detach()
    assert Sphere(dim=-1).in_manifold(W)
    assert not Sphere().in_manifold(W)  # the whole 5 x 4 matrix has norm √5


def test_sphere_zero_tensor_cannot_be_projected():
    layer = nn.Linear(3, 2)
    nn.init.zeros_(layer.bias)
    with pytest.raises(ValueError, match=r"Linear\.bias.*norm 0.*tolerance") as info:
        tether.sphere(layer, "bias")
    assert "sample" in str(info.value)
    assert type(layer) is nn.Linear  # nothing was registered


def test_sphere_zero_slice_cannot_be_projected_by_right_inverse():
    X = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"Sphere\(radius=1.0\).*slice along dim=-1.*norm 0"):
        Sphere(dim=-1).right_inverse(X)


def test_sphere_on_a_scalar_and_a_vector():
    assert torch.equal(Sphere(2.0)(torch.tensor(-3.0)), torch.tensor(-2.0))
    layer = tether.sphere(nn.Linear(3, 2), "bias")
    assert math.isclose(float(layer.bias.detach().norm()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize(
    ("shape", "dim", "words"),
    [
        (
            (3, 4),
            2,
            r"sphere\(dim=2\) on X needs a tensor with dim=2; got shape \(3, 4\)\..*-2 to 1",
        ),
        ((3, 4), (0, -2), r"distinct dims"),
        ((), -1, r"scalar has no dimensions; use dim=None"),
        ((0, 4), None, r"non-empty"),
    ],
)
def test_sphere_bad_shapes(shape, dim, words):
    with pytest.raises(ValueError, match=words):
        Sphere(dim=dim).check_shape(torch.Size(shape), "X")
    assert not Sphere(dim=dim).in_manifold(torch.ones(shape))


def test_sphere_bad_shape_names_the_layer():
    with pytest.raises(ValueError, match=r"sphere\(dim=2\) on Linear\.weight .* \(3, 4\)"):
        tether.sphere(nn.Linear(4, 3), dim=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"radius": 0.0}, ValueError, "`radius` must be positive"),
        ({"radius": -1}, ValueError, "`radius` must be positive"),
        ({"radius": math.inf}, ValueError, "`radius` must be finite"),
        ({"radius": "1"}, TypeError, "`radius` must be a real number"),
        ({"radius": True}, TypeError, "`radius` must be a real number"),
        ({"dim": 1.0}, TypeError, "`dim` must be None.*an int or a non-empty tuple"),
        ({"dim": ()}, TypeError, "`dim` must be None"),
        ({"dim": (0, 0)}, ValueError, "repeated"),
        ({"dim": (0, "1")}, TypeError, "`dim` must be an int"),
    ],
)
def test_sphere_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        tether.sphere(nn.Linear(3, 2), **kwargs)


def test_sphere_repr_pickle_and_deepcopy():
    sphere = Sphere(2.0, dim=(0, 1))
    assert repr(sphere) == "Sphere(radius=2.0, dim=(0, 1))"
    for clone in [pickle.loads(pickle.dumps(sphere)), copy.deepcopy(sphere)]:
        assert (clone.radius, clone.dim) == (2.0, (0, 1))
    assert Sphere(dim=[0, 1]).dim == (0, 1)


# PoincareBall


@given(shapes_and_dims(), dtypes, seeds, st.sampled_from([0.25, 1.0, 4.0]))
def test_poincare_forward_is_a_member(shape_dim, dtype, seed, c):
    shape, dim = shape_dim
    ball = PoincareBall(c, dim=dim)
    X = ball(randn(shape, dtype, seed, scale=3.0))
    assert X.shape == shape and X.dtype == dtype
    assert ball.in_manifold(X)
    assert bool((norms(X, dim) <= 1 / math.sqrt(c)).all())


@given(shapes_and_dims(), dtypes, seeds, st.sampled_from([0.25, 1.0, 4.0]))
def test_poincare_right_inverse_sets_sampled_members(shape_dim, dtype, seed, c):
    shape, dim = shape_dim
    ball = PoincareBall(c, dim=dim)
    X = ball.sample(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    assert X.shape == shape and X.dtype == dtype
    assert bool((norms(X, dim) < 1 / math.sqrt(c)).all())
    assert torch.allclose(ball(ball.right_inverse(X)), X, atol=default_atol(dtype))


@pytest.mark.parametrize("n", [1, 10, 1000])
def test_poincare_sample_stays_well_inside_in_any_dimension(n):
    X = PoincareBall(c=2.0).sample((50, n), generator=torch.Generator().manual_seed(0))
    radii = math.sqrt(2.0) * X.norm(dim=-1)
    assert float(radii.max()) < 0.999
    if n > 1:
        assert 0.5 < float(radii.median()) < 0.9  # tanh(√c ‖V‖) with √c ‖V‖ ≈ 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_poincare_projects_non_members_inside_by_the_margin(dtype):
    c = 4.0
    X = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.5, 0.0], [0.0, 0.0]], dtype=dtype)
    ball = PoincareBall(c)
    Y = ball(ball.right_inverse(X))
    assert bool(Y.isfinite().all())
    margin = default_atol(dtype)
    radii = X.norm(dim=-1, keepdim=True)
    expected = torch.where(radii < 0.5, X, X / radii * (1 - margin) / 2)
    assert torch.allclose(Y, expected, atol=10 * torch.finfo(dtype).eps)
    assert bool((Y.norm(dim=-1) < 0.5).all())


def test_poincare_distance_is_the_gap_to_the_closed_ball():
    X = torch.tensor([[0.3, 0.4], [3.0, 4.0], [0.0, 0.1]])
    assert math.isclose(float(PoincareBall(c=4.0).distance(X)), 4.5, rel_tol=1e-6)
    assert float(PoincareBall(c=4.0).distance(X[[0, 2]])) == 0.0


@pytest.mark.parametrize("dim", [-1, None, (0, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_poincare_check_parametrization(dim, dtype):
    ball = PoincareBall(0.5, dim=dim)
    check_parametrization(ball, ball.sample((3, 2, 4), dtype=dtype))


def test_poincare_gradcheck():
    V = randn((3, 4), torch.float64, 1).requires_grad_()
    assert torch.autograd.gradcheck(PoincareBall(2.0), (V,))


def test_poincare_embedding_training_stays_in_the_ball():
    torch.manual_seed(0)
    embedding = nn.Embedding(6, 3)
    embedding.weight = nn.Parameter(PoincareBall(c=2.0).sample((6, 3)))
    tether.poincare_ball(embedding, c=2.0)
    optimizer = torch.optim.Adam(embedding.parameters(), lr=0.05)
    target = 3 * torch.randn(6, 3)  # mostly outside the ball: the points are pushed outwards
    for _ in range(200):
        loss = (embedding.weight - target).square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    W = embedding.weight.detach()
    assert PoincareBall(c=2.0).in_manifold(W)
    assert bool((W.norm(dim=-1) <= 1 / math.sqrt(2.0)).all())


def test_poincare_ball_registration_keeps_members_and_projects_the_rest():
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.2], [3.0, 4.0], [-0.5, 0.5]]))
    tether.poincare_ball(layer)
    W = layer.weight.detach()
    assert torch.allclose(W[[0, 2]], torch.tensor([[0.1, 0.2], [-0.5, 0.5]]), atol=1e-6)
    assert math.isclose(float(W[1].norm()), 1 - default_atol(torch.float32), rel_tol=1e-6)


@pytest.mark.parametrize(
    ("shape", "dim", "words"),
    [
        ((3, 4), -3, r"poincare_ball\(dim=-3\) on X needs a tensor with dim=-3"),
        ((), -1, "scalar"),
        ((2, 0), -1, "non-empty"),
    ],
)
def test_poincare_bad_shapes(shape, dim, words):
    with pytest.raises(ValueError, match=words):
        PoincareBall(dim=dim).check_shape(torch.Size(shape), "X")


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"c": 0.0}, ValueError, "`c` must be positive"),
        ({"c": -1.0}, ValueError, "`c` must be positive"),
        ({"c": math.nan}, ValueError, "`c` must be finite"),
        ({"c": None}, TypeError, "`c` must be a real number"),
        ({"dim": "rows"}, TypeError, "`dim` must be None"),
    ],
)
def test_poincare_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        tether.poincare_ball(nn.Linear(3, 2), **kwargs)


def test_poincare_repr():
    assert repr(PoincareBall(2.0, dim=None)) == "PoincareBall(c=2.0, dim=None)"
