"""``reset_parameters()`` of a parametrized module (``tether._reset``): it re-initialises the
module as its base class would, through ``right_inverse``, so that models with constraints
built on the meta device and moved with ``to_empty`` can be initialised."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.utils.parametrizations as torch_parametrizations
from torch import nn

import tether
from tests.parametrizations import Double, Symmetric
from tether.constraints import Constraint

Register = Callable[[nn.Linear], nn.Module]

CONSTRAINTS: dict[str, tuple[tuple[int, int], Register]] = {
    "orthogonal square": ((5, 5), tether.orthogonal),
    "orthogonal wide": ((6, 4), tether.orthogonal),
    "orthogonal tall": ((3, 5), tether.orthogonal),
    "special_orthogonal": ((4, 4), tether.special_orthogonal),
    "spectral_norm": ((6, 5), tether.spectral_norm),
    "symmetric": ((4, 4), tether.symmetric),
    "positive_definite": ((4, 4), tether.positive_definite),
    "low_rank": ((6, 5), lambda m: tether.low_rank(m, rank=2)),
    "sphere": ((6, 5), tether.sphere),
}


def initialise(model: nn.Module) -> None:
    """The usual deferred-initialisation loop."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_built_on_meta_then_initialised_satisfies_the_constraint(kind: str):
    (n_in, n_out), register = CONSTRAINTS[kind]
    with torch.device("meta"):
        layer = register(nn.Linear(n_in, n_out))
    assert all(t.is_meta for t in layer.state_dict().values())
    layer.to_empty(device="cpu")
    for t in layer.state_dict().values():
        t.fill_(float("nan"))  # what uninitialised memory may hold
    initialise(layer)
    layer.eval()
    assert all(bool(t.isfinite().all()) for t in layer.state_dict().values())
    constraint = layer.parametrizations.weight[0]
    assert isinstance(constraint, Constraint)
    assert constraint.in_manifold(layer.weight)
    x = torch.randn(2, n_in)
    assert bool(layer(x).isfinite().all())


def test_weight_norm_and_a_whole_model_on_meta():
    with torch.device("meta"):
        model = nn.Sequential(
            tether.weight_norm(nn.Linear(5, 4)),
            nn.ReLU(),
            tether.orthogonal(nn.Linear(4, 4)),
            tether.spectral_norm(nn.Linear(4, 3)),
        )
        initialise(model)  # on the meta device: nothing to compute, and nothing fails
    assert all(t.is_meta for t in model.state_dict().values())
    model.to_empty(device="cpu")
    initialise(model)
    model.eval()
    assert all(bool(t.isfinite().all()) for t in model.state_dict().values())
    g, v = model[0].parametrizations.weight.originals()
    assert torch.allclose(model[0].weight, g * v / v.norm(dim=1, keepdim=True), atol=1e-6)
    Q = model[2].weight
    assert torch.allclose(Q @ Q.T, torch.eye(4), atol=1e-5)


def test_torch_orthogonal_fails_on_meta_and_its_reset_leaves_the_original():
    with pytest.raises(RuntimeError, match="meta"), torch.device("meta"):
        torch_parametrizations.orthogonal(nn.Linear(4, 4))
    with torch.device("meta"):
        theirs = torch_parametrizations.spectral_norm(nn.Linear(4, 4))
        ours = tether.spectral_norm(nn.Linear(4, 4))
    for layer in theirs, ours:
        layer.to_empty(device="cpu")
        layer.parametrizations.weight.original.data.zero_()
        layer.reset_parameters()
    # torch's reset writes into a computed weight and throws it away.
    assert torch.equal(theirs.parametrizations.weight.original, torch.zeros(4, 4))
    assert ours.parametrizations.weight.original.abs().sum() > 0


REGISTER: dict[str, Register] = {
    "custom": lambda m: tether.register_parametrization(m, "weight", Symmetric()),
    "orthogonal": tether.orthogonal,
    "positive_definite": tether.positive_definite,
    "weight_norm": tether.weight_norm,
}


@pytest.mark.parametrize("kind", REGISTER)
def test_reset_is_the_base_initialisation_assigned_through_right_inverse(kind: str):
    register = REGISTER[kind]
    layer, expected, plain = register(nn.Linear(4, 4)), register(nn.Linear(4, 4)), nn.Linear(4, 4)
    original = layer.parametrizations.weight.originals()[0]
    torch.manual_seed(1)
    layer.reset_parameters()
    torch.manual_seed(1)
    plain.reset_parameters()
    expected.weight = plain.weight.detach()
    assert torch.allclose(layer.weight, expected.weight, atol=1e-6)
    assert torch.equal(layer.bias, plain.bias)
    assert layer.parametrizations.weight.originals()[0] is original  # same Parameter


def test_reset_keeps_a_parametrized_tensor_the_base_does_not_initialise():
    class BiasOnly(nn.Linear):
        def reset_parameters(self) -> None:
            if hasattr(self, "bias") and self.bias is not None:
                nn.init.zeros_(self.bias)

    layer = tether.orthogonal(BiasOnly(4, 4))
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert torch.equal(layer.weight, before)
    assert torch.equal(layer.bias, torch.zeros(4))


def test_reset_redraws_the_spectral_norm_vectors_as_registration_does():
    layer, plain = tether.spectral_norm(nn.Linear(6, 5)), nn.Linear(6, 5)
    torch.manual_seed(1)
    layer.reset_parameters()
    torch.manual_seed(1)
    plain.reset_parameters()
    fresh = tether.spectral_norm(plain)
    assert torch.equal(
        layer.parametrizations.weight.original, fresh.parametrizations.weight.original
    )
    for name in "_u", "_v":
        ours = getattr(layer.parametrizations.weight[0], name)
        # Same draws and warm-up; registration then evaluates once more (one more iteration).
        assert torch.allclose(ours, getattr(fresh.parametrizations.weight[0], name), atol=1e-3)


def test_reset_of_a_pruned_layer_keeps_the_mask():
    layer = tether.prune.l1_unstructured(nn.Linear(6, 6), "weight", amount=0.5)
    mask = layer.parametrizations.weight[0].mask.clone()
    before = layer.parametrizations.weight.original.detach().clone()
    layer.reset_parameters()
    assert torch.equal(layer.parametrizations.weight[0].mask, mask)
    assert not torch.equal(layer.parametrizations.weight.original, before)
    assert torch.equal(layer.weight == 0, mask == 0)


class UpperTriangular(nn.Module):
    """Upper-triangular matrices; assigning any other matrix is refused."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.triu()

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        if not torch.equal(X, X.triu()):
            raise ValueError("not upper triangular: assign X.triu()")
        return X


def test_reset_that_the_constraint_cannot_take_changes_nothing():
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.triu_()
    layer = tether.register_parametrization(layer, "weight", UpperTriangular())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"reset_parameters\(\) of Linear.weight.*triangular"):
        layer.reset_parameters()  # Kaiming matrices are not triangular
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_reset_on_a_chain_torch_started():
    layer = torch_parametrizations.orthogonal(nn.Linear(4, 4))
    tether.register_parametrization(layer, "weight", Symmetric())
    layer.reset_parameters()
    W = layer.weight
    assert torch.allclose(W, W.T, atol=1e-6)


def test_only_modules_whose_base_has_reset_parameters_get_one():
    assert hasattr(tether.orthogonal(nn.Linear(3, 3)), "reset_parameters")

    class NoReset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.eye(3))

    assert not hasattr(tether.orthogonal(NoReset()), "reset_parameters")


class FirstColumn(nn.Linear):
    """A Linear whose initialisation writes only the first column of its weight (in place, or
    through ``.data``, which does not count as a write for autograd's version counter)."""

    def __init__(self, n: int, through_data: bool) -> None:
        super().__init__(n, n)  # Linear's own initialisation, of every entry
        self.through_data = through_data

    def reset_parameters(self) -> None:
        if not hasattr(self, "through_data"):  # called by Linear.__init__
            return super().reset_parameters()
        weight = self.weight.data if self.through_data else self.weight
        with torch.no_grad():
            weight[:, 0] = 0.5
        return None


PARTIAL_WRITES = [pytest.param(False, id="in-place"), pytest.param(True, id="data")]


@pytest.mark.parametrize("through_data", PARTIAL_WRITES)
def test_reset_that_writes_part_of_a_weight_is_not_dropped(through_data):
    # Either the written column shows in the weight, or the reset says why it could not be
    # set; what must not happen is a reset that silently keeps the old weight.
    layer = tether.register_parametrization(FirstColumn(4, through_data), "weight", Double())
    assert not bool((layer.weight[:, 0] == 0.5).any())
    try:
        layer.reset_parameters()
    except ValueError as error:
        assert "reset_parameters() of FirstColumn.weight" in str(error)
    else:
        assert torch.equal(layer.weight[:, 0], torch.full((4,), 0.5))


@pytest.mark.parametrize("through_data", PARTIAL_WRITES)
def test_reset_that_writes_part_of_a_weight_keeps_the_other_entries(through_data):
    # "As its base class would" (docs/transforms.md): on a plain FirstColumn the other
    # entries keep their values; Double takes every value, so nothing needs projecting.
    layer = tether.register_parametrization(FirstColumn(4, through_data), "weight", Double())
    plain = FirstColumn(4, through_data)
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
    plain.reset_parameters()
    layer.reset_parameters()
    assert torch.equal(layer.weight, plain.weight)
