"""Tests for checkpoints: torch-pruned ones loading into tether-pruned models, and back out."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import tether
from tether import prune
from tether.prune._checkpoint import load_torch_keys


def network() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 5), nn.Linear(5, 2))


def torch_pruned() -> nn.Module:
    net = network()
    torch_prune.ln_structured(net[0], "weight", amount=1, n=2, dim=0)
    torch_prune.l1_unstructured(net[2], "weight", amount=0.5)
    torch_prune.l1_unstructured(net[2], "weight", amount=0.5)
    torch_prune.random_unstructured(net[3], "bias", amount=1)
    return net


def tether_pruned() -> nn.Module:
    """The same architecture, pruned differently, so that loading must change the masks."""
    net = network()
    prune.identity(net[0], "weight")
    prune.random_unstructured(net[2], "weight", amount=0.1)
    prune.identity(net[3], "bias")
    return net


def hooks_of(module: nn.Module) -> list[object]:
    return [h for h in module._load_state_dict_pre_hooks.values() if h.hook is load_torch_keys]


@pytest.mark.parametrize(
    "prepare", [lambda m: m, copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))]
)
def test_a_torch_pruned_checkpoint_loads_into_a_tether_pruned_model(prepare):
    theirs = torch_pruned()
    ours = prepare(tether_pruned())
    result = ours.load_state_dict(theirs.state_dict())
    assert result.missing_keys == result.unexpected_keys == []
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours[2].parametrizations.weight[0].mask, theirs[2].weight_mask)
    assert torch.equal(ours[2].parametrizations.weight.original, theirs[2].weight_orig)


def test_a_torch_pruned_checkpoint_loads_through_torch_save(tmp_path):
    theirs = torch_pruned()
    torch.save(theirs.state_dict(), tmp_path / "pruned.pt")
    ours = tether_pruned()
    ours.load_state_dict(torch.load(tmp_path / "pruned.pt"))
    assert torch.equal(ours[3].bias, theirs[3].bias)


def test_loading_into_a_single_module_uses_its_own_prefix():
    theirs = torch_prune.l1_unstructured(nn.Linear(4, 3), "weight", amount=0.5)
    ours = prune.identity(nn.Linear(4, 3), "weight")
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight)


def test_tether_checkpoints_still_load_as_they_are():
    source = tether_pruned()
    target = tether_pruned()
    assert target.load_state_dict(source.state_dict()).missing_keys == []
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(target(x), source(x))


def test_one_hook_per_module_and_none_after_the_last_removal():
    layer = prune.l1_unstructured(nn.Linear(4, 3), "weight", amount=0.5)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    prune.identity(layer, "bias")
    assert len(hooks_of(layer)) == 1
    prune.remove(layer, "weight")
    assert len(hooks_of(layer)) == 1
    prune.remove(layer, "bias")
    assert hooks_of(layer) == []


def test_a_mask_after_another_parametrization_does_not_take_torchs_keys():
    class Double(nn.Module):
        def forward(self, X: torch.Tensor) -> torch.Tensor:
            return 2 * X

    theirs = torch_prune.l1_unstructured(nn.Linear(4, 3), "weight", amount=0.5)
    ours = tether.register_parametrization(nn.Linear(4, 3), "weight", Double())
    prune.identity(ours, "weight")
    with pytest.raises(RuntimeError, match="weight_orig"):
        ours.load_state_dict(theirs.state_dict())
    result = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == ["weight_mask", "weight_orig"]


def test_plain_state_dict_exports_the_pruned_values():
    net = torch_pruned()
    ours = tether_pruned()
    ours.load_state_dict(net.state_dict())
    plain = tether.plain_state_dict(ours)
    assert set(plain) == set(network().state_dict())
    assert torch.equal(plain["2.weight"], net[2].weight)
    fresh = network()
    fresh.load_state_dict(plain)
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(fresh(x), net(x))


def test_a_plain_checkpoint_loads_into_a_pruned_model_and_keeps_the_mask():
    ours = tether_pruned()
    mask = ours[2].parametrizations.weight[0].mask.clone()
    plain = network().state_dict()
    ours.load_state_dict(plain)
    assert torch.equal(ours[2].parametrizations.weight[0].mask, mask)
    assert torch.equal(ours[2].weight, plain["2.weight"] * mask)
