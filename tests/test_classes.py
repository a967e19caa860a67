"""Tests for the shared ``Parametrized<Base>`` classes: one class per (base, names), no class
or memory growth in register/remove loops, pickling (and deepcopy, as torch's), ensembling,
interop with ``torch.nn.utils.parametrize``, assignment and deletion, and ``torch.compile``."""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.utils.parametrize as torch_parametrize
from torch import nn
from torch.nn.utils import parametrizations as torch_parametrizations

import tether
from tests.copies import ROUNDTRIPS, pickle_roundtrip
from tests.parametrizations import Double, Halves, Scale, Symmetric
from tests.twins import assert_same, snapshot, twin

N = 4
LOOPS = 10_000


class Identity(nn.Module):
    """Cheapest possible parametrization, for the register/remove loops."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X


class MyLinear(nn.Linear):
    """A subclass of Linear: its parametrized class must not be ParametrizedLinear's."""


class OnlyForTheReleaseTest(nn.Linear):
    """Used by one test only, so no other module keeps its parametrized class alive."""


def parametrized(names: tuple[str, ...], base: type[nn.Linear] = nn.Linear) -> nn.Linear:
    layer = base(N, N)
    for name in names:
        tether.register_parametrization(layer, name, Symmetric() if name == "weight" else Double())
    return layer


def is_symmetric(W: torch.Tensor) -> bool:
    return torch.equal(W, W.mT)


def make_model() -> nn.Sequential:
    """Parametrized submodules, one of them with a chain and two parametrized tensors."""
    model = nn.Sequential(nn.Linear(N, N), nn.Tanh(), nn.Linear(N, N))
    tether.register_parametrization(model[0], "weight", Symmetric())
    tether.register_parametrization(model[2], "weight", Symmetric())
    tether.register_parametrization(model[2], "weight", Double())
    tether.register_parametrization(model[2], "bias", Double())
    return model


# --- one class per (base class, parametrized names) -----------------------------------------


def test_two_parametrized_linears_have_the_same_class():
    assert type(parametrized(("weight",))) is type(parametrized(("weight",)))


def test_parametrized_class_is_still_a_subclass_of_the_base():
    layer = parametrized(("weight",))
    assert isinstance(layer, nn.Linear)
    assert type(layer) is not nn.Linear


def test_registration_order_does_not_change_the_class():
    assert type(parametrized(("weight", "bias"))) is type(parametrized(("bias", "weight")))


@pytest.mark.parametrize(
    ("names_a", "names_b"),
    [(("weight",), ("bias",)), (("weight",), ("weight", "bias")), (("bias",), ("weight", "bias"))],
)
def test_different_names_give_different_classes(names_a, names_b):
    assert type(parametrized(names_a)) is not type(parametrized(names_b))


def test_different_base_classes_give_different_classes():
    plain = parametrized(("weight",))
    sub = parametrized(("weight",), base=MyLinear)
    assert type(sub) is not type(plain)
    assert tether.type_before_parametrizations(sub) is MyLinear


def test_appending_to_a_chain_keeps_the_class():
    layer = parametrized(("weight",))
    cls = type(layer)
    tether.register_parametrization(layer, "weight", Double())
    assert type(layer) is cls


def test_removing_one_of_two_names_gives_the_class_of_the_remaining_name():
    layer = parametrized(("weight", "bias"))
    tether.remove_parametrizations(layer, "bias")
    assert type(layer) is type(parametrized(("weight",)))


def test_removing_every_parametrization_restores_the_base_class():
    layer = parametrized(("weight", "bias"))
    tether.remove_parametrizations(layer, "bias")
    tether.remove_parametrizations(layer, "weight")
    assert type(layer) is nn.Linear


# --- register/remove loops ------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_stats() -> dict[str, int]:
    """Register and remove on one layer LOOPS times while a sibling keeps the class alive."""
    sibling = parametrized(("weight",))
    layer = nn.Linear(N, N)
    for _ in range(10):  # warm up lazily created state before counting objects
        tether.register_parametrization(layer, "weight", Identity())
        tether.remove_parametrizations(layer, "weight")
    gc.collect()
    objects_before = len(gc.get_objects())
    classes: set[int] = set()
    lists: weakref.WeakSet[nn.Module] = weakref.WeakSet()
    for _ in range(LOOPS):
        tether.register_parametrization(layer, "weight", Identity())
        classes.add(id(type(layer)))
        lists.add(layer.parametrizations.weight)
        tether.remove_parametrizations(layer, "weight")
    gc.collect()
    stats = {
        "classes": len(classes),
        "same_as_sibling": int(classes == {id(type(sibling))}),
        "object_growth": len(gc.get_objects()) - objects_before,
        "live_lists": len(lists),
        "layer_is_plain": int(type(layer) is nn.Linear),
    }
    del sibling
    return stats


def test_register_remove_loop_creates_no_new_classes(loop_stats):
    assert loop_stats["classes"] == 1
    assert loop_stats["same_as_sibling"] == 1


def test_register_remove_loop_leaks_no_objects(loop_stats):
    assert loop_stats["live_lists"] == 0
    assert loop_stats["object_growth"] < 200  # bounded, far below one object per iteration


def test_register_remove_loop_ends_with_the_base_class(loop_stats):
    assert loop_stats["layer_is_plain"] == 1


def test_class_is_released_when_no_module_uses_it():
    layer = parametrized(("weight",), base=OnlyForTheReleaseTest)
    cls_ref = weakref.ref(type(layer))
    tether.remove_parametrizations(layer, "weight")
    gc.collect()
    assert cls_ref() is None


# --- pickle, deepcopy, torch.save -----------------------------------------------------------


@pytest.fixture(params=list(ROUNDTRIPS))
def roundtrip(request: pytest.FixtureRequest) -> Callable[[nn.Module], nn.Module]:
    return ROUNDTRIPS[request.param]


def test_copy_keeps_the_parametrizations(roundtrip):
    model = make_model()
    clone = roundtrip(model)
    assert tether.is_parametrized(clone[0], "weight")
    assert tether.is_parametrized(clone[2], "weight")
    assert tether.is_parametrized(clone[2], "bias")
    assert [type(p) for p in clone[2].parametrizations.weight] == [Symmetric, Double]


def test_copy_has_the_shared_classes(roundtrip):
    model = make_model()
    clone = roundtrip(model)
    assert type(clone[0]) is type(model[0])
    assert type(clone[2]) is type(model[2])


def test_copy_has_the_same_values(roundtrip):
    model = make_model()
    clone = roundtrip(model)
    x = torch.randn(3, N)
    assert torch.equal(clone[0].weight, model[0].weight)
    assert torch.equal(clone[2].weight, model[2].weight)
    assert torch.equal(clone[2].bias, model[2].bias)
    assert torch.equal(clone(x), model(x))


def test_copy_is_independent_of_the_source(roundtrip):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone = roundtrip(model)
    with torch.no_grad():
        clone[0].parametrizations.weight.original.add_(1.0)
        clone[2].parametrizations.bias.original.add_(1.0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert (
        clone[0].parametrizations.weight.original is not model[0].parametrizations.weight.original
    )


def test_copy_trains_and_keeps_its_constraint(roundtrip):
    clone = roundtrip(make_model())
    before = clone[2].weight.detach().clone()
    optimizer = torch.optim.SGD(clone.parameters(), lr=0.1)
    clone(torch.randn(3, N)).square().sum().backward()
    optimizer.step()
    after = clone[2].weight.detach()
    assert not torch.equal(after, before)
    assert is_symmetric(after)
    assert is_symmetric(clone[0].weight.detach())


def test_deepcopy_matches_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Symmetric())
        parametrize.register_parametrization(layer, "bias", Halves())
        clone = copy.deepcopy(layer)
        return snapshot(clone, parametrize, torch.randn(2, 4))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


def test_deepcopy_of_parametrized_lstm_matches_torch():
    def scenario(parametrize):
        lstm = nn.LSTM(3, 3)
        parametrize.register_parametrization(lstm, "weight_hh_l0", Scale(2.0))
        clone = copy.deepcopy(lstm)
        return snapshot(clone, parametrize), clone(torch.randn(2, 1, 3))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


# --- torch.func.stack_module_state ----------------------------------------------------------


def test_stack_module_state_ensembles_parametrized_modules():
    models = [parametrized(("weight",)) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(5, N)

    def call(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(base, (p, b), (x,))

    got = torch.vmap(call)(params, buffers)
    expected = torch.stack([m(x) for m in models])
    eps = torch.finfo(expected.dtype).eps
    torch.testing.assert_close(got, expected, rtol=16 * eps, atol=16 * eps)


def test_torch_parametrize_modules_cannot_be_stacked():
    models = [
        torch_parametrize.register_parametrization(nn.Linear(N, N), "weight", Symmetric())
        for _ in range(2)
    ]
    with pytest.raises(RuntimeError, match="same class"):
        torch.func.stack_module_state(models)


# --- interop with torch.nn.utils.parametrize ------------------------------------------------


def tether_on_bias() -> nn.Linear:
    return tether.register_parametrization(nn.Linear(N, N), "bias", Double())


def assert_orthogonal(W: torch.Tensor) -> None:
    eps = torch.finfo(W.dtype).eps
    eye = torch.eye(W.shape[0], dtype=W.dtype)
    torch.testing.assert_close(W @ W.mT, eye, rtol=0.0, atol=64 * eps)


def test_torch_orthogonal_on_a_tether_module_makes_the_weight_orthogonal():
    layer = tether_on_bias()
    torch_parametrizations.orthogonal(layer, "weight")
    assert_orthogonal(layer.weight.detach())


def test_torch_orthogonal_on_a_tether_module_keeps_the_tether_parametrization():
    layer = tether_on_bias()
    bias = layer.bias.detach().clone()
    torch_parametrizations.orthogonal(layer, "weight")
    assert tether.is_parametrized(layer, "bias")
    assert torch.equal(layer.bias, bias)


def test_torch_orthogonal_does_not_affect_a_sibling_of_the_same_class():
    layer, sibling = tether_on_bias(), tether_on_bias()
    assert type(layer) is type(sibling)
    weight = sibling.weight
    keys = list(sibling.state_dict())
    x = torch.randn(3, N)
    expected = nn.functional.linear(x, weight, sibling.bias)
    torch_parametrizations.orthogonal(layer, "weight")
    assert sibling.weight is weight
    assert not tether.is_parametrized(sibling, "weight")
    assert list(sibling.state_dict()) == keys
    assert torch.equal(sibling(x), expected)


def test_sibling_weight_can_still_be_replaced_after_torch_parametrized_its_class():
    layer, sibling = tether_on_bias(), tether_on_bias()
    torch_parametrizations.orthogonal(layer, "weight")
    replacement = nn.Parameter(torch.randn(N, N))
    sibling.weight = replacement
    assert sibling.weight is replacement
    assert dict(sibling.named_parameters())["weight"] is replacement


def test_torch_remove_parametrizations_on_a_tether_module():
    layer = tether_on_bias()
    torch_parametrizations.orthogonal(layer, "weight")
    value = layer.weight.detach().clone()
    torch_parametrize.remove_parametrizations(layer, "weight")
    assert isinstance(layer._parameters["weight"], nn.Parameter)
    assert torch.equal(layer.weight, value)
    assert not tether.is_parametrized(layer, "weight")
    assert tether.is_parametrized(layer, "bias")
    assert type(layer) is type(tether_on_bias())


def test_torch_remove_of_a_tether_tensor_restores_the_base_class():
    layer = parametrized(("weight",))
    value = layer.weight.detach().clone()
    torch_parametrize.remove_parametrizations(layer, "weight")
    assert type(layer) is nn.Linear
    assert torch.equal(layer.weight, value)


def test_torch_remove_of_one_tether_tensor_gives_the_class_of_the_remaining_names():
    layer = parametrized(("weight", "bias"))
    torch_parametrize.remove_parametrizations(layer, "weight")
    assert type(layer) is type(parametrized(("bias",)))


def test_tether_on_a_torch_parametrized_module_works():
    layer = torch_parametrize.register_parametrization(nn.Linear(N, N), "weight", Symmetric())
    weight = layer.weight.detach().clone()
    bias = layer.bias.detach().clone()
    tether.register_parametrization(layer, "bias", Double())
    assert tether.is_parametrized(layer, "weight")
    assert tether.is_parametrized(layer, "bias")
    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer.bias, bias)
    assert type(layer) is type(parametrized(("weight", "bias")))


def test_tether_on_a_torch_parametrized_module_makes_it_picklable():
    layer = torch_parametrize.register_parametrization(nn.Linear(N, N), "weight", Symmetric())
    tether.register_parametrization(layer, "bias", Double())
    clone = pickle_roundtrip(layer)
    assert tether.is_parametrized(clone, "weight")
    assert torch.equal(clone.weight, layer.weight)
    assert torch.equal(clone.bias, layer.bias)


def test_tether_appending_to_a_torch_chain_makes_it_picklable():
    layer = torch_parametrize.register_parametrization(nn.Linear(N, N), "weight", Symmetric())
    tether.register_parametrization(layer, "weight", Double())
    clone = pickle_roundtrip(layer)
    assert [type(p) for p in clone.parametrizations.weight] == [Symmetric, Double]
    assert torch.equal(clone.weight, layer.weight)


def test_torch_parametrizations_work_on_a_tether_module():
    def scenario(first):
        layer = nn.Linear(4, 4)
        first.register_parametrization(layer, "bias", Scale(2.0))
        torch.nn.utils.parametrizations.orthogonal(layer, "weight")
        torch_parametrize.remove_parametrizations(layer, "weight")
        return snapshot(layer, torch_parametrize, torch.randn(2, 4))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


# --- assignment and deletion ----------------------------------------------------------------


def test_assigning_a_parameter_raises_and_changes_nothing():
    # Note [Assigning a Parameter to a parametrized name]: a copy through right_inverse
    # would silently untie what the caller meant to tie.
    layer = parametrized(("weight",))
    original = layer.parametrizations.weight.original
    before = layer.weight.detach().clone()
    names = [name for name, _ in layer.named_parameters()]
    with pytest.raises(KeyError, match="remove_parametrizations"):
        layer.weight = nn.Parameter(torch.eye(N))
    assert layer.parametrizations.weight.original is original
    assert torch.equal(layer.weight, before)
    assert [name for name, _ in layer.named_parameters()] == names


def test_deleting_a_parametrized_weight_raises_and_keeps_it():
    layer = parametrized(("weight",))
    with pytest.raises(AttributeError, match="remove_parametrizations"):
        del layer.weight
    assert tether.is_parametrized(layer, "weight")
    assert is_symmetric(layer.weight.detach())


# --- torch.compile --------------------------------------------------------------------------


def test_compile_fullgraph_gives_the_eager_outputs():
    torch._dynamo.reset()
    model = make_model()
    x = torch.randn(3, N)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=0.0, atol=0.0)


def test_dynamo_finds_no_graph_breaks():
    torch._dynamo.reset()
    model = make_model()
    explanation = torch._dynamo.explain(model)(torch.randn(3, N))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
