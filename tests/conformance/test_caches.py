"""Caches only make things faster: ``tether.cached()``, PyTorch's
``torch.nn.utils.parametrize.cached()`` and ``tether.autocache(model)`` give the values and
the gradients of no cache, in forwards that read the weight twice, under ``no_grad`` first,
inside activation checkpointing (reentrant or not) with the layer used outside the segment
too, and under bfloat16 autocast with a nested full-precision read; and each weight is
computed once per distinct context (grad mode, autocast)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.utils.parametrize as torch_parametrize
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import tether
from tests.conformance.support import (
    assert_close,
    assert_same_grads,
    build,
    inputs,
    layer_of,
    loss,
    rounding,
)
from tests.conformance.table import Case, cases
from tests.parametrizations import Counting

pytestmark = pytest.mark.usefixtures("one_thread")


def twice(layer: nn.Module, x: Tensor) -> Tensor:
    return layer(x) + layer(x.flip(0))


def read_under_no_grad_first(layer: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        layer.logged = layer.weight.abs().sum()  # e.g. to log the weight's norm
    return layer(x)


def checkpointed(layer: nn.Module, x: Tensor, use_reentrant: bool) -> Tensor:
    x = x.detach().requires_grad_()  # a reentrant segment needs an input that requires grad
    return checkpoint(layer, x, use_reentrant=use_reentrant) + layer(x.flip(0))


def checkpointed_reentrant(layer: nn.Module, x: Tensor) -> Tensor:
    return checkpointed(layer, x, use_reentrant=True)


def checkpointed_non_reentrant(layer: nn.Module, x: Tensor) -> Tensor:
    return checkpointed(layer, x, use_reentrant=False)


def autocast_then_full_precision(layer: nn.Module, x: Tensor) -> Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
        with torch.autocast("cpu", enabled=False):
            full = layer(x.flip(0))
    return low.to(full.dtype) + full


def contexts(layer: nn.Module, x: Tensor) -> Tensor:
    """Two reads in each of three contexts: grad mode, no_grad, bfloat16 autocast."""
    out = twice(layer, x)
    with torch.no_grad():
        layer.weight  # noqa: B018
        layer.weight  # noqa: B018
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = twice(layer, x)
    return out + low.to(out.dtype)


SCENARIOS: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "twice": twice,
    "no_grad-first": read_under_no_grad_first,
    "checkpoint-reentrant": checkpointed_reentrant,
    "checkpoint": checkpointed_non_reentrant,
    "autocast": autocast_then_full_precision,
    "contexts": contexts,
}
CONTEXTS = 3  # of the "contexts" scenario


class Reader(nn.Module):
    """Runs one scenario of reads of its layer's weight."""

    def __init__(self, layer: nn.Module, scenario: str) -> None:
        super().__init__()
        self.layer = layer
        self.scenario = scenario

    def forward(self, x: Tensor) -> Tensor:
        return SCENARIOS[self.scenario](self.layer, x)


CACHES: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "tether.cached": tether.cached,
    "torch.cached": torch_parametrize.cached,
    "autocache": contextlib.nullcontext,
}


def reader(case: Case, scenario: str, cache: str | None) -> Reader:
    model = Reader(layer_of(build(case)), scenario)
    # In training mode spectral norm's power iteration advances at each evaluation, so a cache
    # rightly changes its values (one step instead of one per read): compare in eval mode.
    model.train(not case.row.estimate)
    return tether.autocache(model) if cache == "autocache" else model


def run(model: Reader, x: Tensor, cache: str | None) -> Tensor:
    with CACHES[cache]() if cache else contextlib.nullcontext():
        out = model(x)
    loss(out).backward()
    return out


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "contexts"])
@pytest.mark.parametrize("case", cases(first_shape=True))
def test_a_cache_gives_the_values_and_gradients_of_no_cache(case: Case, scenario: str, cache: str):
    x = inputs(case)
    expected_model = reader(case, scenario, None)
    expected = run(expected_model, x, None)
    model = reader(case, scenario, cache)
    got = run(model, x, cache)
    assert_close(got, expected, rounding(case.dtype), "outputs:")
    assert_same_grads(model, expected_model)


@pytest.mark.parametrize("cache", [None, *CACHES])
@pytest.mark.parametrize("case", cases(first_shape=True))
def test_each_weight_is_computed_once_per_context(case: Case, cache: str | None):
    model = reader(case, "contexts", cache)
    counter = Counting()
    tether.register_parametrization(model.layer, "weight", counter)
    counter.calls = 0
    run(model, inputs(case), cache)
    # Without a cache each of the two reads per context computes it (which also shows that
    # the scenario reads what it claims).
    assert counter.calls == (CONTEXTS if cache else 2 * CONTEXTS)
