"""LowRank and FixedRank: matrices of bounded and of fixed rank, in factored form."""

from __future__ import annotations

import geotorch
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import tether
from tether.constraints import FixedRank, LowRank
from tether.testing import check_parametrization

DTYPES = [torch.float32, torch.float64]
SHAPES = [(5, 3), (3, 5), (4, 4), (2, 4, 3), (1, 4), (4, 1)]
CONSTRAINTS = [LowRank, FixedRank]


pytestmark = pytest.mark.usefixtures("one_thread")


def tolerance(X: torch.Tensor) -> float:
    return 100 * max(X.shape[-2:]) * torch.finfo(X.dtype).eps * max(float(X.abs().max()), 1.0)


def module_with(weight: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(weight.clone())
    return module


@st.composite
def cases(draw):
    """``(shape, rank, dtype, generator)``: tall, wide or square, batched or not."""
    batch = draw(st.sampled_from([(), (2,), (2, 1)]))
    n, k = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    rank = draw(st.integers(1, min(n, k)))
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return (*batch, n, k), rank, dtype, generator


@given(cases(), st.sampled_from(CONSTRAINTS))
def test_forward_of_any_originals_is_a_member(case, cls):
    shape, rank, dtype, generator = case
    constraint = cls(rank)
    *batch, n, k = shape
    A = torch.randn(*batch, n, rank, dtype=dtype, generator=generator)
    s = torch.randn(*batch, rank, dtype=dtype, generator=generator)
    B = torch.randn(*batch, k, rank, dtype=dtype, generator=generator)
    X = constraint(A, s, B)
    assert X.shape == shape and X.dtype == dtype
    assert constraint.in_manifold(X)


@given(cases(), st.sampled_from(CONSTRAINTS))
def test_right_inverse_sets_a_member_exactly(case, cls):
    shape, rank, dtype, generator = case
    constraint = cls(rank)
    X = constraint.sample(shape, dtype=dtype, generator=generator)
    assert X.shape == shape and X.dtype == dtype
    assert constraint.in_manifold(X)
    assert (constraint(*constraint.right_inverse(X)) - X).abs().max() <= tolerance(X)


@given(cases(), st.sampled_from(CONSTRAINTS))
def test_right_inverse_projects_onto_the_best_rank_r_approximation(case, cls):
    shape, rank, dtype, generator = case
    X = torch.randn(shape, dtype=dtype, generator=generator)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    best = U[..., :rank] @ torch.diag_embed(S[..., :rank]) @ Vh[..., :rank, :]
    constraint = cls(rank)
    assert (constraint(*constraint.right_inverse(X)) - best).abs().max() <= tolerance(X)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cls", CONSTRAINTS)
def test_check_parametrization(cls, shape):
    constraint = cls(1)
    check_parametrization(constraint, constraint.sample(shape, dtype=torch.float64))


@pytest.mark.parametrize("cls", CONSTRAINTS)
def test_distance_is_the_frobenius_distance_to_the_set(cls):
    X = torch.randn(2, 5, 4, dtype=torch.float64)
    sigma = torch.linalg.svdvals(X)
    expected = torch.linalg.vector_norm(sigma[..., 2:], dim=-1).max()
    torch.testing.assert_close(cls(2).distance(X), expected)
    assert not cls(2).in_manifold(X)


def test_fixed_rank_keeps_the_rank_when_the_original_is_pushed_down():
    constraint = FixedRank(2, eps=1e-3)
    A, B = torch.randn(5, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    X = constraint(A, torch.full((2,), -1e3, dtype=torch.float64), B)
    torch.testing.assert_close(torch.linalg.svdvals(X)[:2], torch.full((2,), 1e-3).double())


def test_fixed_rank_raises_small_singular_values_to_eps():
    constraint = FixedRank(2, eps=1e-3)
    X = torch.diag(torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64))  # rank 1 < 2
    Y = constraint(*constraint.right_inverse(X))
    torch.testing.assert_close(torch.linalg.svdvals(Y), torch.tensor([3.0, 1e-3, 0.0]).double())
    assert constraint.distance(X) == pytest.approx(1e-3)
    assert not constraint.in_manifold(X, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_rank_membership_asks_for_numerical_rank(dtype):
    zero = torch.zeros(3, 4, dtype=dtype)
    assert LowRank(2).in_manifold(zero)
    assert not FixedRank(2).in_manifold(zero)
    rank_one = LowRank(1).sample((3, 4), dtype=dtype)
    assert not FixedRank(2).in_manifold(rank_one)
    assert FixedRank(2).in_manifold(LowRank(2).sample((3, 4), dtype=dtype))


def test_low_rank_admits_negative_values_in_s():
    constraint = LowRank(1)
    X = constraint(torch.ones(3, 1), -torch.ones(1), torch.ones(2, 1))
    assert bool((X < 0).all())


@pytest.mark.parametrize("register", [tether.low_rank, tether.fixed_rank])
def test_state_dict_holds_the_three_factors(register):
    layer = register(nn.Linear(6, 4), rank=2)
    shapes = {key: tuple(value.shape) for key, value in layer.state_dict().items()}
    assert shapes == {
        "bias": (4,),
        "parametrizations.weight.original0": (4, 2),
        "parametrizations.weight.original1": (2,),
        "parametrizations.weight.original2": (6, 2),
    }
    copy = register(nn.Linear(6, 4), rank=2)
    copy.load_state_dict(layer.state_dict())
    torch.testing.assert_close(copy.weight, layer.weight)


@pytest.mark.parametrize("register", [tether.low_rank, tether.fixed_rank])
def test_registration_keeps_a_member(register):
    W = LowRank(2).sample((4, 6))
    layer = register(module_with(W), rank=2)
    torch.testing.assert_close(layer.weight, W)


@pytest.mark.parametrize("register", [tether.low_rank, tether.fixed_rank])
def test_training_keeps_the_rank(register):
    torch.manual_seed(0)
    layer = register(nn.Linear(6, 5), rank=2)
    target = torch.randn(5, 6)  # full rank: the constraint must hold against the loss
    x = torch.randn(64, 6)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    first = None
    for _ in range(200):
        optimizer.zero_grad()
        loss = (layer(x) - x @ target.T).square().mean()
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first
    constraint = layer.parametrizations.weight[0]
    assert constraint.in_manifold(layer.weight.detach())
    assert int(torch.linalg.matrix_rank(layer.weight)) == 2


@pytest.mark.parametrize("cls", CONSTRAINTS)
def test_gradcheck(cls):
    constraint = cls(2)
    A = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, dtype=torch.float64, requires_grad=True)
    B = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(constraint, (A, s, B))


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (2, 4, 4)], ids=str)
def test_agrees_with_geotorch_low_rank(shape):
    ours, theirs = LowRank(2), geotorch.LowRank(shape, 2)
    assert ours.in_manifold(theirs.sample())
    assert bool(theirs.in_manifold(ours.sample(shape)))
    assert not ours.in_manifold(torch.randn(shape))
    assert not bool(theirs.in_manifold(torch.randn(shape)))


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (2, 4, 4)], ids=str)
def test_agrees_with_geotorch_fixed_rank(shape):
    ours, theirs = FixedRank(2), geotorch.FixedRank(shape, 2)
    assert ours.in_manifold(theirs.sample())
    assert bool(theirs.in_manifold(ours.sample(shape)))
    rank_one = LowRank(1).sample(shape)
    assert not ours.in_manifold(rank_one)
    assert not bool(theirs.in_manifold(rank_one))


@pytest.mark.parametrize("register", [tether.low_rank, tether.fixed_rank])
@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one_is_rejected(register, rank):
    with pytest.raises(ValueError, match="`rank` must be a positive int"):
        register(nn.Linear(3, 3), rank=rank)


@pytest.mark.parametrize("register", [tether.low_rank, tether.fixed_rank])
@pytest.mark.parametrize("rank", [2.0, True, "2"])
def test_rank_of_the_wrong_type_is_rejected(register, rank):
    with pytest.raises(TypeError, match="`rank` must be a positive int"):
        register(nn.Linear(3, 3), rank=rank)


@pytest.mark.parametrize("register", [tether.low_rank, tether.fixed_rank])
def test_rank_above_the_shape_is_rejected(register):
    with pytest.raises(ValueError, match=r"on Linear\.weight.*rank=4.*\(3, 5\).*rank <= 3"):
        register(nn.Linear(5, 3), rank=4)


@pytest.mark.parametrize("register", [tether.low_rank, tether.fixed_rank])
def test_vectors_are_rejected(register):
    with pytest.raises(ValueError, match=r"on LayerNorm\.weight needs a matrix.*\(4,\)"):
        register(nn.LayerNorm(4), rank=1)


@pytest.mark.parametrize("eps", [0.0, -1e-3, float("inf")])
def test_fixed_rank_rejects_a_bad_eps(eps):
    with pytest.raises(ValueError, match="`eps` must be positive"):
        tether.fixed_rank(nn.Linear(3, 3), rank=2, eps=eps)


def test_fixed_rank_rejects_an_eps_of_the_wrong_type():
    with pytest.raises(TypeError, match="`eps` must be a real number"):
        FixedRank(2, eps="small")  # type: ignore[arg-type]


def test_sample_rejects_a_bad_shape():
    with pytest.raises(ValueError, match=r"low_rank\(\) on the sample needs"):
        LowRank(3).sample((2, 5))


def test_repr_shows_the_arguments():
    assert repr(FixedRank(2, eps=0.5)) == "FixedRank(rank=2, eps=0.5)"
    assert repr(LowRank(3)) == "LowRank(rank=3)"
