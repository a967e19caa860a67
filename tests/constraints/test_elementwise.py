"""Positive, Bounded and Simplex, and their registering functions."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import tether
from tether.constraints import Bounded, Positive, Simplex, default_atol
from tether.functional import project_simplex
from tether.testing import check_parametrization

DTYPES = [torch.float32, torch.float64]
MAPS = ["softplus", "exp"]
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)
# Scalars, vectors, matrices, batches, kernels.
shapes = st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple)
intervals = st.sampled_from([(0.0, 1.0), (-1.0, 1.0), (-0.01, 0.02), (2.0, 50.0)])


def randn(shape, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, dtype=dtype, generator=generator)


def train(layer, target, steps=200):
    """Adam on a squared error pulling the weight towards ``target`` (outside the set)."""
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(steps):
        loss = (layer.weight - target).square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return layer.weight.detach()


# Positive


@given(shapes, dtypes, seeds, st.sampled_from(MAPS))
def test_positive_forward_is_a_member(shape, dtype, seed, map):
    positive = Positive(map)
    Y = positive(randn(shape, dtype, seed, scale=5.0))
    assert Y.shape == shape and Y.dtype == dtype
    assert bool((Y > 0).all())
    assert positive.in_manifold(Y)


@given(shapes, dtypes, seeds, st.sampled_from(MAPS))
def test_positive_right_inverse_sets_sampled_members(shape, dtype, seed, map):
    positive = Positive(map)
    X = positive.sample(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    assert X.shape == shape and X.dtype == dtype
    assert bool((X > 0).all())
    assert torch.allclose(positive(positive.right_inverse(X)), X, rtol=default_atol(dtype))


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_positive_sets_members_of_every_scale(map, dtype):
    X = torch.logspace(-20, 20, 41, dtype=dtype)
    positive = Positive(map)
    assert torch.allclose(positive(positive.right_inverse(X)), X, rtol=default_atol(dtype))


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_positive_raises_non_members_to_the_floor(map, dtype):
    positive = Positive(map)
    X = torch.tensor([-3.0, 0.0, 2.0], dtype=dtype)
    Y = positive(positive.right_inverse(X))
    floor = default_atol(dtype)
    expected = torch.tensor([floor, floor, 2.0], dtype=dtype)
    assert torch.allclose(Y, expected, rtol=10 * torch.finfo(dtype).eps)


def test_positive_exp_sample_is_log_normal():
    X = Positive("exp").sample((4000,), generator=torch.Generator().manual_seed(0))
    assert abs(float(X.log().mean())) < 0.05
    assert abs(float(X.log().std()) - 1) < 0.05


def test_positive_distance_is_the_most_negative_entry():
    assert float(Positive().distance(torch.tensor([[1.0, -2.0], [0.0, -0.5]]))) == 2.0
    assert float(Positive().distance(torch.tensor([0.0, 1.0]))) == 0.0


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 2, 2)])
def test_positive_check_parametrization(map, shape):
    positive = Positive(map)
    check_parametrization(positive, positive.sample(shape, dtype=torch.float64))


@pytest.mark.parametrize("map", MAPS)
def test_positive_gradcheck(map):
    X = randn((3, 2), torch.float64, 1).requires_grad_()
    assert torch.autograd.gradcheck(Positive(map), (X,))
    Y = Positive(map).sample((4,), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(Positive(map).right_inverse, (Y,))


@pytest.mark.parametrize("map", MAPS)
def test_positive_training_stays_positive(map):
    torch.manual_seed(0)
    layer = tether.positive(nn.Linear(4, 3), map=map)
    W = train(layer, target=torch.randn(3, 4) - 1)
    assert bool((W > 0).all())
    assert Positive(map).in_manifold(W)


def test_positive_registration_keeps_positive_entries():
    layer = nn.Linear(4, 3)
    W = layer.weight.detach().clone()
    tether.positive(layer)
    floor = default_atol(torch.float32)
    assert torch.allclose(layer.weight, torch.where(W > 0, W, floor), rtol=1e-5)


def test_positive_on_vectors_and_scalars():
    norm = tether.positive(nn.LayerNorm(3), "bias")
    assert bool((norm.bias > 0).all())
    module = nn.Module()
    module.register_parameter("scale", nn.Parameter(torch.tensor(2.0)))
    tether.positive(module, "scale", map="exp")
    assert torch.allclose(module.scale, torch.tensor(2.0))


@pytest.mark.parametrize(
    ("map", "error", "words"),
    [
        ("relu", ValueError, "`map` must be one of 'softplus', 'exp'; got 'relu'"),
        (torch.exp, TypeError, "`map` must be one of"),
    ],
)
def test_positive_bad_arguments(map, error, words):
    with pytest.raises(error, match=words):
        tether.positive(nn.Linear(2, 2), map=map)


def test_positive_bad_shape():
    module = nn.Module()
    module.register_parameter("weight", nn.Parameter(torch.empty(0, 2)))
    with pytest.raises(ValueError, match=r"positive\(\) on Module\.weight needs a non-empty"):
        tether.positive(module)


@pytest.mark.parametrize("map", MAPS)
def test_positive_repr_pickle_and_deepcopy(map):
    positive = Positive(map)
    assert repr(positive) == f"Positive(map={map!r})"
    X = torch.randn(3)
    for clone in [pickle.loads(pickle.dumps(positive)), copy.deepcopy(positive)]:
        assert torch.equal(clone(X), positive(X))


# Bounded


@given(shapes, dtypes, seeds, intervals)
def test_bounded_forward_is_a_member(shape, dtype, seed, interval):
    bounded = Bounded(*interval)
    Y = bounded(randn(shape, dtype, seed, scale=5.0))
    assert Y.shape == shape and Y.dtype == dtype
    low, high = interval
    assert torch.equal(Y.clamp(low, high), Y)
    assert bounded.in_manifold(Y)


@given(shapes, dtypes, seeds, intervals)
def test_bounded_right_inverse_sets_sampled_members(shape, dtype, seed, interval):
    bounded = Bounded(*interval)
    X = bounded.sample(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    assert X.shape == shape and X.dtype == dtype
    assert bounded.in_manifold(X)
    atol = default_atol(dtype) * (interval[1] - interval[0])
    assert torch.allclose(bounded(bounded.right_inverse(X)), X, rtol=0, atol=atol)


def test_bounded_sample_is_uniform():
    X = Bounded(-1.0, 3.0).sample((4000,), generator=torch.Generator().manual_seed(0))
    assert float(X.min()) >= -1.0 and float(X.max()) <= 3.0
    assert abs(float(X.mean()) - 1.0) < 0.1
    assert abs(float(X.var()) - 16 / 12) < 0.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_bounded_clamps_non_members_inside_by_the_margin(dtype):
    bounded = Bounded(-1.0, 3.0)
    X = torch.tensor([-5.0, -1.0, 0.5, 3.0, 7.0], dtype=dtype)
    Y = bounded(bounded.right_inverse(X))
    margin = 4 * default_atol(dtype)
    expected = torch.tensor([-1 + margin, -1 + margin, 0.5, 3 - margin, 3 - margin], dtype=dtype)
    assert torch.allclose(Y, expected, atol=10 * torch.finfo(dtype).eps)
    assert bool(((Y > -1) & (Y < 3)).all())


def test_bounded_distance_is_the_worst_entry():
    X = torch.tensor([[0.5, -0.5], [2.0, 0.0]])
    assert float(Bounded(0.0, 1.0).distance(X)) == 1.0
    assert float(Bounded(-1.0, 2.0).distance(X)) == 0.0


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 2, 3)])
def test_bounded_check_parametrization(shape):
    bounded = Bounded(-2.0, 0.5)
    check_parametrization(bounded, bounded.sample(shape, dtype=torch.float64))


def test_bounded_gradcheck():
    X = randn((3, 2), torch.float64, 1).requires_grad_()
    assert torch.autograd.gradcheck(Bounded(-1.0, 2.0), (X,))


def test_bounded_training_stays_inside():
    torch.manual_seed(0)
    layer = tether.bounded(nn.Linear(4, 3), low=-0.1, high=0.2)
    W = train(layer, target=torch.randn(3, 4))
    assert bool(((W >= -0.1) & (W <= 0.2)).all())
    assert Bounded(-0.1, 0.2).in_manifold(W)


def test_bounded_registration_keeps_members():
    layer = nn.Linear(4, 3)  # entries in (-1/2, 1/2): all members of [-1, 1]
    W = layer.weight.detach().clone()
    tether.bounded(layer, low=-1, high=1)
    assert torch.allclose(layer.weight, W, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"low": 1.0, "high": 1.0}, ValueError, "`low` < `high`; got low=1.0, high=1.0"),
        ({"low": 2, "high": 1}, ValueError, "`low` < `high`"),
        ({"low": -math.inf, "high": 1.0}, ValueError, "`low` must be finite"),
        ({"low": 0.0, "high": math.nan}, ValueError, "`high` must be finite"),
        ({"low": 0.0, "high": torch.tensor(1.0)}, TypeError, "`high` must be a real number"),
    ],
)
def test_bounded_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        tether.bounded(nn.Linear(2, 2), **kwargs)


def test_bounded_needs_both_ends():
    with pytest.raises(TypeError):
        tether.bounded(nn.Linear(2, 2), low=0.0)


def test_bounded_repr():
    assert repr(Bounded(-1, 2)) == "Bounded(low=-1.0, high=2.0)"


# Simplex


@st.composite
def shapes_and_dim(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    return shape, draw(st.integers(-len(shape), len(shape) - 1))


def sums(X, dim):
    total = X.sum(dim=dim)
    return total, torch.ones_like(total)


@given(shapes_and_dim(), dtypes, seeds)
def test_simplex_forward_is_a_member(shape_dim, dtype, seed):
    shape, dim = shape_dim
    simplex = Simplex(dim)
    P = simplex(randn(shape, dtype, seed, scale=5.0))
    assert P.shape == shape and P.dtype == dtype
    assert bool((P >= 0).all())
    assert torch.allclose(*sums(P, dim), atol=default_atol(dtype))
    assert simplex.in_manifold(P)


@given(shapes_and_dim(), dtypes, seeds)
def test_simplex_right_inverse_sets_sampled_members(shape_dim, dtype, seed):
    shape, dim = shape_dim
    simplex = Simplex(dim)
    P = simplex.sample(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    assert P.shape == shape and P.dtype == dtype
    assert simplex.in_manifold(P)
    assert torch.allclose(simplex(simplex.right_inverse(P)), P, atol=default_atol(dtype))


def test_simplex_sample_is_uniform():
    # Dirichlet(1, 1, 1): each coordinate has mean 1/3 and variance 1/18.
    P = Simplex().sample((4000, 3), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(P.mean(dim=0), torch.full((3,), 1 / 3), atol=0.02)
    assert torch.allclose(P.var(dim=0), torch.full((3,), 1 / 18), atol=0.01)


@pytest.mark.parametrize("dtype", DTYPES)
def test_simplex_sets_members_with_zeros(dtype):
    simplex = Simplex()
    P = torch.tensor([[0.0, 1.0, 0.0], [0.25, 0.0, 0.75]], dtype=dtype)
    assert torch.allclose(simplex(simplex.right_inverse(P)), P, atol=4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_simplex_projects_non_members(dim):
    X = randn((3, 4), torch.float64, 2)
    simplex = Simplex(dim)
    expected = project_simplex(X, dim)
    assert torch.allclose(simplex(simplex.right_inverse(X)), expected, atol=1e-14)
    distance = torch.linalg.vector_norm(X - expected, dim=dim).max()
    assert torch.allclose(simplex.distance(X), distance)


@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_simplex_check_parametrization(dim, dtype):
    simplex = Simplex(dim)
    check_parametrization(simplex, simplex.sample((3, 5), dtype=dtype))


def test_simplex_gradcheck():
    X = randn((3, 4), torch.float64, 1).requires_grad_()
    assert torch.autograd.gradcheck(Simplex(0), (X,))


def test_simplex_training_stays_on_the_simplex():
    torch.manual_seed(0)
    layer = tether.simplex(nn.Linear(5, 3))
    W = train(layer, target=torch.randn(3, 5))
    assert bool((W >= 0).all())
    assert torch.allclose(*sums(W, -1), atol=1e-6)
    assert Simplex().in_manifold(W)


def test_simplex_on_a_vector_and_a_size_one_dimension():
    layer = tether.simplex(nn.Linear(3, 4), "bias")
    assert torch.allclose(layer.bias.sum(), torch.tensor(1.0))
    assert torch.equal(Simplex(0)(torch.randn(1, 3)), torch.ones(1, 3))


@pytest.mark.parametrize(
    ("shape", "dim", "words"),
    [
        ((3, 4), 2, r"simplex\(dim=2\) on X needs a tensor with dim=2; got shape \(3, 4\)"),
        ((), -1, "at least one dimension"),
        ((3, 0), 0, "non-empty"),
    ],
)
def test_simplex_bad_shapes(shape, dim, words):
    with pytest.raises(ValueError, match=words):
        Simplex(dim).check_shape(torch.Size(shape), "X")


@pytest.mark.parametrize("dim", [None, (0, 1), 1.0, True])
def test_simplex_bad_dim(dim):
    with pytest.raises(TypeError, match="`dim` must be an int"):
        tether.simplex(nn.Linear(2, 2), dim=dim)


def test_simplex_repr():
    assert repr(Simplex(0)) == "Simplex(dim=0)"
