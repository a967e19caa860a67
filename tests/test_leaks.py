"""Registering and removing, pickling and copying in long loops leaks nothing.

Each loop first runs a few hundred times to warm caches, then runs its full count between two
censuses taken after ``gc.collect()``: Python's allocated memory blocks
(``sys.getallocatedblocks``: every object, strings and numbers included, at no cost to the
loop, unlike ``tracemalloc``), the objects the garbage collector tracks, the live tensors, the
live ``Parametrized*`` classes and the entries of tether's class registry. A leak of one object
per cycle adds as many as there are cycles; the slack, half that, absorbs the process's noise.
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import tether
from tests.parametrizations import Double, Symmetric
from tether import _classes

WARM_UP = 100


@dataclass(frozen=True)
class Census:
    blocks: int
    objects: int
    tensors: int
    classes: int
    registry: int


def census() -> Census:
    gc.collect()
    blocks = sys.getallocatedblocks()
    objects = gc.get_objects()
    result = Census(
        blocks=blocks,
        objects=len(objects),
        # type(o), not isinstance: some objects warn when their attributes are looked up.
        tensors=sum(issubclass(type(o), torch.Tensor) for o in objects),
        classes=sum(
            issubclass(type(o), type) and o.__name__.startswith("Parametrized") for o in objects
        ),
        registry=len(_classes._classes),
    )
    del objects
    return result


def growth(before: Census, after: Census, count: int) -> list[str]:
    """What grew between two censuses around ``count`` cycles, beyond the process's noise."""
    # Half an object per cycle: a leak adds at least one, the rest of the process some noise.
    slack = count // 2
    problems = [
        f"{field}: {getattr(before, field)} -> {getattr(after, field)}"
        for field in ("classes", "registry", "tensors")
        if getattr(after, field) > getattr(before, field)
    ]
    problems += [
        f"{field}: {getattr(before, field)} -> {getattr(after, field)} (slack {slack})"
        for field in ("objects", "blocks")
        if getattr(after, field) - getattr(before, field) >= slack
    ]
    return problems


def assert_no_growth(cycle: Callable[[int], object], count: int) -> None:
    """Run ``cycle`` ``count`` times after a warm-up and compare the censuses around it.

    A leak grows with every window of cycles; something else in the process (a background
    thread of an earlier test, a cache filling once) does not grow twice. So a window that
    shows growth is followed by a second one, and the test fails only if both grow.
    """
    for i in range(WARM_UP):
        cycle(i)
    problems: list[str] = []
    for _ in range(2):
        before = census()
        for i in range(count):
            cycle(i)
        problems = growth(before, census(), count)
        if not problems:
            return
    raise AssertionError(f"grew in two windows of {count} cycles: {'; '.join(problems)}")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_register_remove_cycles_leak_nothing():
    layer = nn.Linear(3, 3)
    weight, bias = layer.weight, layer.bias

    def cycle(i: int) -> None:
        tether.register_parametrization(layer, "weight", Symmetric())
        if i % 3 == 0:  # a second tensor: another shared class, then back to the first
            tether.register_parametrization(layer, "bias", Double())
            tether.remove_parametrizations(layer, "bias")
        tether.remove_parametrizations(layer, "weight", leave_parametrized=i % 2 == 0)

    assert_no_growth(cycle, 10_000)
    assert type(layer) is nn.Linear
    assert layer.weight is weight and layer.bias is bias


def test_classes_of_dead_modules_are_freed():
    """A class defined per cycle (models built in a loop, notebooks re-running a cell)."""

    def cycle(i: int) -> None:
        cls = type(f"Layer{i}", (nn.Linear,), {})
        layer = tether.register_parametrization(cls(2, 2), "weight", Symmetric())
        copy.deepcopy(layer)

    assert_no_growth(cycle, 300)


def small_model(layers: int) -> nn.Module:
    """A chain on one layer and, with ``layers=2``, a second parametrized layer."""
    first = tether.register_parametrization(nn.Linear(3, 3), "weight", Symmetric())
    if layers == 1:
        return nn.Sequential(first)
    tether.register_parametrization(first, "weight", Double())
    second = tether.register_parametrization(nn.Linear(3, 3), "bias", Double())
    return nn.Sequential(first, second)


def pickled(model: nn.Module) -> nn.Module:
    clone: nn.Module = pickle.loads(pickle.dumps(model))
    return clone


def saved(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    clone: nn.Module = torch.load(buffer, weights_only=False)
    return clone


@pytest.mark.parametrize(
    ("layers", "copier", "count"),
    [
        # The 10,000 round trips on the smallest model (about 1 ms each), and fewer
        # on a model with a chain and two parametrized layers.
        (1, pickled, 10_000),
        (2, pickled, 200),
        (2, copy.deepcopy, 200),
        (2, saved, 200),
    ],
    ids=["pickle-10000", "pickle", "deepcopy", "torch.save"],
)
def test_copy_round_trips_leak_nothing(layers, copier, count):
    model = small_model(layers)
    x = torch.randn(2, 3)

    def cycle(i: int) -> None:
        clone = copier(model)
        assert type(clone[0]) is type(model[0])
        if i % 100 == 0:
            assert torch.equal(clone(x), model(x))

    assert_no_growth(cycle, count)
