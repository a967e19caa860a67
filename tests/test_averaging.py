"""``update_base(..., averaged=)``: an averaged copy (EMA, SWA) follows the model's new base.

Issue 12, case 9: ``torch.optim.swa_utils.AveragedModel`` averages the originals, which
``update_base`` writes against a new base; the copy must move to that base too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import tether
from tests.parametrizations import Double

Make = Callable[[torch.dtype], nn.Module]

MODELS: dict[str, Make] = {
    "square_matrix_exp": lambda dtype: tether.orthogonal(nn.Linear(4, 4, dtype=dtype)),
    "square_cayley": lambda dtype: tether.orthogonal(
        nn.Linear(4, 4, dtype=dtype), orthogonal_map="cayley"
    ),
    "tall_householder": lambda dtype: tether.orthogonal(nn.Linear(3, 6, dtype=dtype)),
    "wide_householder": lambda dtype: tether.orthogonal(nn.Linear(6, 3, dtype=dtype)),
    "tall_matrix_exp": lambda dtype: tether.orthogonal(
        nn.Linear(3, 6, dtype=dtype), orthogonal_map="matrix_exp"
    ),
    "wide_cayley": lambda dtype: tether.orthogonal(
        nn.Linear(6, 3, dtype=dtype), orthogonal_map="cayley"
    ),
    "special_orthogonal": lambda dtype: tether.special_orthogonal(nn.Linear(4, 4, dtype=dtype)),
}
DTYPES = [torch.float32, torch.float64]


def tolerance(dtype: torch.dtype, layer: nn.Module) -> float:
    return 64 * max(layer.weight.shape) * torch.finfo(dtype).eps


def train(layer: nn.Module, averaged: AveragedModel, steps: int, every: int) -> list[float]:
    """SGD steps, the average updated after each, the bases moved every ``every`` steps.

    Returns how far the averaged weight moved at each ``update_base``.
    """
    dtype = layer.weight.dtype
    x = torch.randn(16, layer.in_features, dtype=dtype)
    y = torch.randn(16, layer.out_features, dtype=dtype)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    jumps = []
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        (layer(x) - y).abs().pow(2).mean().backward()
        optimizer.step()
        averaged.update_parameters(layer)
        if step % every == 0:
            before = averaged.module.weight.detach().clone()
            tether.update_base(layer, averaged=averaged)
            jumps.append(float((averaged.module.weight.detach() - before).abs().max()))
    return jumps


@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_regression_9_update_base_keeps_ema_copy(model, dtype, use_buffers):
    layer = MODELS[model](dtype)
    ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    jumps = train(layer, ema, steps=30, every=10)
    assert max(jumps) <= tolerance(dtype, layer)
    constraint = ema.module.parametrizations.weight[0]
    assert constraint.in_manifold(ema.module.weight)
    for _ in range(400):  # the model stops moving: the average converges to it
        ema.update_parameters(layer)
    torch.testing.assert_close(
        ema.module.weight, layer.weight, rtol=0, atol=tolerance(dtype, layer)
    )


@pytest.mark.parametrize("model", ["square_matrix_exp", "tall_householder", "tall_matrix_exp"])
def test_swa_copy_stays_continuous_and_orthogonal(model):
    layer = MODELS[model](torch.float64)
    swa = AveragedModel(layer)  # the equal average of every update
    jumps = train(layer, swa, steps=30, every=10)
    assert max(jumps) <= tolerance(torch.float64, layer)
    assert swa.module.parametrizations.weight[0].in_manifold(swa.module.weight)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.bfloat16], ids=str)
def test_update_base_keeps_an_ema_copy_of_another_dtype(dtype):
    layer = MODELS["square_matrix_exp"](dtype)
    ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    jumps = train(layer, ema, steps=20, every=10)
    assert max(jumps) <= tolerance(dtype, layer)
    assert ema.module.parametrizations.weight[0].in_manifold(ema.module.weight)


def test_averaged_copy_of_a_submodule():
    model = nn.Sequential(tether.orthogonal(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 2))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(0.1 * torch.randn(4, 4))
    ema.update_parameters(model)
    before = ema.module[0].weight.detach().clone()
    tether.update_base(model[0], averaged=ema.module[0])
    assert torch.allclose(ema.module[0].weight, before, atol=tolerance(torch.float32, model[0]))
    base = model[0].parametrizations.weight[0].base
    assert torch.equal(ema.module[0].parametrizations.weight[0].base, base)


def state(*modules: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def assert_unchanged(before: list[dict[str, torch.Tensor]], *modules: nn.Module) -> None:
    for saved, module in zip(before, modules, strict=True):
        for key, value in module.state_dict().items():
            assert torch.equal(saved[key], value), key


def test_averaged_that_is_not_the_copy_of_the_module_raises():
    model = nn.Sequential(tether.orthogonal(nn.Linear(4, 4)), nn.Tanh())
    ema = AveragedModel(model)
    before = state(model, ema)
    with pytest.raises(ValueError, match=r"update_base\(\) on Linear.weight: `averaged` must be"):
        tether.update_base(model[0], averaged=ema)  # the whole model, not its first layer
    assert_unchanged(before, model, ema)


def test_averaged_grassmannian_raises():
    layer = tether.grassmannian(nn.Linear(2, 5))
    with pytest.raises(ValueError, match=r"Grassmannian.*tether.orthogonal"):
        tether.update_base(layer, averaged=AveragedModel(layer))


def test_averaged_with_the_base_after_another_parametrization_raises():
    layer = tether.register_parametrization(nn.Linear(4, 4), "weight", Double())
    tether.orthogonal(layer)
    with pytest.raises(ValueError, match=r"must be the first parametrization"):
        tether.update_base(layer, averaged=AveragedModel(layer))


def test_averaged_weight_out_of_reach_raises_and_changes_nothing():
    layer = tether.orthogonal(nn.Linear(4, 4))
    ema = AveragedModel(layer)
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(0.3 * torch.randn(4, 4))
        ema.module.weight = -layer.weight  # eigenvalues -1 against the model: no logarithm
    before = state(layer, ema)
    with pytest.raises(ValueError, match=r"too far from the model's.*more often"):
        tether.update_base(layer, averaged=ema)
    assert_unchanged(before, layer, ema)
