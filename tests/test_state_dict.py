"""Tests for plain checkpoints: ``tether.plain_state_dict`` out, and plain keys (``weight``)
loading into parametrized modules through ``right_inverse``."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import tether
from tests.parametrizations import Double, Normalized, Symmetric, UpperPlusLower

N = 4


class Block(nn.Module):
    """A module with its own parameter next to children, nested two levels deep."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(N) + 0.5)
        self.inner = nn.Sequential(nn.Linear(N, N), nn.Tanh(), nn.Linear(N, N))
        self.norm = nn.BatchNorm1d(N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.inner(x)) * self.scale


def linear(parametrize: bool) -> nn.Module:
    layer = nn.Linear(N, N)
    if parametrize:
        tether.register_parametrization(layer, "weight", Symmetric())
    return layer


def chain(parametrize: bool) -> nn.Module:
    layer = nn.Linear(N, N)
    if parametrize:
        tether.register_parametrization(layer, "weight", Symmetric())
        tether.register_parametrization(layer, "weight", Double())
        tether.register_parametrization(layer, "bias", Double())
    return layer


def many_to_one(parametrize: bool) -> nn.Module:
    layer = nn.Linear(N, N)
    if parametrize:
        tether.register_parametrization(layer, "weight", UpperPlusLower())
    return layer


def with_buffer(parametrize: bool) -> nn.Module:
    layer = nn.Linear(N, N)
    if parametrize:
        tether.register_parametrization(layer, "weight", Normalized())
    return layer


def nested(parametrize: bool) -> nn.Module:
    model = nn.Sequential(nn.Linear(N, N), nn.ReLU(), Block())
    if parametrize:
        tether.register_parametrization(model[0], "weight", Symmetric())
        tether.register_parametrization(model[2], "scale", Double())
        tether.register_parametrization(model[2].inner[0], "weight", UpperPlusLower())
        tether.register_parametrization(model[2].inner[2], "weight", Normalized())
        tether.register_parametrization(model[2].inner[2], "bias", Double())
        tether.register_parametrization(model[2].norm, "running_var", Double())  # a buffer
    return model


BUILDERS: dict[str, Callable[[bool], nn.Module]] = {
    "linear": linear,
    "chain": chain,
    "many_to_one": many_to_one,
    "with_buffer": with_buffer,
    "nested": nested,
}


@pytest.fixture(params=list(BUILDERS))
def builder(request: pytest.FixtureRequest) -> Callable[[bool], nn.Module]:
    return BUILDERS[request.param]


def removed_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every parametrization removed, keeping the parametrized values."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if tether.is_parametrized(module):
            for name in list(module.parametrizations):
                tether.remove_parametrizations(module, name, leave_parametrized=True)
    return plain


def snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "classes": [type(m) for m in model.modules()],
        "parameters": [(n, id(p)) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def symmetric(n: int = N, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    A = torch.randn(n, n, dtype=dtype)
    return A + A.mT


# --- plain_state_dict -----------------------------------------------------------------------


def test_plain_state_dict_equals_the_state_dict_without_parametrizations(builder):
    model = builder(True)
    assert_same_state(tether.plain_state_dict(model), removed_copy(model).state_dict())


def test_plain_state_dict_leaves_the_model_unchanged(builder):
    model = builder(True)
    before = snapshot(model)
    tether.plain_state_dict(model)
    after = snapshot(model)
    assert after["classes"] == before["classes"]
    assert after["parameters"] == before["parameters"]
    assert_same_state(after["state"], before["state"])


def test_plain_state_dict_loads_strictly_into_a_plain_model(builder):
    model = builder(True)
    plain = builder(False)
    result = plain.load_state_dict(tether.plain_state_dict(model), strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []


def test_plain_model_loaded_from_plain_state_dict_computes_the_same(builder):
    model = builder(True).eval()
    plain = builder(False).eval()
    plain.load_state_dict(tether.plain_state_dict(model))
    x = torch.randn(3, N)
    assert torch.equal(plain(x), model(x))


def test_plain_state_dict_tensors_do_not_require_grad(builder):
    plain = tether.plain_state_dict(builder(True))
    assert not any(v.requires_grad for v in plain.values())


def test_plain_state_dict_of_an_unparametrized_model_is_its_state_dict():
    model = nested(False)
    assert_same_state(tether.plain_state_dict(model), model.state_dict())


def test_plain_state_dict_applies_the_prefix():
    model = nested(True)
    expected = {f"model.{k}": v for k, v in tether.plain_state_dict(model).items()}
    assert_same_state(tether.plain_state_dict(model, prefix="model."), expected)


def test_plain_state_dict_of_a_module_used_twice():
    layer = linear(True)
    model = nn.Sequential(layer, layer)
    assert_same_state(tether.plain_state_dict(model), removed_copy(model).state_dict())


class WithTable(nn.Module):
    """A Linear next to a buffer registered with ``persistent=False`` (a lookup table, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(N, N)
        self.register_buffer("table", torch.randn(N, N), persistent=False)


@pytest.mark.parametrize(
    "parametrize", [tether, torch.nn.utils.parametrize], ids=["tether", "torch"]
)
def test_a_parametrized_non_persistent_buffer_gets_a_persistent_original(parametrize):
    # As in torch: the original is registered as a buffer of the list, persistent.
    model = WithTable()
    parametrize.register_parametrization(model, "table", Double())
    assert list(model.state_dict()) == [
        "linear.weight",
        "linear.bias",
        "parametrizations.table.original",
    ]


def test_plain_state_dict_of_a_parametrized_non_persistent_buffer():
    model = WithTable()
    tether.register_parametrization(model, "table", Double())
    assert_same_state(tether.plain_state_dict(model), removed_copy(model).state_dict())


def test_plain_state_dict_holds_the_value_of_a_non_persistent_original():
    # An original marked non-persistent is not in state_dict; the plain checkpoint holds the
    # parametrized value all the same, as removing the parametrization would leave it.
    model = WithTable()
    tether.register_parametrization(model, "table", Double())
    plist = model.parametrizations.table
    plist.register_buffer("original", plist.original, persistent=False)
    assert "parametrizations.table.original" not in model.state_dict()
    plain = tether.plain_state_dict(model)
    assert torch.equal(plain["table"], model.table)
    assert_same_state(plain, removed_copy(model).state_dict())


# --- plain checkpoints into parametrized modules --------------------------------------------


def test_plain_weight_loads_through_right_inverse():
    layer = linear(True)
    W = symmetric()
    layer.load_state_dict({"weight": W, "bias": torch.zeros(N)})
    assert torch.equal(layer.weight, W)
    assert torch.equal(layer.parametrizations.weight.original, W.triu())


def test_plain_weight_loads_strictly_with_no_missing_or_unexpected_keys():
    layer = linear(True)
    result = layer.load_state_dict({"weight": symmetric(), "bias": torch.zeros(N)}, strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []


def test_plain_weight_load_keeps_the_original_parameter_object():
    layer = linear(True)
    original = layer.parametrizations.weight.original
    layer.load_state_dict({"weight": symmetric(), "bias": torch.zeros(N)})
    assert layer.parametrizations.weight.original is original


def test_plain_weight_loads_into_a_many_to_one_parametrization():
    layer = many_to_one(True)
    W = torch.randn(N, N)
    layer.load_state_dict({"weight": W, "bias": torch.zeros(N)}, strict=True)
    assert torch.equal(layer.weight, W)


def test_plain_weight_updates_the_parametrizations_own_buffer():
    layer = with_buffer(True)
    W = symmetric()
    result = layer.load_state_dict({"weight": W, "bias": torch.zeros(N)}, strict=True)
    assert result.missing_keys == []
    assert torch.equal(layer.parametrizations.weight[0].norm, W.norm())
    eps = torch.finfo(W.dtype).eps
    torch.testing.assert_close(layer.weight, W, rtol=8 * eps, atol=8 * eps * W.abs().max().item())


def test_plain_double_weight_is_converted_to_the_models_dtype():
    layer = linear(True)
    W = symmetric(dtype=torch.float64)
    layer.load_state_dict({"weight": W, "bias": torch.zeros(N)})
    assert layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight, W.float())


def test_plain_weight_loads_with_assign():
    layer = linear(True)
    W = symmetric()
    layer.load_state_dict({"weight": W, "bias": torch.zeros(N)}, assign=True)
    assert torch.equal(layer.weight, W)
    assert isinstance(layer.parametrizations.weight.original, nn.Parameter)


def test_plain_weight_loads_with_assign_into_a_meta_model():
    with torch.device("meta"):
        layer = linear(True)
    W = symmetric()
    layer.load_state_dict({"weight": W, "bias": torch.zeros(N)}, assign=True)
    assert layer.weight.device == W.device
    assert torch.equal(layer.weight, W)


def test_plain_state_dict_loads_back_into_a_parametrized_model(builder):
    source = builder(True).eval()
    target = builder(True).eval()
    result = target.load_state_dict(tether.plain_state_dict(source), strict=True)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    x = torch.randn(3, N)
    expected = source(x)
    eps = torch.finfo(expected.dtype).eps
    torch.testing.assert_close(
        target(x), expected, rtol=16 * eps, atol=16 * eps * expected.abs().max().item()
    )


def test_parametrized_state_dict_still_loads_as_in_torch(builder):
    source = builder(True)
    target = builder(True)
    target.load_state_dict(source.state_dict(), strict=True)
    assert_same_state(target.state_dict(), source.state_dict())


@pytest.mark.parametrize(
    ("make", "key"),
    [(linear, "weight"), (chain, "weight"), (with_buffer, "weight"), (nested, "2.inner.2.weight")],
    ids=["linear", "chain", "with_buffer", "nested"],
)
def test_wrong_shaped_plain_weight_raises_naming_the_key(make, key):
    model = make(True)
    state = tether.plain_state_dict(model)
    state[key] = torch.zeros(N + 1, N)
    with pytest.raises(RuntimeError, match=re.escape(f"'{key}'")):
        model.load_state_dict(state)


class NoInverse(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.triu()


@pytest.mark.parametrize("parametrization", [NoInverse(), torch.triu], ids=["module", "function"])
def test_plain_weight_without_right_inverse_raises_naming_the_key(parametrization):
    layer = tether.register_parametrization(nn.Linear(N, N), "weight", parametrization)
    with pytest.raises(RuntimeError, match=r"'weight'.*right_inverse"):
        layer.load_state_dict({"weight": torch.randn(N, N).triu(), "bias": torch.zeros(N)})


# --- spectral norm: vectors that fit what was loaded (issue 12, case 2) ---------------------

SPECTRAL = (0, 2, 5)  # the normalized layers of spectral_net


def spectral_net(seed: int) -> nn.Module:
    """Two Conv2d and a Linear with spectral norm, for inputs of shape (B, 3, 8, 8)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    for i in SPECTRAL:
        tether.spectral_norm(model[i])
    return model


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_regression_2_plain_checkpoint_into_a_fresh_spectral_norm_model(mode, one_thread):
    x = torch.randn(2, 3, 8, 8)
    source = spectral_net(seed=0)
    with torch.no_grad():  # training-mode reads: the power method converges
        for i in SPECTRAL:
            for _ in range(300):
                _ = source[i].weight
    source.train(mode == "train")
    plain = tether.plain_state_dict(source)
    expected = source(x)  # in training mode too: plain_state_dict saved what this computes
    target = spectral_net(seed=1).train(mode == "train")  # other weights, other vectors
    result = target.load_state_dict(plain, strict=True)
    assert result.missing_keys == result.unexpected_keys == []
    eps = torch.finfo(torch.float32).eps
    for i in SPECTRAL:
        sigma = torch.linalg.matrix_norm(target[i].weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=16 * eps)
    got = target(x)
    torch.testing.assert_close(got, expected, rtol=64 * eps, atol=64 * eps)


def test_plain_state_dict_leaves_a_training_spectral_norm_model_unchanged():
    model = spectral_net(seed=0)  # training mode: each read of a weight is a power step
    before = snapshot(model)
    plain = tether.plain_state_dict(model)
    assert_same_state(snapshot(model)["state"], before["state"])
    for i in SPECTRAL:  # the value saved is what the next read computes
        assert torch.equal(plain[f"{i}.weight"], model[i].weight.detach())
