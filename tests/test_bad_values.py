"""Bad values: NaN and infinities, non-members a constraint cannot project, wrong-shaped
checkpoints. Each raises an error naming the module's class, the tensor and the fix, and
leaves the model exactly as it was: the same Parameter objects, the same values, a cache that
still serves them. The public entry points are then fuzzed with hypothesis."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tether
from tests.parametrizations import Double, Normalized, Symmetric, Tril, UpperPlusLower

N = 3
NAN, INF = math.nan, math.inf


class NonNegativeCorner(nn.Module):
    """Refuses values whose corner entry is negative, as a constraint refuses non-members."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X

    def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
        if X[0, 0] < 0:
            raise ValueError("the corner entry must be non-negative")
        return X


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call must leave as it was: classes, objects and values."""
    return {
        "classes": [type(m) for m in model.modules()],
        "objects": [(n, id(t)) for n, t in (*model.named_parameters(), *model.named_buffers())],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["classes"] == before["classes"]
    assert after["objects"] == before["objects"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert same(after["state"][key], value), key


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and entries, NaN equal to NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return (
        bool(((a == b) | (a.isnan() & b.isnan())).all())
        if a.is_floating_point()
        else bool(torch.equal(a, b))
    )


def names(message: str, *parts: str) -> bool:
    return all(re.search(rf"(?<![A-Za-z_]){re.escape(p)}\b", message) for p in parts)


def bad(value: float, shape: tuple[int, ...] = (N, N), at: int = 4) -> torch.Tensor:
    X = torch.randn(shape)
    X.view(-1)[at % X.numel()] = value
    return X


PARAMETRIZATIONS: dict[str, Callable[[], list[nn.Module]]] = {
    "symmetric": lambda: [Symmetric()],
    "chain": lambda: [Symmetric(), Double()],
    "many_to_one": lambda: [UpperPlusLower()],
    "stateful": lambda: [Normalized()],
}


def parametrized(chain: str) -> nn.Module:
    layer = nn.Linear(N, N)
    for parametrization in PARAMETRIZATIONS[chain]():
        tether.register_parametrization(layer, "weight", parametrization)
    return layer


# --- assignment -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("chain", list(PARAMETRIZATIONS))
def test_assigning_a_non_finite_value_raises_and_changes_nothing(chain, value):
    layer = parametrized(chain)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"finite") as info:
        layer.weight = bad(value)
    assert names(str(info.value), "Linear.weight"), str(info.value)
    assert_unchanged(layer, before)


@pytest.mark.parametrize(
    "constrain",
    [tether.orthogonal, tether.positive_definite, tether.hurwitz, tether.positive, tether.sphere],
    ids=["orthogonal", "positive_definite", "hurwitz", "positive", "sphere"],
)
def test_constraints_refuse_non_finite_values_before_their_right_inverse_runs(constrain):
    # Without the check, hurwitz's eigenvalue solver crashes the process on NaN, positive maps
    # NaN to its floor silently, and orthogonal stores NaN.
    layer = nn.Linear(N, N)
    with torch.no_grad():
        layer.weight.copy_(tether.constraints.Hurwitz().sample((N, N)))
    constrain(layer)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"1 NaN among its 9 entries\. Assign finite values"):
        layer.weight = bad(NAN)
    assert_unchanged(layer, before)


def test_a_failed_assignment_leaves_the_cache_serving_the_old_value():
    layer = parametrized("chain")
    with tether.cached():
        first = layer.weight
        with pytest.raises(ValueError):
            layer.weight = bad(NAN)
        assert layer.weight is first
    assert torch.equal(layer.weight, first)


def test_a_failed_chain_puts_back_the_state_its_right_inverses_wrote():
    # Assignment runs Normalized.right_inverse (which writes its norm) before the refusal.
    layer = nn.Linear(N, N)
    with torch.no_grad():
        layer.weight[0, 0] = 1.0
    tether.register_parametrization(layer, "weight", NonNegativeCorner())
    tether.register_parametrization(layer, "weight", Normalized())
    before = snapshot(layer)
    value = torch.randn(N, N)
    value[0, 0] = -1.0
    with pytest.raises(ValueError, match="corner entry") as info:
        layer.weight = value
    assert names(str(info.value), "Linear.weight"), str(info.value)
    assert_unchanged(layer, before)


def test_finite_values_are_stored_as_torch_stores_them():
    value = torch.randn(N, N)
    layers = [nn.Linear(N, N) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    torch.nn.utils.parametrize.register_parametrization(layers[0], "weight", Symmetric())
    tether.register_parametrization(layers[1], "weight", Symmetric())
    for layer in layers:
        layer.weight = value
    assert torch.equal(layers[0].weight, layers[1].weight)
    original = layers[1].parametrizations.weight.original
    assert torch.equal(layers[0].parametrizations.weight.original, original)


# --- registration ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_registering_on_a_non_finite_tensor_raises_and_changes_nothing(value):
    layer = nn.Linear(N, N)
    with torch.no_grad():
        layer.weight[1, 1] = value
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"reset_parameters") as info:
        tether.register_parametrization(layer, "weight", Symmetric())
    assert names(str(info.value), "Linear.weight"), str(info.value)
    assert_unchanged(layer, before)


def test_registering_without_right_inverse_on_a_non_finite_tensor_works_as_in_torch():
    # Nothing reaches a right inverse: the original is kept as it is, as torch keeps it.
    layers = [nn.Linear(N, N) for _ in range(2)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.fill_(1.0)
            layer.weight[0, 2] = NAN
    torch.nn.utils.parametrize.register_parametrization(layers[0], "weight", Tril())
    tether.register_parametrization(layers[1], "weight", Tril())
    assert torch.equal(layers[1].weight, torch.ones(N, N).tril())
    assert torch.equal(layers[0].weight, layers[1].weight)


def test_registration_on_the_meta_device_is_not_checked():
    layer = nn.Linear(N, N, device="meta")
    tether.register_parametrization(layer, "weight", Symmetric())
    assert layer.weight.is_meta


# --- non-members ----------------------------------------------------------------------------

NON_MEMBERS = {
    "invertible_singular": (tether.invertible, lambda: torch.zeros(N, N), r"singular"),
    "special_linear_singular": (tether.special_linear, lambda: torch.ones(N, N), r"singular"),
    "sphere_zero": (tether.sphere, lambda: torch.zeros(N, N), r"norm 0"),
}


@pytest.mark.parametrize("case", list(NON_MEMBERS))
def test_a_non_member_a_constraint_cannot_project_raises_naming_the_tensor(case):
    constrain, value, reason = NON_MEMBERS[case]
    layer = nn.Linear(N, N)
    with torch.no_grad():
        layer.weight.copy_(-torch.eye(N) + 0.1 * torch.randn(N, N))
    constrain(layer)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=reason) as info:
        layer.weight = value()
    message = str(info.value)
    assert names(message, "Linear.weight"), message
    assert re.search(r"Assign|Give it|e\.g\.", message), message  # says what to do
    assert_unchanged(layer, before)


# --- loading --------------------------------------------------------------------------------


def model_with(chain: str = "chain") -> nn.Sequential:
    return nn.Sequential(nn.Linear(N, N), parametrized(chain))


def plain_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() + 1 for k, v in tether.plain_state_dict(model).items()}


def own_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() + 1 for k, v in model.state_dict().items()}


def assert_load_fails(model: nn.Module, checkpoint: dict, *expected: str) -> str:
    """Load into ``model``: it must raise, name ``expected``, and leave the module at index 1
    (the parametrized one) unchanged."""
    before = snapshot(model[1])
    with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict") as info:
        model.load_state_dict(checkpoint)
    message = str(info.value)
    assert names(message, *expected), message
    assert_unchanged(model[1], before)
    return message


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("chain", list(PARAMETRIZATIONS))
def test_loading_a_non_finite_plain_checkpoint_raises_and_changes_nothing(chain, value):
    model = model_with(chain)
    checkpoint = plain_checkpoint(model)
    checkpoint["1.weight"] = bad(value)
    assert_load_fails(model, checkpoint, "1.weight", "Linear.weight")


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_loading_non_finite_originals_raises_and_changes_nothing(value):
    model = model_with("chain")
    checkpoint = own_checkpoint(model)
    checkpoint["1.parametrizations.weight.original"] = bad(value)
    message = assert_load_fails(model, checkpoint, "Linear.weight")
    assert "'1.parametrizations.weight.original'" in message
    assert "finite" in message


@pytest.mark.parametrize(
    ("layout", "key"),
    [
        ("own", "1.parametrizations.weight.original"),
        ("own", "1.bias"),
        ("plain", "1.weight"),
        ("plain", "1.bias"),
    ],
    ids=["original", "bias-with-originals", "plain-weight", "bias-with-plain-weight"],
)
def test_loading_a_wrong_shaped_checkpoint_raises_and_changes_nothing(layout, key):
    model = model_with("chain")
    checkpoint = own_checkpoint(model) if layout == "own" else plain_checkpoint(model)
    checkpoint[key] = torch.randn(N + 1, *checkpoint[key].shape[1:])
    message = assert_load_fails(model, checkpoint, key.split(".")[-1])
    assert f"'{key}'" in message or f"{key!r}" in message
    assert re.search(r"expected shape: \(3,( 3)?\)", message), message


def test_loading_a_non_member_raises_and_changes_nothing():
    # A singular matrix: invertible() can project most non-members, not this one.
    model = nn.Sequential(nn.Linear(N, N), tether.invertible(nn.Linear(N, N)))
    checkpoint = plain_checkpoint(model)
    checkpoint["1.weight"] = torch.zeros(N, N)
    assert_load_fails(model, checkpoint, "1.weight", "Linear.weight")


def test_a_module_loads_all_or_nothing_across_its_tensors():
    # weight and bias both load through right_inverse; the bias is bad, so neither loads.
    layer = parametrized("chain")
    tether.register_parametrization(layer, "bias", Double())
    model = nn.Sequential(layer)
    checkpoint = plain_checkpoint(model)
    checkpoint["0.bias"][0] = NAN
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match=r"'0\.bias'.*Linear\.bias"):
        model.load_state_dict(checkpoint)
    assert_unchanged(layer, before)


def test_a_failed_load_puts_back_the_state_right_inverses_wrote():
    layer = tether.register_parametrization(nn.Linear(N, N), "weight", Normalized())
    model = nn.Sequential(layer)
    checkpoint = plain_checkpoint(model)
    checkpoint["0.bias"] = torch.zeros(N + 1)
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match=r"Linear\.bias"):
        model.load_state_dict(checkpoint)
    assert_unchanged(layer, before)


def test_a_failed_load_with_assign_keeps_the_parameter_objects():
    model = model_with("chain")
    checkpoint = own_checkpoint(model)
    checkpoint["1.parametrizations.weight.original"][0, 0] = NAN
    before = snapshot(model[1])
    with pytest.raises(RuntimeError, match="finite"):
        model.load_state_dict(checkpoint, assign=True)
    assert_unchanged(model[1], before)


def test_a_good_checkpoint_still_loads_in_both_layouts():
    for make in (own_checkpoint, plain_checkpoint):
        model, source = model_with("chain"), model_with("chain")
        model.load_state_dict(make(source))
        for key, value in make(source).items():
            assert torch.allclose(tether.plain_state_dict(model).get(key, value), value), key


def test_a_failed_load_leaves_the_cache_serving_the_old_value():
    model = model_with("chain")
    checkpoint = plain_checkpoint(model)
    checkpoint["1.weight"][0, 0] = NAN
    with tether.cached():
        first = model[1].weight.clone()
        with pytest.raises(RuntimeError):
            model.load_state_dict(checkpoint)
        assert torch.equal(model[1].weight, first)


def test_appending_names_the_tensor_when_forward_fails():
    layer = tether.register_parametrization(nn.Linear(N, N), "bias", Double())
    before = snapshot(layer)
    with pytest.raises(RuntimeError) as info:
        tether.register_parametrization(layer, "bias", Symmetric())  # triu of a vector
    assert_unchanged(layer, before)
    assert names(str(info.value), "Linear.bias"), str(info.value)


# --- fuzzing --------------------------------------------------------------------------------

ALLOWED = (TypeError, ValueError, RuntimeError)


class Boom(Exception):
    """A parametrization's own error: tether must let it through untouched."""


class Raises(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        raise Boom


class ReturnsTuple(nn.Module):
    def forward(self, X: torch.Tensor) -> Any:
        return (X,)


class InverseReturnsNone(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X

    def right_inverse(self, X: torch.Tensor) -> Any:
        return None


PARAMETRIZATION_KINDS: dict[str, Callable[[], Any]] = {
    "symmetric": Symmetric,
    "scale": Double,
    "many_to_one": UpperPlusLower,
    "stateful": Normalized,
    "function": lambda: torch.tanh,
    "lambda_changing_shape": lambda: lambda X: X[..., :1],
    "raises": Raises,
    "returns_tuple": ReturnsTuple,
    "inverse_returns_none": InverseReturnsNone,
    "not_callable": lambda: 3,
    "none": lambda: None,
}

# unsafe=True skips the checks: a parametrization that breaks the chain then fails in the
# user's own code at the next read, as in torch. Only sound ones are registered that way.
WELL_BEHAVED = ["scale", "function", "lambda_changing_shape"]

TENSOR_NAMES = [
    "weight",
    "bias",
    "running_mean",
    "wieght",
    "",
    "parametrizations",
    "in_features",
    "weight.original",
    "forward",
]
SPECIAL = st.sampled_from([0.0, 1.0, -1.0, NAN, INF, -INF, 1e30])


def make_module(kind: str, dtype: torch.dtype, bias: bool) -> nn.Module:
    if kind == "linear":
        return nn.Linear(N, N, bias=bias, dtype=dtype)
    if kind == "wide":
        return nn.Linear(N + 1, N, bias=bias, dtype=dtype)
    if kind == "conv":
        return nn.Conv1d(N, N, 2, bias=bias, dtype=dtype)
    return nn.BatchNorm1d(N, dtype=dtype)


def label_of(module: nn.Module, name: object) -> str:
    return f"{tether.type_before_parametrizations(module).__name__}.{name}"


def check_failure(error: BaseException, module: nn.Module, name: object, before: dict) -> None:
    """A failure must be a documented type naming the tensor, or the parametrization's own."""
    if not isinstance(error, Boom):
        assert type(error) in ALLOWED, repr(error)
        message = str(error)
        as_str = not isinstance(name, str) and "as a str" in message  # register(module, 0, f)
        assert label_of(module, name) in message or as_str, message
    assert_unchanged(module, before)


def value_like(data: st.DataObject, tensor: torch.Tensor) -> torch.Tensor:
    shape = data.draw(st.sampled_from([tuple(tensor.shape), (N, N + 2), (N,), ()]), "shape")
    value = torch.randn(shape, dtype=tensor.dtype) if tensor.is_floating_point() else tensor
    if value.numel() and data.draw(st.booleans(), "special"):
        value = value.clone()
        value.view(-1)[data.draw(st.integers(0, value.numel() - 1))] = data.draw(SPECIAL)
    return value


@settings(max_examples=60)
@given(
    data=st.data(),
    kind=st.sampled_from(["linear", "wide", "conv", "batchnorm"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    bias=st.booleans(),
)
def test_fuzz_public_entry_points(data, kind, dtype, bias):
    """Random calls, good and bad, on a random module: each call either works, or raises one
    of tether's documented errors naming the tensor and leaves the module unchanged."""
    module = make_module(kind, dtype, bias)
    for _ in range(data.draw(st.integers(1, 6), "calls")):
        name = data.draw(st.sampled_from([*TENSOR_NAMES, 0]), "name")
        action = data.draw(
            st.sampled_from(["register", "assign", "remove", "load", "cached", "plain"]), "action"
        )
        before = snapshot(module)
        try:
            if action == "register":
                unsafe = data.draw(st.booleans(), "unsafe")
                kinds = WELL_BEHAVED if unsafe else list(PARAMETRIZATION_KINDS)
                kind = data.draw(st.sampled_from(kinds), "parametrization")
                parametrization = PARAMETRIZATION_KINDS[kind]()
                tether.register_parametrization(module, name, parametrization, unsafe=unsafe)
                assert tether.is_parametrized(module, name)
            elif action == "assign" and tether.is_parametrized(module, name):
                value = value_like(data, getattr(module, name))
                setattr(module, name, value)
                if not module.parametrizations[name].unsafe:
                    # The stored value is what the chain makes of the value assigned.
                    chain = module.parametrizations[name]
                    with torch.no_grad():
                        assert getattr(module, name).shape == value.shape
                        assert torch.equal(getattr(module, name), chain())
            elif action == "remove":
                leave = data.draw(st.booleans(), "leave_parametrized")
                tether.remove_parametrizations(module, name, leave_parametrized=leave)
                assert not tether.is_parametrized(module, name)
            elif action == "load":
                fuzz_load(data, module)
            elif action == "cached" and tether.is_parametrized(module):
                for tensor_name in list(module.parametrizations):
                    with tether.cached():
                        inside = getattr(module, tensor_name)
                        assert getattr(module, tensor_name) is inside
                    assert same(getattr(module, tensor_name), inside)
            elif action == "plain":
                plain = tether.plain_state_dict(module)
                for tensor_name in getattr(module, "parametrizations", {}):
                    value = getattr(module, tensor_name)
                    assert same(plain[tensor_name], value)
        except (Boom, *ALLOWED) as error:
            if action == "load":
                assert isinstance(error, RuntimeError), repr(error)
                assert_unchanged(module, before)
            else:
                check_failure(error, module, name, before)


def fuzz_load(data: st.DataObject, module: nn.Module) -> None:
    """Load a checkpoint of the module, plain or not, with one entry spoiled or not."""
    checkpoint = dict(
        tether.plain_state_dict(module)
        if data.draw(st.booleans(), "plain")
        else module.state_dict()
    )
    checkpoint = {k: v.clone() for k, v in checkpoint.items()}
    spoil = data.draw(st.sampled_from(["none", "shape", "value", "drop", "extra"]), "spoil")
    keys = [k for k, v in checkpoint.items() if v.is_floating_point() and v.numel()]
    if spoil != "none" and keys:
        key = data.draw(st.sampled_from(keys), "key")
        if spoil == "shape":
            checkpoint[key] = torch.zeros(N + 2, dtype=checkpoint[key].dtype)
        elif spoil == "value":
            checkpoint[key].view(-1)[0] = data.draw(SPECIAL)
        elif spoil == "drop":
            del checkpoint[key]
        else:
            checkpoint["extra"] = torch.zeros(1)
    strict = data.draw(st.booleans(), "strict")
    expected = {k: v.clone() for k, v in tether.plain_state_dict(module).items()}
    module.load_state_dict(checkpoint, strict=strict)
    after = tether.plain_state_dict(module)
    assert list(after) == list(expected)
    for key, value in after.items():
        assert value.shape == expected[key].shape, key  # loading never resizes
        if spoil == "none" and value.is_floating_point():  # the module's own values come back
            torch.testing.assert_close(value, expected[key], equal_nan=True)
