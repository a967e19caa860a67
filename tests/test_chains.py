"""The chain's protocol: who writes goes through it, and every write drops its cached values.

Mirrors ``tether._chains`` (where chains live, the class before parametrization, the
originals) and the writers of ``ParametrizationList`` (plan / commit / rollback, serve,
``changed``, the list methods). Each cache test reads a weight inside ``cached()``, writes
through one path, and reads again: a write that forgot to drop the entry serves the old value.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.utils.parametrize as torch_parametrize
from torch import nn

import tether
from tests.parametrizations import Double, Symmetric
from tether import _chains


class Gain(nn.Module):
    """``gain * X`` with the gain in a buffer, so that state can change from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("gain", torch.ones(()))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.gain * X

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return X / self.gain


class Pair(nn.Module):
    """A many-to-one parametrization: the sum of two originals."""

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return A + B

    def right_inverse(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return X / 2, X / 2


def linear(*parametrizations: nn.Module) -> nn.Linear:
    layer = nn.Linear(3, 3)
    for parametrization in parametrizations:
        tether.register_parametrization(layer, "weight", parametrization)
    return layer


# --------------------------------------------------------------------------------------------
# tether._chains and tether.chains
# --------------------------------------------------------------------------------------------


def test_chains_is_a_read_only_view_of_the_module_chains():
    layer = linear(Symmetric())
    chains = tether.chains(layer)
    assert list(chains) == ["weight"]
    assert chains["weight"] is layer.parametrizations.weight
    with pytest.raises(TypeError):
        chains["bias"] = chains["weight"]  # type: ignore[index]


def test_chains_of_a_plain_module_is_empty():
    assert dict(tether.chains(nn.Linear(2, 2))) == {}


def test_chains_follow_removal():
    layer = linear(Symmetric())
    chains = tether.chains(layer)
    tether.remove_parametrizations(layer, "weight")
    assert dict(chains) == {} and dict(tether.chains(layer)) == {}


@pytest.mark.parametrize("library", ["tether", "torch"])
def test_class_before_for_both_libraries(library):
    layer = nn.Linear(2, 2)
    register = (
        tether.register_parametrization
        if library == "tether"
        else torch_parametrize.register_parametrization
    )
    register(layer, "weight", Symmetric())
    assert _chains.class_before(layer) is nn.Linear
    assert tether.type_before_parametrizations(layer) is nn.Linear


def test_class_before_of_a_plain_module_is_its_class():
    assert _chains.class_before(nn.Conv1d(1, 1, 1)) is nn.Conv1d


@pytest.mark.parametrize(
    ("parametrization", "names"),
    [(Symmetric(), ["original"]), (Pair(), ["original0", "original1"])],
)
def test_original_names_and_tensors(parametrization, names):
    layer = linear(parametrization)
    chain = tether.chains(layer)["weight"]
    assert _chains.original_names(chain) == names
    assert _chains.originals(chain) == tuple(getattr(chain, n) for n in names)
    assert chain.originals() == _chains.originals(chain)


def test_a_torch_chain_becomes_tether_chain_on_a_tether_class():
    layer = nn.Linear(3, 3)
    torch_parametrize.register_parametrization(layer, "weight", Symmetric())
    original = layer.parametrizations.weight.original
    tether.register_parametrization(layer, "weight", Double())  # appended, module adopted
    chain = tether.chains(layer)["weight"]
    assert isinstance(chain, tether.ParametrizationList)
    assert chain.original is original and chain.label == "Linear.weight"
    with tether.cached():
        before = layer.weight
        layer.weight = torch.eye(3)
        assert not torch.equal(layer.weight, before)
        torch.testing.assert_close(layer.weight, torch.eye(3))


# --------------------------------------------------------------------------------------------
# plan, commit, rollback
# --------------------------------------------------------------------------------------------


def test_plan_writes_nothing_until_commit():
    layer = linear(Gain())
    chain = tether.chains(layer)["weight"]
    before = chain.original.clone()
    plan = chain.plan(torch.full((3, 3), 4.0))
    assert torch.equal(chain.original, before)
    chain.commit(plan)
    assert torch.equal(layer.weight, torch.full((3, 3), 4.0))


class Normalised(nn.Module):
    """Stores the norm of the value it is given (state a right_inverse writes)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("norm", torch.ones(()))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.norm * X

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        self.norm.copy_(X.norm())
        return X / self.norm


def test_rollback_undoes_the_state_a_right_inverse_wrote():
    layer = linear(Normalised())
    chain = tether.chains(layer)["weight"]
    norm = chain[0].norm.clone()
    plan = chain.plan(torch.full((3, 3), 7.0))
    assert not torch.equal(chain[0].norm, norm)
    chain.rollback(plan)
    assert torch.equal(chain[0].norm, norm)


def test_a_failed_plan_leaves_the_state_as_it_was():
    layer = linear(Normalised(), Double())
    chain = tether.chains(layer)["weight"]
    norm, original = chain[0].norm.clone(), chain.original.clone()
    with pytest.raises(ValueError, match=r"Linear\.weight"):
        chain.plan(torch.full((3, 3), float("nan")))
    assert torch.equal(chain[0].norm, norm) and torch.equal(chain.original, original)


def test_commit_keeps_the_original_object_and_memory():
    layer = linear(Symmetric())
    chain = tether.chains(layer)["weight"]
    original, pointer = chain.original, chain.original.data_ptr()
    chain.commit(chain.plan(torch.eye(3)))
    assert chain.original is original and original.data_ptr() == pointer


def test_registration_and_assignment_run_the_same_inverses():
    """Registration and assignment share one backward run: the same originals for a value."""
    value = torch.randn(3, 3)
    value = value + value.mT
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(value)
    tether.register_parametrization(layer, "weight", Symmetric())
    tether.register_parametrization(layer, "weight", Double())
    registered = layer.parametrizations.weight.original.clone()
    other = linear(Symmetric(), Double())
    other.weight = value
    # Appending keeps the value (Symmetric's original is the value, Double's forward doubles
    # it), so compare what assignment stores for the registered chain's current value.
    layer.weight = layer.weight.detach()
    torch.testing.assert_close(layer.parametrizations.weight.original, registered)
    assert torch.equal(other.parametrizations.weight.original, (value / 2).triu())


# --------------------------------------------------------------------------------------------
# Every writer drops the cached value
# --------------------------------------------------------------------------------------------


def _assign(layer: nn.Module) -> None:
    layer.weight = torch.full((3, 3), 5.0)


def _load(layer: nn.Module) -> None:
    layer.load_state_dict({"weight": torch.full((3, 3), 5.0), "bias": layer.bias.detach()})


def _load_originals(layer: nn.Module) -> None:
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["parametrizations.weight.original"].fill_(5.0)
    layer.load_state_dict(state)


def _load_assign(layer: nn.Module) -> None:
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["parametrizations.weight.original"].fill_(5.0)
    layer.load_state_dict(state, assign=True)


def _transfer(layer: nn.Module) -> None:
    source = linear(Gain())
    source.weight = torch.full((3, 3), 5.0)
    tether.chains(layer)["weight"].original = source.parametrizations.weight.original


def _append(layer: nn.Module) -> None:
    tether.register_parametrization(layer, "weight", Double())


def _delete_link(layer: nn.Module) -> None:
    del tether.chains(layer)["weight"][1]  # the Double() that the layer was built with


def _changed(layer: nn.Module) -> None:
    chain = tether.chains(layer)["weight"]
    chain[0].gain.fill_(3.0)
    chain.changed()


def _reset(layer: nn.Module) -> None:
    layer.reset_parameters()


WRITERS = [_assign, _load, _load_originals, _load_assign, _transfer, _append, _delete_link]


@pytest.mark.parametrize("write", [*WRITERS, _changed, _reset], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("cache", ["cached", "autocache"])
def test_every_writer_drops_the_cached_value(write, cache):
    layer = linear(Gain(), Double()) if write is _delete_link else linear(Gain())
    seen = []

    def read_write_read() -> None:
        seen.append(layer.weight.detach().clone())
        write(layer)
        seen.append(layer.weight.detach().clone())

    if cache == "cached":
        with tether.cached():
            read_write_read()
    else:
        model = tether.autocache(nn.Sequential(layer))
        model.register_forward_pre_hook(lambda *_: read_write_read())
        model(torch.randn(1, 3))
    with torch.no_grad():
        fresh = tether.chains(layer)["weight"]().clone()
    assert torch.equal(seen[1], fresh)
    assert not torch.equal(seen[0], seen[1])


def test_serving_replaces_the_value_and_stopping_restores_it():
    layer = linear(Gain())
    chain = tether.chains(layer)["weight"]
    token, served = object(), torch.zeros(3, 3)
    with tether.cached():
        before = layer.weight.detach().clone()
        chain.serve(served, token)
        assert layer.weight is served and chain.served_token() is token
        chain.stop_serving(token)
        assert torch.equal(layer.weight, before) and chain.served_token() is None


def test_served_values_nest_and_end_by_token():
    layer = linear(Gain())
    chain = tether.chains(layer)["weight"]
    outer, inner = object(), object()
    first, second = torch.zeros(3, 3), torch.ones(3, 3)
    chain.serve(first, outer)
    chain.serve(second, inner)
    assert layer.weight is second
    chain.stop_serving(outer)  # out of order: the other stays served
    assert layer.weight is second
    chain.stop_serving(inner)
    assert not torch.equal(layer.weight, second) and "forward" not in chain.__dict__


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_a_chain_with_nothing_served_copies_without_serving_state(clone):
    layer = linear(Gain())
    chain = tether.chains(layer)["weight"]
    token = object()
    chain.serve(torch.zeros(3, 3), token)
    chain.stop_serving(token)
    copied = clone(layer)
    assert "_tether_served" not in tether.chains(copied)["weight"].__dict__
    assert torch.equal(copied.weight, layer.weight)
