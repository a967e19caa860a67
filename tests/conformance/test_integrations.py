"""Integrations: built on the meta device then ``to_empty`` + ``reset_parameters()``,
``torch.func.functional_call`` (with the originals, or with a plain weight used as given), and
on a representative subset of rows ``torch.export.export`` and
``torch.compile(fullgraph=True)`` with the eager values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import tether
from tests.conformance import table
from tests.conformance.support import (
    assert_close,
    assert_member,
    assert_same_grads,
    assert_same_state,
    build,
    build_plain,
    inputs,
    layer_of,
    loss,
    rounding,
    source,
    state,
)
from tests.conformance.table import META_INIT, Case, Row, cases, refusals

pytestmark = pytest.mark.usefixtures("one_thread")


def representative(row: Row) -> bool:
    return row.representative


def initialise(model: nn.Module) -> None:
    """The usual deferred-initialisation loop."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def built_on_meta_and_initialised(case: Case) -> nn.Module:
    with torch.device("meta"):
        model = build(case)
    model.to_empty(device=table.DEVICE or "cpu")  # the device of --device
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(float("nan"))  # what uninitialised memory may hold
    initialise(model)
    return model


@pytest.mark.parametrize("case", cases(first_shape=True, supporting=(META_INIT,)))
def test_built_on_meta_then_initialised_is_on_the_set(case: Case):
    model = built_on_meta_and_initialised(case).eval()
    for key, tensor in model.state_dict().items():
        assert bool(tensor.isfinite().all()), key
    assert_member(layer_of(model), case)
    assert bool(model(inputs(case)).isfinite().all())


@pytest.mark.parametrize("case", refusals(META_INIT))
def test_meta_initialisation_the_helper_cannot_do_is_refused_clearly(case: Case):
    with case.row.refuses[META_INIT].raises():
        built_on_meta_and_initialised(case)


@pytest.mark.parametrize("case", cases(first_shape=True))
def test_functional_call_with_other_originals_computes_with_them(case: Case):
    model, other, x = build(case).eval(), source(case), inputs(case)
    before = state(model)
    tensors = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    assert_close(functional_call(model, tensors, (x,)), other(x), rounding(case.dtype))
    assert_same_state(model, before)


@pytest.mark.parametrize("case", cases(first_shape=True))
def test_functional_call_with_a_plain_weight_uses_it_as_given(case: Case):
    model, x = build(case).eval(), inputs(case)
    before = state(model)
    W = torch.randn_like(layer_of(model).weight)  # on the set or not
    plain = {**tether.plain_state_dict(model), "0.weight": W}
    expected = functional_call(build_plain(case).eval(), plain, (x,))
    assert_close(functional_call(model, {"0.weight": W}, (x,)), expected, rounding(case.dtype))
    assert_same_state(model, before)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", cases(first_shape=True, where=representative))
def test_an_exported_program_gives_the_eager_outputs(case: Case, training: bool):
    model, x = build(case).train(training), inputs(case)
    eager = copy.deepcopy(model)
    exported = torch.export.export(model, (x,)).module()
    for _ in range(2):  # in training mode each call advances spectral norm's state in both
        assert_close(exported(x), eager(x), rounding(case.dtype))


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Dynamo instantiates the autograd.Function base class while tracing any Function, which
# warns (torch 2.13); see tests/test_compile.py.
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
)
@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("case", cases(first_shape=True, where=representative))
def test_compiled_with_fullgraph_gives_the_eager_values_and_gradients(case: Case):
    model, x = build(case), inputs(case)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    got, expected = compiled(x), eager(x)
    assert_close(got, expected, rounding(case.dtype))
    loss(got).backward()
    loss(expected).backward()
    assert_same_grads(model, eager)
