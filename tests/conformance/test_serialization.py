"""Whole models pickle, deepcopy and ``torch.save``: the copy computes what the source does,
is independent of it, and still trains on the set (README, "What tether adds")."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import tether
from tests.conformance.support import (
    assert_member,
    assert_same_state,
    inputs,
    layer_of,
    settle,
    source,
    state,
    train_step,
)
from tests.conformance.table import Case, cases
from tests.copies import ROUNDTRIPS, pickle_roundtrip

pytestmark = pytest.mark.usefixtures("one_thread")


COPIES = {name: ROUNDTRIPS[name] for name in ("deepcopy", "torch.save")}


def check_copy(case: Case, make_copy: Callable[[nn.Module], nn.Module]) -> None:
    model, x = source(case).train(), inputs(case)
    clone = make_copy(model)
    assert tether.is_parametrized(layer_of(clone), "weight")
    # In training mode each call may advance state (spectral norm's power iteration): both
    # start from the same state, so they advance alike.
    assert torch.equal(clone(x), model(x))
    model.eval()
    clone.eval()
    assert torch.equal(clone(x), model(x))

    before, weight = state(model), layer_of(clone).weight.detach().clone()
    train_step(clone, x)
    assert_same_state(model, before)  # the copy shares nothing with the source
    clone.eval()
    assert not torch.equal(layer_of(clone).weight, weight), "a training step changed nothing"
    settle(clone, case)  # spectral norm's estimate lags a step behind the weight
    assert_member(layer_of(clone), case)


@pytest.mark.parametrize("case", cases(dtypes=None))
def test_a_pickled_model_computes_the_same_is_independent_and_trains(case: Case):
    check_copy(case, pickle_roundtrip)


@pytest.mark.parametrize("method", COPIES)
@pytest.mark.parametrize("case", cases())
def test_a_copied_model_computes_the_same_is_independent_and_trains(case: Case, method: str):
    check_copy(case, COPIES[method])
