"""``state_dict`` both ways with PyTorch's own parametrization, wherever PyTorch has the same
one (``orthogonal`` with each map, ``weight_norm``, ``spectral_norm``, and pruning from
``torch.nn.utils.prune``): the same keys, and a checkpoint of one loads into the other with
the same outputs, in eval and in training mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conformance.support import (
    SEED,
    assert_close,
    assert_same_state,
    build,
    inputs,
    round_trip,
    state,
    trained,
)
from tests.conformance.table import FROM_TORCH, SHAPES, TO_TORCH, Case, Row, cases, refusals

pytestmark = pytest.mark.usefixtures("one_thread")


def has_twin(row: Row) -> bool:
    return row.torch_twin is not None


def build_torch(case: Case, seed: int = SEED) -> nn.Sequential:
    """The case's model with PyTorch's parametrization instead of tether's."""
    assert case.row.torch_twin is not None
    torch.manual_seed(seed)
    layer = SHAPES[case.shape].make(dtype=case.dtype)
    case.row.torch_twin(layer, "weight")
    return nn.Sequential(layer)


def same_layout(row: Row) -> bool:
    return not row.refuses.keys() & {TO_TORCH, FROM_TORCH}


def assert_same_outputs(got: nn.Module, expected: nn.Module, case: Case) -> None:
    """The same outputs in eval mode, then in training mode (one more power-iteration step in
    each for spectral norm); PyTorch's maps round differently from tether's."""
    x = inputs(case)
    for training in (False, True):
        got.train(training)
        expected.train(training)
        assert_close(got(x), expected(x), round_trip(case), "train" if training else "eval")


@pytest.mark.parametrize("case", cases(where=lambda row: has_twin(row) and same_layout(row)))
def test_the_state_dict_has_pytorchs_keys(case: Case):
    assert list(build(case).state_dict()) == list(build_torch(case).state_dict())


@pytest.mark.parametrize("case", cases(where=has_twin, supporting=(FROM_TORCH,)))
def test_a_pytorch_checkpoint_loads_with_the_same_outputs(case: Case):
    # Trained rather than redrawn: PyTorch's maps are defined on the originals training
    # reaches (its Householder map multiplies by the integer part of the diagonal).
    theirs = trained(build_torch(case), case)
    ours = build(case, seed=SEED + 1)
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert result.missing_keys == result.unexpected_keys == []
    assert_same_outputs(ours, theirs, case)


@pytest.mark.parametrize("case", cases(where=has_twin, supporting=(TO_TORCH,)))
def test_a_checkpoint_loads_into_pytorchs_parametrization_with_the_same_outputs(case: Case):
    ours = trained(build(case), case)
    theirs = build_torch(case, seed=SEED + 1)
    result = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert result.missing_keys == result.unexpected_keys == []
    assert_same_outputs(theirs, ours, case)


@pytest.mark.parametrize("case", refusals(TO_TORCH))
def test_a_checkpoint_pytorch_cannot_read_is_refused_clearly(case: Case):
    refusal = case.row.refuses[TO_TORCH]
    theirs = build_torch(case)
    before = state(theirs)
    with refusal.raises():
        theirs.load_state_dict(build(case).state_dict())
    assert_same_state(theirs, before)
