"""The private names of PyTorch that tether uses (``tether._torch_compat``): each is still in
this torch, each lookup finds torch's own function, and each fallback does what its comment
says."""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest
import torch
import torch.nn.utils.parametrize as torch_parametrize
from torch import nn
from torch.func import functional_call

import tether
from tests.parametrizations import Symmetric
from tether import _autocache, _cache, _checks, _serving, _torch_compat
from tether.functional import _precision
from tether.prune import _checkpoint

# The objects that carry the private attributes of _torch_compat.ATTRIBUTES.
EXAMPLES: dict[str, Callable[[], object]] = {
    "torch.nn.Module": lambda: nn.Linear(2, 2),
    "torch.nn.Module.state_dict()": lambda: nn.Linear(2, 2).state_dict(),
    "torch.Tensor": lambda: torch.zeros(1),
}


@pytest.mark.parametrize(
    "path",
    [
        *_torch_compat.NAMES,
        *(f"{owner}.{name}" for owner, name in _torch_compat.ATTRIBUTES),
    ],
)
def test_torch_still_has_each_private_name_tether_uses(path):
    owner, _, name = path.rpartition(".")
    found = hasattr(EXAMPLES[owner](), name) if owner in EXAMPLES else _torch_compat.exists(path)
    assert found, (
        f"this torch has no {path}: tether now runs its fallback (see the comment on it in "
        "tether/_torch_compat.py). Follow the rename there."
    )


@pytest.mark.parametrize(
    ("ours", "path"),
    [
        ("saved_tensors_hooks", "torch._C._autograd._top_saved_tensors_default_hooks"),
        ("graph_task_id", "torch._C._current_graph_task_id"),
        ("autograd_node", "torch._C._current_autograd_node"),
        ("any_autocast_enabled", "torch._C._is_any_autocast_enabled"),
        ("is_functorch_wrapped_tensor", "torch._C._functorch.is_functorch_wrapped_tensor"),
        (
            "is_traceable_wrapper_subclass",
            "torch.utils._python_dispatch.is_traceable_wrapper_subclass",
        ),
        ("weight_norm", "torch._weight_norm"),
        ("torch_parametrize", "torch.nn.utils.parametrize"),
    ],
)
def test_each_lookup_finds_torchs_own(ours, path):
    assert getattr(_torch_compat, ours) is _torch_compat.resolve(path)


def test_functional_calls_swapping_functions_are_recognised():
    assert _torch_compat.swap_tensors_dict_code is not None
    assert _torch_compat.reparametrize_module_code is not None
    assert _torch_compat.has_autograd_state
    assert _cache.keyable


@pytest.mark.parametrize(
    "path",
    [
        "torch._C._no_such_function",
        "torch._C._no_such_module._function",
        "torch.nn.utils._no_such_module.function",
        "torch.nn.utils.parametrize._no_such_name",
    ],
)
def test_a_missing_name_is_found_absent_without_error(path, monkeypatch):
    recorded: list[str] = []
    monkeypatch.setattr(_torch_compat, "NAMES", recorded)
    assert not _torch_compat.exists(path)
    assert _torch_compat._find(path) is None
    assert _torch_compat._function(path, _torch_compat._absent) is _torch_compat._absent
    assert recorded == [path, path]


@pytest.mark.parametrize("missing", ["_cache_enabled", "_cache"])
def test_a_torch_without_the_names_of_cached_gets_a_stand_in(missing):
    names = {"_cache_enabled": 0, "_cache": {}}
    del names[missing]
    stand_in = _torch_compat._WithoutTorchCache
    assert _torch_compat._torch_flags(types.SimpleNamespace(**names)) is stand_in
    assert _torch_compat._torch_flags(torch_parametrize) is torch_parametrize


def test_without_any_autocast_enabled_the_per_device_query_answers(monkeypatch):
    monkeypatch.setattr(_precision, "any_autocast_enabled", _torch_compat._maybe_autocast)
    assert not _precision.autocast_enabled(torch.ones(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _precision.autocast_enabled(torch.ones(1))
        assert not _precision.autocast_enabled("meta")


def test_without_any_autocast_enabled_the_cache_still_keys_on_autocast(monkeypatch):
    monkeypatch.setattr(_cache, "_any_autocast", _torch_compat._maybe_autocast)
    layer = tether.register_parametrization(nn.Linear(3, 3), "weight", Symmetric())
    with tether.cached():
        plain = layer.weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = layer.weight
        assert layer.weight is plain
        values = _cache._state.values
        assert values is not None
        assert len(values[layer.parametrizations.weight]) == 2  # one value per context
    assert autocast is not plain


def test_without_the_functorch_check_values_are_not_read(monkeypatch):
    assert _checks._readable(torch.ones(2))
    monkeypatch.setattr(_torch_compat, "is_functorch_wrapped_tensor", _torch_compat._maybe_wrapped)
    assert not _checks._readable(torch.ones(2))


class _Flattenable(torch.Tensor):
    """Has the methods of torch's traceable wrapper protocol (never called here)."""

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return [], None

    @staticmethod
    def __tensor_unflatten__(*args: object) -> None:
        return None


class _Plain(torch.Tensor):
    """A tensor subclass without the protocol."""


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.zeros(2), id="tensor"),
        pytest.param(lambda: nn.Parameter(torch.zeros(2)), id="parameter"),
        pytest.param(lambda: torch.zeros(2).as_subclass(_Plain), id="plain-subclass"),
        pytest.param(lambda: torch.zeros(2).as_subclass(_Flattenable), id="wrapper-subclass"),
        pytest.param(lambda: [1.0], id="not-a-tensor"),
    ],
)
def test_the_wrapper_subclass_fallback_agrees_with_torch(make):
    value = make()
    expected = _torch_compat.is_traceable_wrapper_subclass(value)
    assert _torch_compat._has_flatten_protocol(value) is expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_the_weight_norm_fallback_matches_torch(dim, dtype):
    v = torch.randn(4, 3, dtype=dtype)
    g = torch.norm_except_dim(v, 2, dim) * 2
    expected = _torch_compat.weight_norm(v, g, dim)
    got = _torch_compat._weight_norm_composite(v, g, dim)
    assert torch.allclose(got, expected, rtol=8 * torch.finfo(dtype).eps, atol=0)


def test_without_the_swapping_functions_functional_call_assigns_through_right_inverse(
    monkeypatch,
):
    monkeypatch.setattr(_serving, "_REPARAMETRIZE", None)
    layer = tether.register_parametrization(nn.Linear(3, 3), "weight", Symmetric())
    x, W = torch.randn(2, 3), torch.randn(3, 3)
    symmetric = W.triu() + W.triu(1).mT
    out = functional_call(layer, {"weight": W}, (x,))
    tolerance = 8 * torch.finfo(x.dtype).eps
    assert torch.allclose(out, x @ symmetric.mT + layer.bias, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    ("hooks", "attribute"),
    [
        (_torch_compat.forward_pre_hooks, "_forward_pre_hooks"),
        (_torch_compat.forward_hooks, "_forward_hooks"),
        (_torch_compat.forward_hooks_always_called, "_forward_hooks_always_called"),
        (_torch_compat.load_state_dict_pre_hooks, "_load_state_dict_pre_hooks"),
    ],
)
def test_a_hook_dict_is_torchs_or_a_new_empty_one(hooks, attribute):
    module = nn.Linear(2, 2)
    assert hooks(module) is getattr(module, attribute)
    object.__delattr__(module, attribute)
    assert hooks(module) == {}
    assert hooks(module) is not hooks(module)


def test_the_registered_hook_is_found_in_its_entry():
    module = tether.prune.l1_unstructured(nn.Linear(3, 3), "weight", amount=0.5)
    entries = _torch_compat.load_state_dict_pre_hooks(module).values()
    assert _checkpoint.load_torch_keys in [_torch_compat.hook_function(e) for e in entries]
    assert _torch_compat.hook_function(object()) is None


def test_autocache_finds_and_removes_its_hooks():
    model = tether.autocache(nn.Linear(2, 2))
    assert _autocache._has_hooks(model)
    tether.autocache(model, enabled=False)
    assert not _autocache._has_hooks(model)
    assert not model._forward_hooks
    assert not model._forward_hooks_always_called
