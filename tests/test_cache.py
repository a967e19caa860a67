"""Tests for ``tether.cached()``: one evaluation per block, reentrant, thread-local, and
invalidated by writes (assignment, ``load_state_dict``, appending to a chain)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import tether
from tests.parametrizations import CountingSymmetric

N = 4
TIMEOUT = 30.0  # seconds a thread waits for the other side before the test gives up


class CountingScaled(nn.Module):
    """``X * scale`` with ``scale`` a buffer of the parametrization itself."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))
        self.calls = 0

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return X * self.scale


def make_layer() -> tuple[nn.Linear, CountingSymmetric]:
    """A Linear with a symmetric weight; the counter starts at 0 after registration."""
    counter = CountingSymmetric()
    layer = tether.register_parametrization(nn.Linear(N, N), "weight", counter)
    counter.calls = 0
    return layer, counter


def symmetric(n: int = N) -> torch.Tensor:
    A = torch.randn(n, n)
    return A + A.mT


def test_two_reads_inside_cached_evaluate_the_parametrization_once():
    layer, counter = make_layer()
    with tether.cached():
        _ = layer.weight
        _ = layer.weight
    assert counter.calls == 1


def test_two_reads_inside_cached_return_the_same_tensor_object():
    layer, _ = make_layer()
    with tether.cached():
        first = layer.weight
        second = layer.weight
    assert first is second


def test_cached_value_equals_the_uncached_value():
    layer, _ = make_layer()
    expected = layer.weight
    with tether.cached():
        got = layer.weight
    assert torch.equal(got, expected)


def test_reads_outside_cached_evaluate_every_time():
    layer, counter = make_layer()
    first = layer.weight
    second = layer.weight
    assert counter.calls == 2
    assert first is not second


def test_cache_is_dropped_when_the_block_exits():
    layer, counter = make_layer()
    with tether.cached():
        inside = layer.weight
    outside = layer.weight
    assert counter.calls == 2
    assert outside is not inside


def test_cache_is_dropped_when_the_block_exits_with_an_exception():
    layer, counter = make_layer()
    with pytest.raises(KeyError), tether.cached():
        inside = layer.weight
        raise KeyError("boom")
    assert layer.weight is not inside
    assert counter.calls == 2


def test_nested_blocks_share_one_cache():
    layer, counter = make_layer()
    with tether.cached():
        outer = layer.weight
        with tether.cached():
            inner = layer.weight
    assert inner is outer
    assert counter.calls == 1


def test_inner_block_exit_keeps_the_outer_cache():
    layer, counter = make_layer()
    with tether.cached():
        with tether.cached():
            inner = layer.weight
        after_inner = layer.weight
    assert after_inner is inner
    assert counter.calls == 1


def test_cache_is_dropped_when_the_outermost_nested_block_exits():
    layer, counter = make_layer()
    with tether.cached(), tether.cached():  # two nested blocks
        inside = layer.weight
    assert layer.weight is not inside
    assert counter.calls == 2


def test_decorated_function_caches_within_a_call():
    layer, counter = make_layer()

    @tether.cached()
    def read_twice() -> tuple[torch.Tensor, torch.Tensor]:
        return layer.weight, layer.weight

    first, second = read_twice()
    assert first is second
    assert counter.calls == 1


def test_decorated_function_recomputes_on_each_call():
    layer, counter = make_layer()

    @tether.cached()
    def read() -> torch.Tensor:
        return layer.weight

    first = read()
    second = read()
    assert first is not second
    assert counter.calls == 2


class TwiceThrough(nn.Module):
    """Applies the same parametrized layer twice, with a cached forward."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    @tether.cached()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(x)))


def test_decorated_forward_evaluates_the_parametrization_once_per_call():
    layer, counter = make_layer()
    model = TwiceThrough(layer)
    model(torch.randn(2, N))
    model(torch.randn(2, N))
    assert counter.calls == 2


def test_decorated_forward_gives_the_uncached_output():
    layer, _ = make_layer()
    model = TwiceThrough(layer)
    x = torch.randn(2, N)
    expected = layer(torch.tanh(layer(x)))
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("other_thread_caches", [True, False], ids=["cached", "uncached"])
def test_value_cached_in_one_thread_is_not_returned_in_another(other_thread_caches):
    layer, _ = make_layer()
    main_has_read = threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def other() -> None:
        if not main_has_read.wait(TIMEOUT):
            return
        if other_thread_caches:
            with tether.cached():
                seen["other"] = layer.weight
        else:
            seen["other"] = layer.weight

    thread = threading.Thread(target=other)
    thread.start()
    with tether.cached():
        mine = layer.weight
        main_has_read.set()
        thread.join(TIMEOUT)
        again = layer.weight
    assert not thread.is_alive()
    assert seen["other"] is not mine
    assert again is mine  # the other thread did not disturb this thread's cache


def test_thread_outside_cached_recomputes_while_another_thread_caches():
    layer, counter = make_layer()
    main_is_caching = threading.Event()
    other_done = threading.Event()
    seen: list[torch.Tensor] = []

    def other() -> None:
        if not main_is_caching.wait(TIMEOUT):
            return
        seen.append(layer.weight)
        seen.append(layer.weight)
        other_done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with tether.cached():
        _ = layer.weight
        main_is_caching.set()
        assert other_done.wait(TIMEOUT)
    thread.join(TIMEOUT)
    assert len(seen) == 2
    assert seen[0] is not seen[1]
    assert counter.calls == 3


def test_each_thread_keeps_its_own_cache_while_both_are_inside():
    layer, _ = make_layer()
    other_has_read = threading.Event()
    main_has_read = threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def other() -> None:
        with tether.cached():
            seen["first"] = layer.weight
            other_has_read.set()
            if not main_has_read.wait(TIMEOUT):
                return
            seen["second"] = layer.weight

    thread = threading.Thread(target=other)
    thread.start()
    assert other_has_read.wait(TIMEOUT)
    with tether.cached():
        mine = layer.weight
        main_has_read.set()
        thread.join(TIMEOUT)
    assert seen["second"] is seen["first"]
    assert mine is not seen["first"]


def test_assignment_in_another_thread_drops_this_threads_stale_entry():
    layer, _ = make_layer()
    value = symmetric()
    main_has_read = threading.Event()
    assigned = threading.Event()

    def other() -> None:
        if not main_has_read.wait(TIMEOUT):
            return
        layer.weight = value
        assigned.set()

    thread = threading.Thread(target=other)
    thread.start()
    with tether.cached():
        _ = layer.weight
        main_has_read.set()
        assert assigned.wait(TIMEOUT)
        after = layer.weight
    thread.join(TIMEOUT)
    assert torch.equal(after, value)


def test_assignment_inside_cached_drops_the_stale_entry():
    layer, _ = make_layer()
    value = symmetric()
    with tether.cached():
        before = layer.weight
        layer.weight = value.clone()
        after = layer.weight
    assert not torch.equal(before, value)
    assert torch.equal(after, value)


def test_load_state_dict_inside_cached_drops_the_stale_entry():
    layer, _ = make_layer()
    source, _ = make_layer()
    with tether.cached():
        _ = layer.weight
        layer.load_state_dict(source.state_dict())
        after = layer.weight
    assert torch.equal(after, source.weight)


def test_loading_a_plain_checkpoint_inside_cached_drops_the_stale_entry():
    layer, _ = make_layer()
    value = symmetric()
    with tether.cached():
        _ = layer.weight
        layer.load_state_dict({"weight": value, "bias": torch.zeros(N)})
        after = layer.weight
    assert torch.equal(after, value)


def test_loading_a_parametrization_buffer_inside_cached_drops_the_stale_entry():
    scaled = CountingScaled()
    layer = tether.register_parametrization(nn.Linear(N, N), "weight", scaled)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["parametrizations.weight.0.scale"] = torch.tensor(3.0)
    with tether.cached():
        before = layer.weight
        layer.load_state_dict(state)
        after = layer.weight
    assert torch.equal(after, 3.0 * before)


def test_appending_to_the_chain_inside_cached_drops_the_stale_entry():
    layer, _ = make_layer()
    with tether.cached():
        before = layer.weight
        tether.register_parametrization(layer, "weight", lambda W: 2 * W)
        after = layer.weight
    assert torch.equal(after, 2 * before)


def test_removing_inside_cached_returns_the_plain_parameter():
    layer, _ = make_layer()
    original = layer.parametrizations.weight.original
    with tether.cached():
        _ = layer.weight
        tether.remove_parametrizations(layer, "weight")
        after = layer.weight
    assert after is original


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_through_cached_reads_gives_the_uncached_gradients(dtype):
    layer, _ = make_layer()
    layer = layer.to(dtype)
    x = torch.randn(3, N, dtype=dtype)
    original = layer.parametrizations.weight.original

    def loss() -> torch.Tensor:
        return layer(torch.tanh(layer(x))).square().sum()

    loss().backward()
    expected = (original.grad.clone(), layer.bias.grad.clone())
    layer.zero_grad()
    with tether.cached():
        loss().backward()
    got = (original.grad, layer.bias.grad)

    eps = torch.finfo(dtype).eps
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=16 * eps, atol=16 * eps * e.abs().max().item())
