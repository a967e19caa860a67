"""Dtypes: every helper registers, computes and trains in each dtype it admits, low precision
included (the weight and the gradients keep the module's dtype, but for a magnitude that is
real by nature, and the weight is on the set to that dtype's precision); an integer tensor
gets a ``TypeError`` saying that constraints need a floating-point (or complex) tensor and
naming its dtype."""

from __future__ import annotations

import pytest
import torch

import tether
from tests.conformance.support import assert_member, build, inputs, layer_of, loss
from tests.conformance.table import SHAPES, Case, Row, cases

pytestmark = pytest.mark.usefixtures("one_thread")


def refuses_integers(row: Row) -> bool:
    return not row.integers


def accepts_integers(row: Row) -> bool:
    return row.integers


def with_integer_buffer(case: Case) -> torch.nn.Module:
    layer = SHAPES[case.shape].make()
    shape = layer.weight.shape
    layer.register_buffer("idx", torch.arange(shape.numel()).reshape(shape))
    return layer


@pytest.mark.parametrize("case", cases(dtypes=None))
def test_the_weight_its_originals_and_their_gradients_keep_the_modules_dtype(case: Case):
    model = build(case)
    layer = layer_of(model)
    assert layer.weight.dtype == case.dtype
    assert_member(layer, case)
    out = model(inputs(case))
    assert out.dtype == case.dtype
    loss(out).backward()
    real = case.row.real_original
    for name, parameter in model.named_parameters():
        dtype = case.dtype.to_real() if real and name.endswith(f".{real}") else case.dtype
        assert parameter.dtype == dtype, name
        assert parameter.grad is not None, name
        assert parameter.grad.dtype == dtype, name
        assert bool(parameter.grad.isfinite().all()), name


@pytest.mark.parametrize("case", cases(first_shape=True, where=refuses_integers))
def test_an_integer_tensor_is_refused_with_a_type_error_naming_its_dtype(case: Case):
    layer = with_integer_buffer(case)
    name = type(layer).__name__
    message = rf"(?s)(?=.*{name}\.idx)(?=.*floating.point)(?=.*torch\.int64)"
    with pytest.raises(TypeError, match=message):
        case.row.register(layer, "idx")


@pytest.mark.parametrize("case", cases(first_shape=True, where=accepts_integers))
def test_pruning_an_integer_tensor_keeps_its_dtype(case: Case):
    layer = with_integer_buffer(case)
    values = layer.idx.clone()
    case.row.register(layer, "idx")
    assert tether.is_parametrized(layer, "idx")
    assert layer.idx.dtype == torch.int64
    kept = layer.idx != 0
    assert torch.equal(layer.idx[kept], values[kept])
    assert bool((~kept).any())
