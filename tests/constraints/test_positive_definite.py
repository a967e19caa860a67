"""PositiveDefinite, PositiveSemidefinite, PSDLowRank, PSDFixedRank and their helpers."""

from __future__ import annotations

import math

import geotorch
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

import tether
from tether.constraints import (
    PositiveDefinite,
    PositiveSemidefinite,
    PSDFixedRank,
    PSDLowRank,
    default_atol,
)
from tether.testing import check_parametrization

DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]

# kind: (constraint for n x n weights and a rank, the helper registering it, uses the rank)
KINDS = {
    "pd-matrix_exp": (
        lambda rank: PositiveDefinite("matrix_exp"),
        lambda module, rank: tether.positive_definite(module, map="matrix_exp"),
    ),
    "pd-softplus": (
        lambda rank: PositiveDefinite("softplus"),
        lambda module, rank: tether.positive_definite(module, map="softplus"),
    ),
    "psd": (
        lambda rank: PositiveSemidefinite(),
        lambda module, rank: tether.positive_semidefinite(module),
    ),
    "low-rank": (PSDLowRank, lambda module, rank: tether.psd_low_rank(module, rank=rank)),
    "fixed-rank": (PSDFixedRank, lambda module, rank: tether.psd_fixed_rank(module, rank=rank)),
}
RANKED = {"low-rank", "fixed-rank"}


def module_with(weight: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(weight.clone())
    return module


def atol(X: torch.Tensor) -> float:
    """sqrt(eps) of the dtype, scaled by the size; members here have eigenvalues below 3."""
    return 3 * default_atol(X.dtype) * math.sqrt(X.shape[-1])


pytestmark = pytest.mark.usefixtures("one_thread")


def constraint_of(module: nn.Module) -> nn.Module:
    return module.parametrizations.weight[0]


def rotated(eigenvalues: list[float]) -> torch.Tensor:
    """``Q diag(eigenvalues) Qᵀ`` in float64 for a fixed random orthogonal ``Q``."""
    n = len(eigenvalues)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T


@st.composite
def cases(draw):
    """A square tensor (batched, real or complex), a rank and a generator."""
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    n = draw(st.integers(1, 5))
    rank = draw(st.integers(1, n))
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(*batch, n, n, dtype=dtype, generator=generator), rank, generator


# Membership and round trips


@pytest.mark.parametrize("kind", KINDS)
@given(case=cases())
def test_forward_of_any_original_is_a_member(kind, case):
    X, rank, generator = case
    make, register = KINDS[kind]
    module = register(module_with(X), rank)
    original = module.parametrizations.weight.original
    with torch.no_grad():
        original.copy_(torch.randn(original.shape, dtype=X.dtype, generator=generator))
    W = module.weight
    assert W.shape == X.shape and W.dtype == X.dtype
    assert make(rank).in_manifold(W.detach())


@pytest.mark.parametrize("kind", KINDS)
@given(case=cases())
def test_assigning_a_member_sets_it_exactly(kind, case):
    X, rank, generator = case
    make, register = KINDS[kind]
    member = make(rank).sample(X.shape, dtype=X.dtype, generator=generator)
    module = register(module_with(X), rank)
    module.weight = member
    torch.testing.assert_close(module.weight.detach(), member, atol=atol(X), rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@given(case=cases())
def test_registration_keeps_a_member(kind, case):
    X, rank, generator = case
    make, register = KINDS[kind]
    member = make(rank).sample(X.shape, dtype=X.dtype, generator=generator)
    module = register(module_with(member), rank)
    torch.testing.assert_close(module.weight.detach(), member, atol=atol(X), rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@given(case=cases())
def test_sample_is_a_member_of_the_requested_shape_and_dtype(kind, case):
    X, rank, generator = case
    constraint = KINDS[kind][0](rank)
    member = constraint.sample(X.shape, dtype=X.dtype, generator=generator)
    assert member.shape == X.shape and member.dtype == X.dtype
    assert constraint.in_manifold(member)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_check_parametrization(kind, dtype):
    constraint = KINDS[kind][0](2)
    check_parametrization(constraint, constraint.sample((2, 4, 4), dtype=dtype))


# Projections of non-members


def test_positive_definite_raises_eigenvalues_to_the_floor():
    A = rotated([-3.0, 0.0, 1.0, 2.0]) + torch.triu(torch.ones(4, 4, dtype=torch.float64), 1)
    floor = math.sqrt(torch.finfo(torch.float64).eps) * 3.5  # largest |λ| of sym(A)
    for kind in ["pd-matrix_exp", "pd-softplus"]:
        layer = KINDS[kind][1](module_with(A), 4)
        L = torch.linalg.eigvalsh(layer.weight.detach())
        assert PositiveDefinite().in_manifold(layer.weight.detach())
        assert L.min() > 0 and L.min() <= 1.01 * floor


def test_positive_semidefinite_projects_onto_the_nearest_psd_matrix():
    A = rotated([-3.0, -1.0, 1.0, 2.0])
    skew = torch.triu(torch.ones(4, 4, dtype=torch.float64), 1)
    L, Q = torch.linalg.eigh(A)
    nearest = (Q * L.clamp(min=0)) @ Q.T
    layer = tether.positive_semidefinite(module_with(A + skew - skew.T))
    torch.testing.assert_close(layer.weight.detach(), nearest)
    expected = torch.linalg.vector_norm(torch.tensor([3.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(PositiveSemidefinite().distance(A), expected)


@pytest.mark.parametrize("kind", ["low-rank", "fixed-rank"])
def test_ranked_constraints_keep_the_largest_eigenvalues(kind):
    A = rotated([-3.0, 0.5, 1.0, 2.0])
    L, Q = torch.linalg.eigh(A)
    nearest = (Q[:, 2:] * L[2:]) @ Q[:, 2:].T
    layer = KINDS[kind][1](module_with(A), 2)
    torch.testing.assert_close(layer.weight.detach(), nearest)
    expected = torch.linalg.vector_norm(torch.tensor([3.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(KINDS[kind][0](2).distance(A), expected)


def test_fixed_rank_raises_the_kept_eigenvalues_to_the_floor():
    A = rotated([-3.0, 0.0, 0.0, 2.0])  # rank 1: the second eigenvalue kept is 0
    layer = tether.psd_fixed_rank(module_with(A), rank=2)
    L = torch.linalg.eigvalsh(layer.weight.detach())
    floor = math.sqrt(torch.finfo(torch.float64).eps) * 3.0
    torch.testing.assert_close(L[-2:], torch.tensor([floor, 2.0], dtype=torch.float64))
    assert PSDFixedRank(2).in_manifold(layer.weight.detach())


# What in_manifold accepts


@pytest.mark.parametrize(
    ("name", "matrix", "expected"),
    [
        ("identity", torch.eye(4), {"pd": True, "psd": True, "low-2": False, "fixed-2": False}),
        ("zero", torch.zeros(4, 4), {"pd": False, "psd": True, "low-2": True, "fixed-2": False}),
        (
            "rank 1",
            torch.ones(4, 4),
            {"pd": False, "psd": True, "low-2": True, "fixed-2": False},
        ),
        (
            "rank 2",
            torch.diag(torch.tensor([0.0, 0.0, 1.0, 2.0])),
            {"pd": False, "psd": True, "low-2": True, "fixed-2": True},
        ),
        ("-identity", -torch.eye(4), {"pd": False, "psd": False, "low-2": False, "fixed-2": False}),
        (
            "not symmetric",
            torch.eye(4) + torch.triu(torch.ones(4, 4), 1),
            {"pd": False, "psd": False, "low-2": False, "fixed-2": False},
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_in_manifold(name, matrix, expected):
    constraints = {
        "pd": PositiveDefinite(),
        "psd": PositiveSemidefinite(),
        "low-2": PSDLowRank(2),
        "fixed-2": PSDFixedRank(2),
    }
    assert {key: c.in_manifold(matrix) for key, c in constraints.items()} == expected


def test_distance_of_an_empty_batch_is_zero():
    assert PositiveDefinite().distance(torch.zeros(0, 3, 3)) == 0


# Gradients and training


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_are_finite_at_the_identity(kind):
    layer = KINDS[kind][1](nn.Linear(4, 4), 2)
    layer.weight = torch.eye(4) if kind not in RANKED else torch.diag(torch.tensor([0, 0, 1.0, 1]))
    layer(torch.randn(8, 4)).pow(2).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("kind", KINDS)
def test_training_keeps_the_weight_a_member(kind):
    layer = KINDS[kind][1](nn.Linear(4, 4), 2)
    target = KINDS[kind][0](2).sample((4, 4))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.02)
    x = torch.randn(32, 4)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = (layer(x) - x @ target.T).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert constraint_of(layer).in_manifold(layer.weight.detach())


# Storage of the originals


@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        ("pd-matrix_exp", (5, 5)),
        ("pd-softplus", (5, 5)),
        ("psd", (5, 5)),
        ("low-rank", (5, 2)),
        ("fixed-rank", (6, 2)),
    ],
)
def test_state_dict_holds_one_original_that_loads_back(kind, shape):
    register = KINDS[kind][1]
    layer = register(nn.Linear(5, 5), 2)
    state = layer.state_dict()
    assert sorted(state) == ["bias", "parametrizations.weight.original"]
    assert state["parametrizations.weight.original"].shape == shape
    other = register(nn.Linear(5, 5), 2)
    other.load_state_dict(state)
    torch.testing.assert_close(other.weight, layer.weight)


@pytest.mark.parametrize("kind", KINDS)
def test_a_plain_checkpoint_loads_through_right_inverse(kind):
    register = KINDS[kind][1]
    state = tether.plain_state_dict(register(nn.Linear(5, 5), 2))
    assert state["weight"].shape == (5, 5)
    layer = register(nn.Linear(5, 5), 2)
    layer.load_state_dict(state)
    torch.testing.assert_close(layer.weight.detach(), state["weight"], atol=1e-5, rtol=0)


def perturbed(kind, dtype):
    """A registered ``(4, 6, 6)`` member whose original then takes a step, and its weight."""
    generator = torch.Generator().manual_seed(0)
    constraint = KINDS[kind][0](2)
    member = constraint.sample((4, 6, 6), dtype=dtype, generator=generator)
    module = tether.register_parametrization(module_with(member), "weight", constraint)
    original = module.parametrizations.weight.original
    with torch.no_grad():
        original.add_(0.05 * torch.randn(original.shape, dtype=dtype, generator=generator))
    return module, module.weight.detach().clone()


# Note [Right inverses in double precision]: with the Gram maps, the round trip of
# update_base costs only forward's rounding, a few eps (about 14 eps with the inverse in
# float32). With an eigh in forward, that rounding itself is about 10 eps.
@pytest.mark.parametrize("kind", ["psd", "low-rank"])
def test_update_base_keeps_a_gram_weight_to_a_few_eps(kind):
    module, before = perturbed(kind, torch.float32)
    tether.update_base(module)
    error = float((module.weight.detach() - before).abs().max())
    assert error <= 3 * torch.finfo(torch.float32).eps * float(before.abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_update_base_moves_the_weight_by_no_more_than_forward_rounds(kind):
    module, before = perturbed(kind, torch.float32)
    constraint = constraint_of(module)
    original = module.parametrizations.weight.original.detach()
    eps = torch.finfo(torch.float32).eps * float(before.abs().max())
    rounding = max(float((before.double() - constraint(original.double())).abs().max()), eps)
    tether.update_base(module)
    assert float((module.weight.detach() - before).abs().max()) <= 6 * rounding


@pytest.mark.parametrize("kind", KINDS)
def test_works_with_torch_parametrize(kind):
    make = KINDS[kind][0]
    layer = nn.Linear(5, 5)
    torch_parametrize.register_parametrization(layer, "weight", make(2))
    member = make(2).sample((5, 5))
    layer.weight = member
    torch.testing.assert_close(layer.weight.detach(), member, atol=1e-5, rtol=0)


def test_a_batch_of_weights():
    module = tether.psd_fixed_rank(module_with(torch.randn(3, 2, 4, 4)), rank=3)
    assert module.parametrizations.weight.original.shape == (3, 2, 5, 3)
    assert PSDFixedRank(3).in_manifold(module.weight.detach())


def test_extra_repr():
    assert repr(PositiveDefinite("softplus")) == "PositiveDefinite(map='softplus')"
    assert repr(PSDLowRank(3)) == "PSDLowRank(rank=3)"
    assert repr(PSDFixedRank(1)) == "PSDFixedRank(rank=1)"
    assert repr(PositiveSemidefinite()) == "PositiveSemidefinite()"


# Errors


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(3,), (3, 4), (2, 3, 4)], ids=str)
def test_bad_shapes_are_rejected_with_the_documented_error(kind, shape):
    make, register = KINDS[kind]
    with pytest.raises(ValueError, match=r"on Module.weight needs a square matrix") as info:
        register(module_with(torch.randn(shape)), 1)
    assert str(tuple(shape)) in str(info.value)
    with pytest.raises(ValueError, match="square"):
        make(1).sample(shape)
    assert not make(1).in_manifold(torch.zeros(shape))


@pytest.mark.parametrize("kind", ["low-rank", "fixed-rank"])
def test_a_rank_above_n_is_rejected(kind):
    name = "psd_low_rank" if kind == "low-rank" else "psd_fixed_rank"
    with pytest.raises(ValueError, match=rf"{name}\(rank=4\) on Linear.weight.*n >= rank = 4"):
        KINDS[kind][1](nn.Linear(3, 3), 4)


@pytest.mark.parametrize("register", [tether.psd_low_rank, tether.psd_fixed_rank])
@pytest.mark.parametrize(
    ("rank", "error", "words"),
    [(0, ValueError, "at least 1"), (-2, ValueError, "at least 1"), (2.0, TypeError, "an int")],
)
def test_bad_ranks_are_rejected(register, rank, error, words):
    with pytest.raises(error, match=rf"`rank` must be {words}"):
        register(nn.Linear(3, 3), rank=rank)
    with pytest.raises(TypeError, match="an int"):
        register(nn.Linear(3, 3), rank=True)


def test_a_bad_map_is_rejected():
    with pytest.raises(ValueError, match=r"`map` must be one of 'matrix_exp', 'softplus'; got"):
        tether.positive_definite(nn.Linear(3, 3), map="expm")


# geotorch's f: only "softplus", as positive_definite(m, "weight", "softplus") and
# positive_semidefinite_fixed_rank(m, "weight", 2, "softplus") take it.


def test_f_softplus_is_the_softplus_map():
    layer = tether.positive_definite(nn.Linear(3, 3), "weight", "softplus")
    assert constraint_of(layer).map == "softplus"
    assert PositiveDefinite(f="softplus", map="softplus").map == "softplus"
    assert PositiveDefinite().map == "matrix_exp"


def test_psd_fixed_rank_takes_f_by_position():
    layer = tether.psd_fixed_rank(nn.Linear(4, 4), "weight", 2, "softplus")
    assert constraint_of(layer).f == "softplus"
    assert int(torch.linalg.matrix_rank(layer.weight)) == 2


F_REFUSED = ["exp", 3, torch.exp, (torch.exp, torch.log)]


@pytest.mark.parametrize("f", F_REFUSED, ids=str)
@pytest.mark.parametrize(
    ("build", "owner"),
    [
        (lambda f: PositiveDefinite(f=f), "positive_definite"),
        (lambda f: tether.positive_definite(nn.Linear(3, 3), "weight", f), "positive_definite"),
        (lambda f: PSDFixedRank(2, f), "psd_fixed_rank"),
        (lambda f: tether.psd_fixed_rank(nn.Linear(3, 3), "weight", 2, f), "psd_fixed_rank"),
    ],
    ids=["PositiveDefinite", "positive_definite", "PSDFixedRank", "psd_fixed_rank"],
)
def test_other_f_is_refused_with_the_choice_offered(build, owner, f):
    with pytest.raises(ValueError, match=rf"{owner}\(\): `f` must be 'softplus'") as info:
        build(f)
    assert ("Callables" in str(info.value)) == (not isinstance(f, (str, int)))


def test_f_contradicting_map_is_refused():
    with pytest.raises(ValueError, match=r"map='softplus', but map='matrix_exp' was passed too"):
        PositiveDefinite("matrix_exp", f="softplus")


# Agreement with geotorch


def geotorch_pairs():
    return {
        "pd-matrix_exp": (PositiveDefinite("matrix_exp"), geotorch.PSD((4, 4))),
        "pd-softplus": (PositiveDefinite("softplus"), geotorch.PSD((4, 4))),
        "psd": (PositiveSemidefinite(), geotorch.PSSD((4, 4))),
        "low-rank": (PSDLowRank(2), geotorch.PSSDLowRank((4, 4), 2)),
        "fixed-rank": (PSDFixedRank(2), geotorch.PSSDFixedRank((4, 4), 2)),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_geotorch_and_tether_accept_each_others_members(kind):
    ours, theirs = geotorch_pairs()[kind]
    theirs = theirs.to(torch.float64)
    our_sample = ours.sample((4, 4), dtype=torch.float64)
    our_forward = ours(torch.randn_like(ours.right_inverse(our_sample)))
    assert theirs.in_manifold(our_sample)
    assert theirs.in_manifold(our_forward)
    assert ours.in_manifold(theirs.sample())
    assert ours.in_manifold(theirs(torch.randn(4, 4, dtype=torch.float64)).detach())


@pytest.mark.parametrize("kind", KINDS)
def test_geotorch_and_tether_reject_the_same_non_members(kind):
    ours, theirs = geotorch_pairs()[kind]
    singular = torch.ones(4, 4, dtype=torch.float64)  # rank 1, PSD
    for X in [-torch.eye(4, dtype=torch.float64), rotated([-1.0, 1.0, 2.0, 3.0]), singular]:
        assert ours.in_manifold(X) == theirs.in_manifold(X)
