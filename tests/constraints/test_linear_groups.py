"""Invertible (GL+), SpecialLinear (SL), AlmostOrthogonal and Hurwitz."""

from __future__ import annotations

import math

import geotorch
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import tether
from tether.constraints import AlmostOrthogonal, Hurwitz, Invertible, SpecialLinear, default_atol
from tether.testing import check_parametrization

DTYPES = [torch.float32, torch.float64]
BATCHES = [(), (2,), (2, 1)]
SQUARE = [Invertible, SpecialLinear, Hurwitz]
REGISTER = {
    Invertible: tether.invertible,
    SpecialLinear: tether.special_linear,
    Hurwitz: tether.hurwitz,
    AlmostOrthogonal: tether.almost_orthogonal,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tolerance(X: torch.Tensor) -> float:
    return 100 * max(X.shape[-2:]) * torch.finfo(X.dtype).eps * max(float(X.abs().max()), 1.0)


def module_with(weight: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(weight.clone())
    return module


def random_originals(constraint, shape, dtype, generator):
    """Originals of the right shapes, i.i.d. standard normal: what training may produce."""
    template = constraint.right_inverse(constraint.sample(shape, dtype=dtype))
    return [torch.randn(t.shape, dtype=dtype, generator=generator) for t in template]


@st.composite
def squares(draw):
    """``(shape, dtype, generator)`` for a square matrix, batched or not."""
    n = draw(st.integers(1, 5))
    shape = (*draw(st.sampled_from(BATCHES)), n, n)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return shape, draw(st.sampled_from(DTYPES)), generator


@st.composite
def matrices(draw):
    """``(shape, dtype, generator)`` for a tall, wide or square matrix, batched or not."""
    shape = (*draw(st.sampled_from(BATCHES)), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return shape, draw(st.sampled_from(DTYPES)), generator


LAMS = st.sampled_from([0.1, 0.5, 1.0])


# Properties shared by the four constraints


@given(squares(), st.sampled_from([Invertible, SpecialLinear]))
def test_forward_of_any_originals_is_in_gl_or_sl(case, cls):
    shape, dtype, generator = case
    constraint = cls()
    X = constraint(*random_originals(constraint, shape, dtype, generator))
    assert X.shape == shape and X.dtype == dtype
    assert bool((torch.linalg.det(X) > 0).all())
    assert constraint.in_manifold(X, atol=default_atol(dtype) * math.sqrt(shape[-1]))


@given(squares())
def test_forward_of_any_originals_is_hurwitz(case):
    shape, dtype, generator = case
    constraint = Hurwitz()
    X = constraint(*random_originals(constraint, shape, dtype, generator))
    assert X.shape == shape and X.dtype == dtype
    assert bool((torch.linalg.eigvals(X.double()).real < 0).all())


@given(matrices(), LAMS)
def test_forward_of_any_originals_is_almost_orthogonal(case, lam):
    shape, dtype, generator = case
    constraint = AlmostOrthogonal(lam)
    X = constraint(*random_originals(constraint, shape, dtype, generator))
    assert X.shape == shape and X.dtype == dtype
    sigma = torch.linalg.svdvals(X)
    assert bool(((sigma - 1).abs() <= lam + tolerance(X)).all())
    assert constraint.in_manifold(X)


@given(squares(), st.sampled_from(SQUARE))
def test_right_inverse_sets_a_sampled_member_exactly(case, cls):
    shape, dtype, generator = case
    constraint = cls()
    X = constraint.sample(shape, dtype=dtype, generator=generator)
    assert X.shape == shape and X.dtype == dtype
    assert constraint.in_manifold(X)
    error = (constraint(*constraint.right_inverse(X)) - X).abs().max()
    assert error <= 10 * tolerance(X)


@given(matrices(), LAMS)
def test_almost_orthogonal_right_inverse_sets_a_sampled_member_exactly(case, lam):
    shape, dtype, generator = case
    constraint = AlmostOrthogonal(lam)
    X = constraint.sample(shape, dtype=dtype, generator=generator)
    assert X.shape == shape and X.dtype == dtype
    assert constraint.in_manifold(X)
    assert (constraint(*constraint.right_inverse(X)) - X).abs().max() <= tolerance(X)


@pytest.mark.parametrize("shape", [(3, 3), (2, 4, 4), (1, 1)], ids=str)
@pytest.mark.parametrize("cls", SQUARE)
def test_check_parametrization_square(cls, shape):
    constraint = cls()
    check_parametrization(constraint, constraint.sample(shape, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (2, 4, 4), (1, 4)], ids=str)
def test_check_parametrization_almost_orthogonal(shape):
    constraint = AlmostOrthogonal(0.5)
    check_parametrization(constraint, constraint.sample(shape, dtype=torch.float64))


@pytest.mark.parametrize("cls", [*SQUARE, AlmostOrthogonal])
def test_gradcheck(cls):
    constraint = cls()
    originals = constraint.right_inverse(constraint.sample((3, 3), dtype=torch.float64))
    inputs = tuple(torch.randn_like(t).requires_grad_() for t in originals)
    assert torch.autograd.gradcheck(constraint, inputs)


@pytest.mark.parametrize("cls", [*SQUARE, AlmostOrthogonal])
def test_training_keeps_the_weight_in_the_set(cls):
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(cls().sample((4, 4)))  # Hurwitz has no projection
    REGISTER[cls](layer)
    target = 3 * torch.randn(4, 4)  # pulls the weight out of every one of the sets
    x = torch.randn(32, 4)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = (layer(x) - x @ target.T).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    W = layer.weight.detach()
    assert layer.parametrizations.weight[0].in_manifold(W, atol=default_atol(W.dtype) * 2)


@pytest.mark.parametrize("cls", [*SQUARE, AlmostOrthogonal])
def test_state_dict_layout(cls):
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(cls().sample((3, 3)))
    REGISTER[cls](layer)
    count = 3 if cls is AlmostOrthogonal else 2
    expected = ["bias"] + [f"parametrizations.weight.original{i}" for i in range(count)]
    assert sorted(layer.state_dict()) == expected


# Invertible and SpecialLinear


@pytest.mark.parametrize("cls", [Invertible, SpecialLinear])
def test_reflects_a_matrix_with_negative_determinant(cls):
    X = torch.randn(4, 4, dtype=torch.float64)
    X[0] *= torch.linalg.det(X).sign()
    X[0] *= -1  # det X < 0
    Y = cls()(*cls().right_inverse(X))
    assert torch.linalg.det(Y) > 0
    if cls is Invertible:
        torch.testing.assert_close(torch.linalg.svdvals(Y), torch.linalg.svdvals(X))
        torch.testing.assert_close(torch.linalg.det(Y), -torch.linalg.det(X))
        smallest = torch.linalg.svdvals(X)[-1]
        torch.testing.assert_close(torch.linalg.matrix_norm(Y - X), 2 * smallest)
        torch.testing.assert_close(Invertible().distance(X), smallest)


def test_registration_keeps_or_reflects_the_weight():
    batch = torch.randn(2, 3, 3, dtype=torch.float64)
    batch[0, 0] *= torch.linalg.det(batch[0]).sign()  # det > 0: kept
    batch[1, 0] *= -torch.linalg.det(batch[1]).sign()  # det < 0: reflected
    layer = tether.invertible(module_with(batch))
    torch.testing.assert_close(layer.weight[0], batch[0])
    assert torch.linalg.det(layer.weight[1]) > 0


@pytest.mark.parametrize("cls", [Invertible, SpecialLinear])
def test_a_singular_matrix_is_rejected(cls):
    with pytest.raises(ValueError, match=r"\(\): the assigned value is singular"):
        cls().right_inverse(torch.zeros(2, 3, 3))


def test_special_linear_scales_onto_determinant_one():
    X = 2 * torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64)).Q
    X[0] *= torch.linalg.det(X).sign()
    Y = SpecialLinear()(*SpecialLinear().right_inverse(X))
    torch.testing.assert_close(Y, X / 2)
    assert SpecialLinear().distance(X) == pytest.approx(3 * math.log(2))


def test_special_linear_distance_is_infinite_for_nonpositive_determinants():
    assert SpecialLinear().distance(-torch.eye(3)) == math.inf
    assert not SpecialLinear().in_manifold(-torch.eye(3))


def test_invertible_log_determinant_is_the_trace_of_the_original():
    B, C = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    X = Invertible()(B, C)
    torch.testing.assert_close(torch.linalg.slogdet(X).logabsdet, C.diagonal().sum())


def test_invertible_distance_to_the_closure():
    X = torch.diag(torch.tensor([2.0, 0.5, -0.25], dtype=torch.float64))
    assert Invertible().distance(X) == pytest.approx(0.25)
    assert Invertible().distance(X.abs()) == 0
    assert not Invertible().in_manifold(X)


@pytest.mark.parametrize("cls", [Invertible, SpecialLinear])
def test_singular_matrices_are_not_members(cls):
    assert not cls().in_manifold(torch.zeros(3, 3))
    assert not cls().in_manifold(torch.diag(torch.tensor([1.0, 1.0, 0.0])))


def test_agrees_with_geotorch_glp():
    m = nn.Linear(4, 4)
    geotorch.invertible(m)
    assert Invertible().in_manifold(m.weight.detach())
    assert bool(geotorch.GLp((4, 4)).in_manifold(Invertible().sample((4, 4))))


def test_agrees_with_geotorch_sl():
    m = nn.Linear(4, 4)
    geotorch.sln(m)
    assert SpecialLinear().in_manifold(m.weight.detach())
    assert bool(geotorch.SL((4, 4)).in_manifold(SpecialLinear().sample((4, 4))))


# AlmostOrthogonal


def test_almost_orthogonal_projection_clamps_the_singular_values():
    U = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64)).Q
    sigma = torch.tensor([3.0, 1.1, 0.2], dtype=torch.float64)
    X = U @ torch.diag(sigma) @ V.T
    constraint = AlmostOrthogonal(0.5)
    Y = constraint(*constraint.right_inverse(X))
    torch.testing.assert_close(Y, U @ torch.diag(torch.tensor([1.5, 1.1, 0.5]).double()) @ V.T)
    assert constraint.distance(X) == pytest.approx(math.hypot(1.5, 0.3))


def test_almost_orthogonal_with_lam_one_reaches_singular_matrices():
    X = torch.diag(torch.tensor([2.0, 0.0], dtype=torch.float64))
    constraint = AlmostOrthogonal(1.0)
    assert constraint.in_manifold(X)
    torch.testing.assert_close(constraint(*constraint.right_inverse(X)), X)


@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 4)], ids=str)
def test_agrees_with_geotorch_almost_orthogonal(shape):
    # geotorch's registration fails on wide weights (its sample() transposes), hence no wide case.
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(shape))
    geotorch.almost_orthogonal(m, "weight", lam=0.3)
    assert AlmostOrthogonal(0.3).in_manifold(m.weight.detach())
    theirs = geotorch.AlmostOrthogonal(shape, 0.3)
    assert theirs.in_manifold(AlmostOrthogonal(0.3).sample(shape))
    assert not AlmostOrthogonal(0.3).in_manifold(3 * torch.randn(shape))


# geotorch's AlmostOrthogonal.sample(distribution, init_) draws orthogonal matrices.


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (2, 4, 4)], ids=str)
@pytest.mark.parametrize("distribution", ["uniform", "torus"])
def test_almost_orthogonal_sample_with_a_distribution_is_orthogonal(distribution, shape):
    constraint = AlmostOrthogonal(0.5)
    X = constraint.sample(shape, distribution=distribution, dtype=torch.float64)
    assert X.shape == shape
    sigma = torch.linalg.svdvals(X)
    torch.testing.assert_close(sigma, torch.ones_like(sigma))
    assert constraint.in_manifold(X)


def test_almost_orthogonal_sample_of_a_registered_tensor_takes_the_distribution_first():
    layer = tether.almost_orthogonal(nn.Linear(4, 4).double(), "weight", 0.5)
    constraint = layer.parametrizations.weight[0]
    angles = constraint.sample("torus", init_=nn.init.zeros_)  # angle 0: the identity
    torch.testing.assert_close(angles, torch.eye(4, dtype=torch.float64))
    layer.weight = constraint.sample("uniform")
    W = layer.weight.detach()
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(W.T @ W, eye, atol=100 * torch.finfo(W.dtype).eps, rtol=0)


def test_almost_orthogonal_sample_without_a_distribution_spreads_the_singular_values():
    X = AlmostOrthogonal(0.5).sample((64, 64), dtype=torch.float64)
    sigma = torch.linalg.svdvals(X)
    assert float(sigma.max() - sigma.min()) > 0.5  # uniform on [0.5, 1.5], 64 of them


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.sample((3, 3), distribution="haar"), ValueError, "'uniform', 'torus'"),
        (lambda c: c.sample("torus", distribution="uniform"), TypeError, "twice"),
        (lambda c: c.sample((3, 3), init_=nn.init.zeros_), ValueError, "distribution='torus'"),
    ],
)
def test_almost_orthogonal_sample_rejects_bad_distribution_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(AlmostOrthogonal(0.5))


@pytest.mark.parametrize("lam", [0.0, -0.5, 1.5, float("nan")])
def test_almost_orthogonal_rejects_a_lam_out_of_range(lam):
    with pytest.raises(ValueError, match=r"almost_orthogonal\(\): `lam` must be in \(0, 1\]"):
        tether.almost_orthogonal(nn.Linear(3, 3), lam=lam)


@pytest.mark.parametrize("lam", ["0.5", None, True])
def test_almost_orthogonal_rejects_a_lam_of_the_wrong_type(lam):
    with pytest.raises(TypeError, match="`lam` must be a real number"):
        AlmostOrthogonal(lam)


# Hurwitz


def test_hurwitz_shifts_a_non_member_to_a_tenth_of_its_rms_singular_value():
    A = torch.diag(torch.tensor([-1.0, 0.5], dtype=torch.float64))
    margin = 0.1 * math.sqrt((1.0 + 0.25) / 2)
    expected = A - (0.5 + margin) * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(Hurwitz()(*Hurwitz().right_inverse(A)), expected)


def test_hurwitz_shifts_zero_by_a_tenth():
    Y = Hurwitz()(*Hurwitz().right_inverse(torch.zeros(3, 3, dtype=torch.float64)))
    torch.testing.assert_close(Y, -0.1 * torch.eye(3, dtype=torch.float64))


@given(
    n=st.integers(1, 12),
    batch=st.sampled_from([(), (2,)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_hurwitz_registration_on_any_weight_shifts_only_non_members(n, batch, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn((*batch, n, n), dtype=dtype, generator=generator) / math.sqrt(n)
    if batch:
        A[0] = Hurwitz().sample((n, n), dtype=dtype, generator=generator)  # a member
    W = tether.hurwitz(module_with(A)).weight.detach()
    assert bool((torch.linalg.eigvals(W.double()).real.amax(-1) < 0).all())
    shift = (A - W).diagonal(dim1=-2, dim2=-1)
    atol = 100 * default_atol(dtype)
    off_diagonal = (A - W) - torch.diag_embed(shift)
    torch.testing.assert_close(off_diagonal, torch.zeros_like(A), atol=atol, rtol=0)
    torch.testing.assert_close(shift, shift[..., :1].expand_as(shift), atol=atol, rtol=0)
    if batch:
        torch.testing.assert_close(W[0], A[0], atol=atol, rtol=atol)


def test_hurwitz_registers_on_a_fresh_linear_layer():
    for seed in range(10):
        torch.manual_seed(seed)
        layer = tether.hurwitz(nn.Linear(8, 8))
        assert Hurwitz().in_manifold(layer.weight.detach())


def test_hurwitz_rejects_a_member_too_close_to_the_axis():
    jordan = [[-1e-8, 1e4, 0.0], [0.0, -1e-8, 1e4], [0.0, 0.0, -1e-8]]
    A = torch.tensor(jordan, dtype=torch.float64)
    with pytest.raises(ValueError, match="too close to the imaginary axis"):
        Hurwitz().right_inverse(A)


def test_hurwitz_sets_a_defective_member():
    A = torch.tensor([[-1.0, 50.0], [0.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(Hurwitz()(*Hurwitz().right_inverse(A)), A)


def test_hurwitz_distance_is_the_excess_abscissa():
    A = torch.diag(torch.tensor([-1.0, 0.25]))
    assert Hurwitz().distance(A) == pytest.approx(0.25)
    assert Hurwitz().distance(-torch.eye(2)) == 0


def test_hurwitz_sample_has_abscissa_minus_one():
    A = Hurwitz().sample((3, 5, 5), dtype=torch.float64)
    abscissa = torch.linalg.eigvals(A).real.amax(-1)
    torch.testing.assert_close(abscissa, -torch.ones(3, dtype=torch.float64))


def test_agrees_with_geotorch_hurwitz():
    m = nn.Linear(4, 4)
    geotorch.alpha_stable(m, alpha=0.0)
    W = m.weight.detach()
    assert Hurwitz().in_manifold(W)
    torch.testing.assert_close(Hurwitz()(*Hurwitz().right_inverse(W)), W, atol=1e-4, rtol=1e-4)
    assert geotorch.Hurwitz((4, 4)).in_manifold_eigen(Hurwitz().sample((4, 4)))


# Shapes


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (4,)], ids=str)
@pytest.mark.parametrize("cls", SQUARE)
def test_square_constraints_reject_other_shapes(cls, shape):
    name = REGISTER[cls].__name__
    layer = module_with(torch.randn(shape))
    with pytest.raises(ValueError, match=rf"{name}\(\) on Module\.weight needs a square matrix"):
        REGISTER[cls](layer)
    assert not cls().in_manifold(torch.randn(shape))


def test_almost_orthogonal_rejects_vectors():
    with pytest.raises(ValueError, match=r"almost_orthogonal\(\) on LayerNorm\.weight needs"):
        tether.almost_orthogonal(nn.LayerNorm(3))


@pytest.mark.parametrize("cls", SQUARE)
def test_sample_rejects_a_bad_shape(cls):
    with pytest.raises(ValueError, match="on the sample needs a square matrix"):
        cls().sample((2, 3))
