"""Loading ``state_dict``s into parametrized modules, against torch's parametrize: the same keys
and tensors, checkpoints that load both ways between the implementations, and a model built on
the meta device loaded with ``assign=True`` (torch twins, :mod:`tests.twins`)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.utils.parametrize as torch_parametrize
from torch import nn

import tether.parametrize as tether_parametrize
from tests.parametrizations import (
    Cayley,
    Halves,
    LearnableScale,
    Scale,
    Skew,
    Symmetric,
    UpperPlusLower,
)
from tests.twins import assert_same, snapshot, twin


def _build_symmetric(parametrize):
    layer = nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    parametrize.register_parametrization(layer, "weight", LearnableScale())
    return layer


def _build_many(parametrize):
    layer = nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "weight", UpperPlusLower())
    parametrize.register_parametrization(layer, "bias", Scale(2.0))
    return layer


def _build_buffer(parametrize):
    norm = nn.BatchNorm1d(4)
    parametrize.register_parametrization(norm, "running_var", Scale(2.0))
    parametrize.register_parametrization(norm, "weight", Halves())
    return norm.eval()


def _build_conv(parametrize):
    conv = nn.Conv2d(2, 2, kernel_size=3)
    parametrize.register_parametrization(conv, "weight", Skew())
    parametrize.register_parametrization(conv, "weight", Cayley())
    return conv


BUILDERS = [
    pytest.param(_build_symmetric, id="symmetric-learnable"),
    pytest.param(_build_many, id="many-to-one"),
    pytest.param(_build_buffer, id="buffer"),
    pytest.param(_build_conv, id="conv-cayley"),
]
INPUTS = {
    _build_symmetric: (3, 4),
    _build_many: (3, 4),
    _build_buffer: (3, 4),
    _build_conv: (1, 2, 5, 5),
}


@pytest.mark.parametrize("build", BUILDERS)
def test_state_dict_keys_and_tensors_match_torch(build):
    expected, actual = twin(lambda parametrize: build(parametrize).state_dict())
    assert_same(expected, actual)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        pytest.param(torch_parametrize, tether_parametrize, id="torch-to-tether"),
        pytest.param(tether_parametrize, torch_parametrize, id="tether-to-torch"),
    ],
)
@pytest.mark.parametrize("build", BUILDERS)
def test_state_dict_loads_across_implementations(build, source, target):
    torch.manual_seed(1)
    saved = build(source)
    with torch.no_grad():
        for parameter in saved.parameters():
            parameter.add_(torch.randn_like(parameter))
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)

    torch.manual_seed(2)
    loaded = build(target)
    result = loaded.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    x = torch.randn(INPUTS[build])
    assert_same(snapshot(saved, source, x), snapshot(loaded, target, x))


def test_meta_initialised_model_loads_with_assign_like_torch():
    torch.manual_seed(3)
    checkpoint = _build_many(torch_parametrize).state_dict()

    def scenario(parametrize):
        with torch.device("meta"):
            layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", UpperPlusLower())
        parametrize.register_parametrization(layer, "bias", Scale(2.0))
        layer.load_state_dict(checkpoint, assign=True)
        return snapshot(layer, parametrize, torch.randn(2, 4))

    expected, actual = twin(scenario)
    assert_same(expected, actual)
