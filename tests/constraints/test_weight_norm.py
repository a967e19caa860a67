"""WeightNorm and weight_norm, against PyTorch's (the maps: tests/functional/test_norms.py)."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as torch_parametrizations

import tether
from tether import _torch_compat
from tether.constraints import WeightNorm
from tether.functional import norm_except_dim, weight_normalize
from tether.testing import check_parametrization

LAYERS = {
    "linear": lambda: nn.Linear(5, 3),
    "conv1d": lambda: nn.Conv1d(2, 4, 3),
    "conv2d": lambda: nn.Conv2d(3, 4, 3),
    "conv_transpose2d": lambda: nn.ConvTranspose2d(3, 4, 2),
}
DIMS = [0, 1, -1, -2, None]


def seeded_pair(make, dim, seed=0):
    """The same layer twice: with tether's weight_norm and with torch's."""
    torch.manual_seed(seed)
    ours = tether.weight_norm(make(), dim=dim)
    torch.manual_seed(seed)
    theirs = torch_parametrizations.weight_norm(make(), dim=dim)
    return ours, theirs


def old_weight_norm(module, name="weight", dim=0):
    """torch's deprecated hook-based weight norm, whose checkpoints we load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(module, name=name, dim=dim)


# Compatibility with torch.nn.utils.parametrizations.weight_norm


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("layer", LAYERS)
def test_values_match_torch_in_train_and_eval(layer, dim):
    ours, theirs = seeded_pair(LAYERS[layer], dim)
    assert torch.equal(ours.weight, theirs.weight)
    ours.eval()
    theirs.eval()
    assert torch.equal(ours.weight, theirs.weight)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("layer", LAYERS)
def test_gradients_match_torch(layer, dim):
    ours, theirs = seeded_pair(LAYERS[layer], dim)
    cotangent = torch.randn_like(ours.weight)
    (ours.weight * cotangent).sum().backward()
    (theirs.weight * cotangent).sum().backward()
    for name in ["original0", "original1"]:
        ours_grad = getattr(ours.parametrizations.weight, name).grad
        theirs_grad = getattr(theirs.parametrizations.weight, name).grad
        assert torch.allclose(ours_grad, theirs_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dim", DIMS)
def test_originals_match_torch(dim):
    ours, theirs = seeded_pair(LAYERS["conv2d"], dim)
    g, v = ours.parametrizations.weight.original0, ours.parametrizations.weight.original1
    assert torch.equal(g, theirs.parametrizations.weight.original0)
    assert torch.equal(v, theirs.parametrizations.weight.original1)
    assert isinstance(g, nn.Parameter) and isinstance(v, nn.Parameter)


def test_assignment_matches_torch():
    ours, theirs = seeded_pair(LAYERS["linear"], 0)
    X = torch.randn(3, 5)
    ours.weight = X
    theirs.weight = X
    assert torch.equal(ours.weight, theirs.weight)
    assert torch.equal(ours.parametrizations.weight.original0, norm_except_dim(X, 0))


@pytest.mark.parametrize("dim", [0, None])
def test_state_dict_keys_match_torch(dim):
    ours, theirs = seeded_pair(LAYERS["conv2d"], dim)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert list(ours.state_dict()) == [
        "bias",
        "parametrizations.weight.original0",
        "parametrizations.weight.original1",
    ]


@pytest.mark.parametrize("direction", ["torch_to_tether", "tether_to_torch"])
def test_checkpoints_move_both_ways(direction):
    ours, theirs = seeded_pair(LAYERS["conv2d"], 0, seed=0)
    source, target = (theirs, ours) if direction == "torch_to_tether" else (ours, theirs)
    with torch.no_grad():
        source.parametrizations.weight.original1.mul_(2.0)
        source.parametrizations.weight.original0.add_(1.0)
    target.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(target.weight, source.weight)


# Checkpoints of the old hook-based torch.nn.utils.weight_norm


@pytest.mark.parametrize("dim", [0, 1, None])
def test_old_hook_based_checkpoint_loads(dim):
    old = old_weight_norm(nn.Linear(5, 3), dim=dim)
    new = tether.weight_norm(nn.Linear(5, 3), dim=dim)
    new.load_state_dict(old.state_dict(), strict=True)
    assert torch.allclose(new.weight, old.weight)
    assert torch.equal(new.parametrizations.weight.original0, old.weight_g)


def test_old_checkpoint_loads_into_a_nested_model():
    old = nn.Sequential(nn.Linear(4, 4), old_weight_norm(nn.Linear(4, 2), name="bias"))
    new = nn.Sequential(nn.Linear(4, 4), tether.weight_norm(nn.Linear(4, 2), name="bias"))
    new.load_state_dict(old.state_dict(), strict=True)
    assert torch.allclose(new[1].bias, old[1].bias)
    assert torch.equal(new[0].weight, old[0].weight)


def test_old_checkpoint_loads_after_pickling_and_deepcopy():
    old = old_weight_norm(nn.Linear(5, 3))
    new = tether.weight_norm(nn.Linear(5, 3))
    for restored in [pickle.loads(pickle.dumps(new)), copy.deepcopy(new)]:
        restored.load_state_dict(old.state_dict(), strict=True)
        assert torch.allclose(restored.weight, old.weight)


def test_the_load_hook_is_registered_once():
    layer = tether.weight_norm(nn.Linear(5, 3))
    tether.remove_parametrizations(layer, "weight")
    tether.weight_norm(layer)
    assert len(_torch_compat.load_state_dict_pre_hooks(layer)) == 1


def test_old_keys_are_not_renamed_once_the_norm_is_removed():
    old = old_weight_norm(nn.Linear(5, 3))
    layer = tether.remove_parametrizations(tether.weight_norm(nn.Linear(5, 3)), "weight")
    with pytest.raises(RuntimeError, match="weight_g"):
        layer.load_state_dict(old.state_dict())


# The parametrization


@pytest.mark.parametrize("dim", DIMS)
def test_check_parametrization(dim):
    check_parametrization(WeightNorm(dim), torch.randn(3, 4, 2, dtype=torch.float64))


def test_repr_names_the_dim():
    assert repr(WeightNorm(1)) == "WeightNorm(dim=1)"
    assert repr(WeightNorm(None)) == "WeightNorm(dim=-1)"


def test_training_keeps_the_decomposition():
    torch.manual_seed(0)
    layer = tether.weight_norm(nn.Linear(4, 3))
    target = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    X = torch.randn(64, 4)
    Y = target(X).detach()
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = (layer(X) - Y).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    g = layer.parametrizations.weight.original0
    v = layer.parametrizations.weight.original1
    assert torch.allclose(layer.weight, g * v / v.norm(dim=1, keepdim=True), atol=1e-6)
    assert losses[-1] < 0.1 * losses[0]


# Errors


@pytest.mark.parametrize("dim", [2, -3, 5])
def test_dim_out_of_range_raises_index_error(dim):
    with pytest.raises(IndexError, match=r"weight_norm\(\) on Linear.weight.*range"):
        tether.weight_norm(nn.Linear(5, 3), dim=dim)


@pytest.mark.parametrize("dim", ["0", 1.0, True])
def test_dim_of_the_wrong_type_raises_type_error(dim):
    with pytest.raises(TypeError, match="`dim` must be an int or None"):
        tether.weight_norm(nn.Linear(5, 3), dim=dim)
    with pytest.raises(TypeError, match="`dim` must be an int or None"):
        WeightNorm(dim)


def linear_with_a_number() -> nn.Module:
    layer = nn.Linear(5, 3, bias=False)
    layer.scale = 2.0
    return layer


@pytest.mark.parametrize("name", ["kernel", "scale", "bias"])
def test_a_name_without_a_tensor_raises_the_error_of_every_registering_function(name):
    # No such attribute, a number, a bias of None: the mechanism's message names the module,
    # the tensor and what can be parametrized instead.
    with pytest.raises(ValueError, match=rf"Linear\.{name}") as ours:
        tether.weight_norm(linear_with_a_number(), name=name)
    with pytest.raises(ValueError) as shared:
        tether.register_parametrization(linear_with_a_number(), name, nn.Identity())
    assert str(ours.value) == str(shared.value)


@pytest.mark.parametrize("dim", [0, None])
def test_zero_dimensional_tensor_raises_value_error(dim):
    module = nn.Module()
    module.scale = nn.Parameter(torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"weight_norm\(\) on Module.scale needs at least one"):
        tether.weight_norm(module, "scale", dim=dim)


# Complex weights (torch's fused kernel has them only for one magnitude for the whole tensor)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_a_complex_weight_keeps_its_value_and_trains_with_real_magnitudes(dim):
    torch.manual_seed(0)
    layer = nn.Module()  # nn.Linear(...).to(complex) warns that complex modules are new
    layer.weight = nn.Parameter(torch.randn(4, 3, dtype=torch.complex128))
    before = layer.weight.detach().clone()
    tether.weight_norm(layer, dim=dim)
    torch.testing.assert_close(layer.weight, before)
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    assert g.dtype == torch.float64 and v.dtype == torch.complex128
    layer.weight.abs().sum().backward()
    assert g.grad is not None and g.grad.dtype == torch.float64
    assert v.grad is not None and v.grad.dtype == torch.complex128


@pytest.mark.parametrize("dim", [0, 1])
def test_complex_weight_normalization_is_magnitude_times_direction_with_exact_gradients(dim):
    v = torch.randn(4, 3, dtype=torch.complex128, requires_grad=True)
    g = (torch.rand(4, 1) if dim == 0 else torch.rand(1, 3)).double().requires_grad_()
    W = weight_normalize(g, v, dim)
    torch.testing.assert_close(norm_except_dim(W, dim), g.detach())
    torch.testing.assert_close(W / norm_except_dim(W, dim), v / norm_except_dim(v, dim))
    assert torch.autograd.gradcheck(lambda g, v: weight_normalize(g, v, dim), (g, v))
