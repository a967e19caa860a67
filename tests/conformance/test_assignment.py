"""Assignment: ``layer.weight = X`` with ``X`` on the set goes through ``right_inverse`` and
the weight then equals ``X`` (in eval and training mode); assigning an ``nn.Parameter`` raises
PyTorch's ``KeyError``, naming the module, the tensor and the fix."""

from __future__ import annotations

import pytest
from torch import nn

from tests.conformance.support import (
    assert_close,
    assert_member,
    assert_same_state,
    build,
    layer_of,
    round_trip,
    source,
    state,
)
from tests.conformance.table import ASSIGN, SHAPES, Case, cases, refusals

pytestmark = pytest.mark.usefixtures("one_thread")


def class_name(case: Case) -> str:
    return type(SHAPES[case.shape].make()).__name__


@pytest.mark.parametrize("case", cases(dtypes=None, supporting=(ASSIGN,)))
def test_assigning_a_member_sets_it_through_right_inverse(case: Case):
    model = build(case)
    layer = layer_of(model)
    originals = list(layer.parametrizations.weight.originals())
    member = layer_of(source(case)).weight.detach()
    layer.weight = member
    assert list(layer.parametrizations.weight.originals()) == originals  # the same Parameters
    for training in (False, True):  # eval first: training-mode reads advance spectral norm
        model.train(training)
        assert_close(layer.weight, member, round_trip(case), "train" if training else "eval")
    assert_member(layer, case)


@pytest.mark.parametrize("case", refusals(ASSIGN))
def test_assigning_to_a_constraint_without_right_inverse_is_refused_clearly(case: Case):
    model = build(case)
    before = state(model)
    with case.row.refuses[ASSIGN].raises():
        layer_of(model).weight = layer_of(source(case)).weight.detach()
    assert_same_state(model, before)


@pytest.mark.parametrize("case", cases(first_shape=True))
def test_assigning_a_parameter_raises_a_key_error_naming_the_tensor_and_the_fix(case: Case):
    model = build(case)
    before = state(model)
    parameter = nn.Parameter(layer_of(source(case)).weight.detach().clone())
    message = rf"{class_name(case)}\.weight.*remove_parametrizations"
    with pytest.raises(KeyError, match=f"(?s){message}"):
        layer_of(model).weight = parameter
    assert_same_state(model, before)
    assert all(p is not parameter for p in model.parameters())
