"""Forward passes in eight threads, some inside ``cached()``, while another thread assigns.

The guarantee under test (what ``tether._cache`` promises): no read raises, and a read of a
parametrized tensor that begins after an assignment has returned sees that assignment or a
later one, inside ``cached()`` as outside it. A read that overlaps an assignment may see the
old value or the new one, entry by entry (tensors are not locked), but never an older one.

Each assignment ``k`` sets the weight to ``k * ones``, so every entry of a value read names
the assignment it came from. The writer publishes ``started = k`` before assigning and
``done = k`` after the assignment returns; a reader notes ``done`` before a read and
``started`` after it, and every entry it read must lie between the two.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import tether
from tests.parametrizations import Double, Symmetric

N = 4
READERS = 8
MIN_ASSIGNMENTS = 300
MAX_SECONDS = 1.5  # a bound on the test's length, not an assertion


@dataclass
class Clock:
    """What the writer has published: the assignment it started and the last one it finished."""

    started: int = 0
    done: int = 0
    finished: bool = False


@dataclass
class Reader:
    cached: bool
    reads: int = 0
    errors: list[BaseException] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    cache_hits: int = 0


@pytest.fixture
def fine_switching() -> Iterator[None]:
    """Switch threads every 10 µs instead of every 5 ms, so reads and writes interleave."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def versions(value: torch.Tensor) -> set[float]:
    return set(value.detach().flatten().tolist())


def read_loop(
    layer: nn.Module, clock: Clock, reader: Reader, x: torch.Tensor, start: threading.Barrier
) -> None:
    def read(i: int) -> torch.Tensor:
        # Alternate a forward pass (column 0 of the weight, as x is e_0) and a plain read.
        return layer(x) if i % 2 else layer.weight

    def check(low: int, value: torch.Tensor, high: int) -> None:
        seen = versions(value)
        if not all(v.is_integer() and low <= v <= high for v in seen):
            reader.violations.append(f"read {sorted(seen)} after {low} was done, {high} begun")

    try:
        start.wait()
        i = 0
        while not clock.finished:
            if reader.cached:
                with tether.cached():
                    for _ in range(8):
                        low, started = clock.done, clock.started
                        first = layer.weight
                        check(low, first, clock.started)
                        second = layer.weight
                        high = clock.started
                        check(low, second, high)
                        # No assignment ran from before the first read to after the second:
                        # the cache must hold, whatever the other threads do.
                        if low == started == high == clock.done:
                            assert second is first
                            reader.cache_hits += 1
                        # A forward pass inside the block: a version no older than low.
                        output = layer(x)
                        check(low, output, clock.started)
                        reader.reads += 3
            else:
                low = clock.done
                value = read(i)
                check(low, value, clock.started)
                reader.reads += 1
            i += 1
    except BaseException as error:
        reader.errors.append(error)


def write_loop(layer: nn.Module, clock: Clock, readers: list[Reader]) -> None:
    deadline = time.monotonic() + MAX_SECONDS
    k = 0
    try:
        # At least MIN_ASSIGNMENTS, then more while some reader has read little (a busy
        # machine may starve threads), within the time bound.
        while k < MIN_ASSIGNMENTS or (
            min(r.reads for r in readers) < 50 and time.monotonic() < deadline
        ):
            k += 1
            clock.started = k
            layer.weight = torch.full((N, N), float(k), dtype=torch.float64)
            clock.done = k
    finally:
        clock.finished = True


def test_no_read_sees_a_value_older_than_the_last_finished_assignment(fine_switching):
    layer = nn.Linear(N, N, bias=False, dtype=torch.float64)
    tether.register_parametrization(layer, "weight", Symmetric())
    tether.register_parametrization(layer, "weight", Double())
    layer.weight = torch.zeros(N, N, dtype=torch.float64)
    x = torch.zeros(N, dtype=torch.float64)
    x[0] = 1.0
    clock = Clock()
    readers = [Reader(cached=i % 2 == 1) for i in range(READERS)]
    start = threading.Barrier(READERS + 1)
    threads = [
        threading.Thread(target=read_loop, args=(layer, clock, reader, x, start))
        for reader in readers
    ]
    for thread in threads:
        thread.start()
    start.wait()
    write_loop(layer, clock, readers)
    for thread in threads:
        thread.join()

    for reader in readers:
        assert reader.errors == []
        assert reader.violations == []
        assert reader.reads > 0
    # The last assignment is seen by everyone, cached or not.
    assert versions(layer.weight) == {float(clock.done)}
    with tether.cached():
        assert versions(layer.weight) == {float(clock.done)}
