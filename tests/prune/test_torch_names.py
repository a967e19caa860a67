"""Tests for ``module.<name>_mask`` and ``module.<name>_orig`` (``tether.prune._torch_names``)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import tether
from tests.parametrizations import Double
from tether import prune


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_mask_is_the_mask_buffer_itself(name):
    layer = prune.random_unstructured(nn.Linear(5, 4), name, amount=0.5)
    assert getattr(layer, f"{name}_mask") is layer.parametrizations[name][0].mask


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_orig_is_the_original_parameter_itself(name):
    layer = nn.Linear(5, 4)
    before = getattr(layer, name)
    prune.random_unstructured(layer, name, amount=0.5)
    assert getattr(layer, f"{name}_orig") is before
    assert getattr(layer, f"{name}_orig") is layer.parametrizations[name].original


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_names_read_like_torchs(name):
    theirs = nn.Linear(5, 4)
    ours = copy.deepcopy(theirs)
    torch.manual_seed(0)
    torch_prune.random_unstructured(theirs, name, amount=0.5)
    torch.manual_seed(0)
    prune.random_unstructured(ours, name, amount=0.5)
    for suffix in ("_mask", "_orig"):
        assert torch.equal(getattr(ours, name + suffix), getattr(theirs, name + suffix))


def test_orig_collects_the_gradient_as_torchs():
    theirs = nn.Linear(5, 3)
    ours = copy.deepcopy(theirs)
    torch_prune.l1_unstructured(theirs, "weight", amount=6)
    prune.l1_unstructured(ours, "weight", amount=6)
    x = torch.randn(4, 5)
    theirs(x).sum().backward()
    ours(x).sum().backward()
    assert torch.equal(ours.weight_orig.grad, theirs.weight_orig.grad)


def test_mask_is_live_after_pruning_again():
    layer = prune.l1_unstructured(nn.Linear(5, 3), "weight", amount=3)
    mask = layer.weight_mask
    prune.l1_unstructured(layer, "weight", amount=3)
    assert mask is layer.weight_mask
    assert int((mask == 0).sum()) == 6


def test_orig_after_another_parametrization_is_the_value_entering_the_mask():
    layer = tether.register_parametrization(nn.Linear(3, 3), "weight", Double())
    prune.l1_unstructured(layer, "weight", amount=4)
    assert torch.equal(layer.weight_orig, 2 * layer.parametrizations.weight.original)
    assert torch.equal(layer.weight, layer.weight_orig * layer.weight_mask)


def test_names_stay_out_of_parameters_buffers_and_state_dict():
    layer = prune.l1_unstructured(nn.Linear(3, 3), "weight", amount=4)
    names = {n for n, _ in layer.named_parameters()} | {n for n, _ in layer.named_buffers()}
    assert names | set(layer.state_dict()) == {
        "bias",
        "parametrizations.weight.original",
        "parametrizations.weight.0.mask",
    }


@pytest.mark.parametrize("attribute", ["weight_mask", "weight_orig", "bias_mask", "bias_orig"])
def test_names_are_absent_where_torchs_are(attribute):
    layer = tether.register_parametrization(nn.Linear(3, 3), "bias", Double())
    assert not hasattr(layer, attribute)  # nothing pruned; bias parametrized but not pruned
    prune.l1_unstructured(layer, "weight", amount=1)
    prune.remove(layer, "weight")
    assert not hasattr(layer, attribute)


def test_a_missing_attribute_keeps_torchs_error():
    layer = prune.l1_unstructured(nn.Linear(3, 3), "weight", amount=1)
    with pytest.raises(AttributeError, match="'ParametrizedLinear' object has no attribute 'nope'"):
        _ = layer.nope


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_copies_serve_the_names(copier):
    layer = prune.l1_unstructured(nn.Linear(3, 3), "weight", amount=4)
    copied = copier(layer)
    assert copied.weight_orig is copied.parametrizations.weight.original
    assert torch.equal(copied.weight_mask, layer.weight_mask)
