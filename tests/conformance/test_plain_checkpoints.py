"""Plain checkpoints: ``tether.plain_state_dict`` exports a model without changing it (in
training and eval mode, power-iteration state included) into a plain copy that computes the
same; and a plain checkpoint whose weight is on the set loads into a fresh constrained model
with the same outputs, in training and eval mode."""

from __future__ import annotations

import copy

import pytest
import torch

import tether
from tests.conformance.support import (
    assert_close,
    assert_member,
    assert_same_state,
    build,
    build_plain,
    inputs,
    layer_of,
    round_trip,
    rounding,
    source,
    state,
)
from tests.conformance.table import PLAIN_CHECKPOINT, Case, cases, refusals

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ["train", "eval"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", cases())
def test_plain_state_dict_changes_nothing_in_the_model(case: Case, mode: str):
    model = source(case).train(mode == "train")
    before = state(model)
    parameters = [(name, id(p)) for name, p in model.named_parameters()]
    classes = [type(m) for m in model.modules()]
    tether.plain_state_dict(model)
    assert_same_state(model, before)
    assert [(name, id(p)) for name, p in model.named_parameters()] == parameters
    assert [type(m) for m in model.modules()] == classes
    assert model.training == (mode == "train")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", cases())
def test_plain_state_dict_loads_into_a_plain_model_that_computes_the_same(case: Case, mode: str):
    model, x = source(case), inputs(case)
    expected = copy.deepcopy(model).eval()(x)
    plain = tether.plain_state_dict(model.train(mode == "train"))
    target = build_plain(case, seed=1).eval()
    result = target.load_state_dict(plain, strict=True)
    assert result.missing_keys == result.unexpected_keys == []
    # In eval mode the export is the weight the model computes; in training mode it may be
    # one power-iteration step further.
    rtol = rounding(case.dtype) if mode == "eval" else round_trip(case)
    assert_close(target(x), expected, rtol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", cases(supporting=(PLAIN_CHECKPOINT,)))
def test_a_plain_checkpoint_loads_into_a_fresh_constrained_model(case: Case, mode: str):
    model, x = source(case), inputs(case)
    expected = model(x)
    plain = tether.plain_state_dict(model)
    target = build(case).train(mode == "train")
    result = target.load_state_dict(plain, strict=True)
    assert result.missing_keys == result.unexpected_keys == []
    assert_close(target(x), expected, round_trip(case))
    assert_member(layer_of(target), case)


@pytest.mark.parametrize("case", refusals(PLAIN_CHECKPOINT))
def test_a_plain_checkpoint_the_constraint_cannot_take_is_refused_clearly(case: Case):
    plain = tether.plain_state_dict(source(case))
    target = build(case)
    before = state(target)
    with case.row.refuses[PLAIN_CHECKPOINT].raises():
        target.load_state_dict(plain)
    assert_same_state(target, before)


def test_plain_checkpoint_cases_use_distinct_values():
    # The checks above would pass vacuously if the source were the fresh model.
    case = cases(first_shape=True)[0].values[0]
    assert not torch.equal(layer_of(source(case)).weight, layer_of(build(case)).weight)
