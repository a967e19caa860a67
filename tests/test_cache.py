"""Tests for ``tether.cached()``: one evaluation per block, reentrant, thread-local, and
invalidated by writes (assignment, ``load_state_dict``, appending to a chain); one value per
context (grad mode, inference mode, autocast, checkpointing), with the uncached values and
gradients; and torch's ``parametrize.cached()`` honoured with the same semantics. A scenario
under ``cached()`` gives what it gives with torch's parametrize (torch twins).

The tests that take the ``device`` and ``dtype`` fixtures follow ``--device`` and ``--dtype``
(``tests/conftest.py``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import pytest
import torch
import torch.nn.utils.parametrize as torch_parametrize
from torch import nn
from torch.utils.checkpoint import checkpoint

import tether
from tests.parametrizations import Cayley, CountingSymmetric, MatrixExp, Skew, Symmetric
from tests.twins import IMPLEMENTATIONS, assert_same, grads, twin
from tether import _cache, _torch_compat

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


def make_layer(device: torch.device, dtype: torch.dtype) -> tuple[nn.Linear, CountingSymmetric]:
    """A Linear with a symmetric weight; the counter starts at 0 after registration."""
    counter = CountingSymmetric()
    layer = nn.Linear(N, N, device=device, dtype=dtype)
    layer = tether.register_parametrization(layer, "weight", counter)
    counter.calls = 0
    return layer, counter


def symmetric(device: torch.device, dtype: torch.dtype, n: int = N) -> torch.Tensor:
    A = torch.randn(n, n, device=device, dtype=dtype)
    return A + A.mT


def test_two_reads_inside_cached_evaluate_the_parametrization_once(device, dtype):
    layer, counter = make_layer(device, dtype)
    with tether.cached():
        _ = layer.weight
        _ = layer.weight
    assert counter.calls == 1


def test_two_reads_inside_cached_return_the_same_tensor_object(device, dtype):
    layer, _ = make_layer(device, dtype)
    with tether.cached():
        first = layer.weight
        second = layer.weight
    assert first is second


def test_cached_value_equals_the_uncached_value(device, dtype):
    layer, _ = make_layer(device, dtype)
    expected = layer.weight
    with tether.cached():
        got = layer.weight
    assert torch.equal(got, expected)


def test_reads_outside_cached_evaluate_every_time(device, dtype):
    layer, counter = make_layer(device, dtype)
    first = layer.weight
    second = layer.weight
    assert counter.calls == 2
    assert first is not second


def test_cache_is_dropped_when_the_block_exits(device, dtype):
    layer, counter = make_layer(device, dtype)
    with tether.cached():
        inside = layer.weight
    outside = layer.weight
    assert counter.calls == 2
    assert outside is not inside


def test_cache_is_dropped_when_the_block_exits_with_an_exception(device, dtype):
    layer, counter = make_layer(device, dtype)
    with pytest.raises(KeyError), tether.cached():
        inside = layer.weight
        raise KeyError("boom")
    assert layer.weight is not inside
    assert counter.calls == 2


def test_nested_blocks_share_one_cache(device, dtype):
    layer, counter = make_layer(device, dtype)
    with tether.cached():
        outer = layer.weight
        with tether.cached():
            inner = layer.weight
    assert inner is outer
    assert counter.calls == 1


def test_inner_block_exit_keeps_the_outer_cache(device, dtype):
    layer, counter = make_layer(device, dtype)
    with tether.cached():
        with tether.cached():
            inner = layer.weight
        after_inner = layer.weight
    assert after_inner is inner
    assert counter.calls == 1


def test_cache_is_dropped_when_the_outermost_nested_block_exits(device, dtype):
    layer, counter = make_layer(device, dtype)
    with tether.cached(), tether.cached():  # two nested blocks
        inside = layer.weight
    assert layer.weight is not inside
    assert counter.calls == 2


def test_decorated_function_caches_within_a_call(device, dtype):
    layer, counter = make_layer(device, dtype)

    @tether.cached()
    def read_twice() -> tuple[torch.Tensor, torch.Tensor]:
        return layer.weight, layer.weight

    first, second = read_twice()
    assert first is second
    assert counter.calls == 1


def test_decorated_function_recomputes_on_each_call(device, dtype):
    layer, counter = make_layer(device, dtype)

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


def test_decorated_forward_evaluates_the_parametrization_once_per_call(device, dtype):
    layer, counter = make_layer(device, dtype)
    model = TwiceThrough(layer)
    model(torch.randn(2, N, device=device, dtype=dtype))
    model(torch.randn(2, N, device=device, dtype=dtype))
    assert counter.calls == 2


def test_decorated_forward_gives_the_uncached_output(device, dtype):
    layer, _ = make_layer(device, dtype)
    model = TwiceThrough(layer)
    x = torch.randn(2, N, device=device, dtype=dtype)
    expected = layer(torch.tanh(layer(x)))
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("other_thread_caches", [True, False], ids=["cached", "uncached"])
def test_value_cached_in_one_thread_is_not_returned_in_another(other_thread_caches, device, dtype):
    layer, _ = make_layer(device, dtype)
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


def test_thread_outside_cached_recomputes_while_another_thread_caches(device, dtype):
    layer, counter = make_layer(device, dtype)
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


def test_each_thread_keeps_its_own_cache_while_both_are_inside(device, dtype):
    layer, _ = make_layer(device, dtype)
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


def test_assignment_in_another_thread_drops_this_threads_stale_entry(device, dtype):
    layer, _ = make_layer(device, dtype)
    value = symmetric(device, dtype)
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


def test_assignment_inside_cached_drops_the_stale_entry(device, dtype):
    layer, _ = make_layer(device, dtype)
    value = symmetric(device, dtype)
    with tether.cached():
        before = layer.weight
        layer.weight = value.clone()
        after = layer.weight
    assert not torch.equal(before, value)
    assert torch.equal(after, value)


def test_load_state_dict_inside_cached_drops_the_stale_entry(device, dtype):
    layer, _ = make_layer(device, dtype)
    source, _ = make_layer(device, dtype)
    with tether.cached():
        _ = layer.weight
        layer.load_state_dict(source.state_dict())
        after = layer.weight
    assert torch.equal(after, source.weight)


def test_loading_a_plain_checkpoint_inside_cached_drops_the_stale_entry(device, dtype):
    layer, _ = make_layer(device, dtype)
    value = symmetric(device, dtype)
    with tether.cached():
        _ = layer.weight
        layer.load_state_dict({"weight": value, "bias": torch.zeros(N, device=device, dtype=dtype)})
        after = layer.weight
    assert torch.equal(after, value)


def test_loading_a_parametrization_buffer_inside_cached_drops_the_stale_entry(device, dtype):
    scaled = CountingScaled().to(device)
    layer = tether.register_parametrization(
        nn.Linear(N, N, device=device, dtype=dtype), "weight", scaled
    )
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["parametrizations.weight.0.scale"] = torch.tensor(3.0, device=device, dtype=dtype)
    with tether.cached():
        before = layer.weight
        layer.load_state_dict(state)
        after = layer.weight
    assert torch.equal(after, 3.0 * before)


def test_appending_to_the_chain_inside_cached_drops_the_stale_entry(device, dtype):
    layer, _ = make_layer(device, dtype)
    with tether.cached():
        before = layer.weight
        tether.register_parametrization(layer, "weight", lambda W: 2 * W)
        after = layer.weight
    assert torch.equal(after, 2 * before)


def test_removing_inside_cached_returns_the_plain_parameter(device, dtype):
    layer, _ = make_layer(device, dtype)
    original = layer.parametrizations.weight.original
    with tether.cached():
        _ = layer.weight
        tether.remove_parametrizations(layer, "weight")
        after = layer.weight
    assert after is original


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_through_cached_reads_gives_the_uncached_gradients(dtype, device):
    layer, _ = make_layer(device, dtype)
    layer = layer.to(dtype)
    x = torch.randn(3, N, device=device, dtype=dtype)
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


# --- one value per context (Note [The cache key]) ---------------------------------------------

CACHES: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "tether": tether.cached,
    "torch": torch_parametrize.cached,
}

# Each takes the device the reads run on.
CONTEXTS: dict[str, Callable[[torch.device], contextlib.AbstractContextManager[None]]] = {
    "grad": lambda device: torch.enable_grad(),
    "no_grad": lambda device: torch.no_grad(),
    "inference_mode": lambda device: torch.inference_mode(),
    "autocast_bf16": lambda device: torch.autocast(device.type, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("cache", list(CACHES))
def test_reads_in_one_context_evaluate_once(cache, context, device, dtype):
    layer, counter = make_layer(device, dtype)
    with CACHES[cache](), CONTEXTS[context](device):
        first = layer.weight
        second = layer.weight
    assert first is second
    assert counter.calls == 1


@pytest.mark.parametrize("context", [c for c in CONTEXTS if c != "grad"])
@pytest.mark.parametrize("cache", list(CACHES))
def test_another_context_gets_a_value_of_its_own_computed_once(cache, context, device, dtype):
    layer, counter = make_layer(device, dtype)
    with CACHES[cache]():
        in_grad = layer.weight
        with CONTEXTS[context](device):
            in_context = layer.weight
            again = layer.weight
        back = layer.weight
    assert in_context is again
    assert back is in_grad
    assert in_context is not in_grad
    assert counter.calls == 2


@pytest.mark.parametrize("cache", list(CACHES))
def test_each_weight_is_evaluated_once_per_distinct_context(cache, device, dtype):
    layer, counter = make_layer(device, dtype)
    with CACHES[cache]():
        for _ in range(2):
            for context in CONTEXTS.values():
                with context(device):
                    _ = layer.weight
    assert counter.calls == len(CONTEXTS)


@pytest.mark.parametrize("cache", list(CACHES))
def test_a_value_read_under_no_grad_first_is_not_served_to_grad_mode(cache, device, dtype):
    layer, _ = make_layer(device, dtype)
    with CACHES[cache]():
        with torch.no_grad():
            logged = layer.weight
        used = layer.weight
    assert not logged.requires_grad
    assert used.requires_grad


@pytest.mark.parametrize("cache", list(CACHES))
def test_reads_under_saved_tensor_hooks_are_not_cached(cache, device, dtype):
    # A non-reentrant checkpoint must recompute what its forward saved, cache or not.
    layer, counter = make_layer(device, dtype)
    with CACHES[cache](), torch.autograd.graph.save_on_cpu():
        first = layer.weight
        second = layer.weight
    assert first is not second
    assert counter.calls == 2


def squared(X: torch.Tensor) -> torch.Tensor:
    """``X @ X``: under autocast a matmul, so the value's dtype follows autocast."""
    return X @ X


# Maps that save tensors for their backward: a second backward through one raises.
LAYERS: dict[str, Callable[[torch.device], nn.Linear]] = {
    "orthogonal": lambda device: tether.orthogonal(nn.Linear(N, N, device=device)),
    "squared": lambda device: tether.register_parametrization(
        nn.Linear(N, N, device=device), "weight", squared
    ),
}


def read_under_no_grad_first(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        layer.weight.norm()  # e.g. logged
    return layer(x).square().sum()


def read_in_inference_mode_first(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        layer.weight.norm()
    return layer(x).square().sum()


def autocast_then_autocast_disabled(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = layer(x)  # a bfloat16 weight
        with torch.autocast(x.device.type, enabled=False):
            return layer(y.float()).square().sum()  # a float32 weight


def checkpointed(reentrant: bool) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Two checkpointed segments that each read ``layer.weight`` twice, and ``layer`` once more
    outside them."""

    def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        def twice(y: torch.Tensor) -> torch.Tensor:
            return layer(torch.tanh(layer(y)))

        y = checkpoint(twice, x, use_reentrant=reentrant)
        y = checkpoint(twice, torch.tanh(y), use_reentrant=reentrant)
        return layer(torch.tanh(y)).square().sum()

    return run


SCENARIOS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "no_grad_read_then_grad_read": read_under_no_grad_first,
    "inference_mode_read_then_normal_read": read_in_inference_mode_first,
    "autocast_bf16_then_autocast_disabled": autocast_then_autocast_disabled,
    "reentrant_checkpoint_and_outside": checkpointed(reentrant=True),
    "non_reentrant_checkpoint_and_outside": checkpointed(reentrant=False),
}


def loss_and_gradients(
    layer: nn.Linear,
    x: torch.Tensor,
    scenario: str,
    cache: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    backward_inside: bool = True,
) -> list[torch.Tensor]:
    """The loss of ``scenario`` and the gradients of the original, the bias and the input."""
    layer.zero_grad()
    x.grad = None
    with cache():
        loss = SCENARIOS[scenario](layer, x)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    original = layer.parametrizations.weight.original
    grads = [original.grad, layer.bias.grad, x.grad]
    assert all(g is not None for g in grads), "a gradient is missing"
    return [loss.detach(), *(g.clone() for g in grads if g is not None)]


@pytest.mark.parametrize("backward", ["inside", "after"])
@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_values_and_gradients_equal_the_uncached_ones(kind, scenario, cache, backward, device):
    layer = LAYERS[kind](device)
    x = torch.randn(3, N, device=device, requires_grad=True)
    expected = loss_and_gradients(layer, x, scenario)
    got = loss_and_gradients(layer, x, scenario, CACHES[cache], backward == "inside")
    eps = torch.finfo(torch.float32).eps
    for name, g, e in zip(["loss", "original", "bias", "input"], got, expected, strict=True):
        scale = e.abs().max().item()
        torch.testing.assert_close(g, e, rtol=16 * eps, atol=16 * eps * scale, msg=name)


def test_a_reentrant_recomputation_evaluates_once_per_segment(device, dtype):
    # The cache is open during backward: each segment's recomputation (its own graph, which
    # it backpropagates through at once) computes the weight once, however often it reads it.
    layer, counter = make_layer(device, dtype)
    x = torch.randn(3, N, device=device, dtype=dtype, requires_grad=True)

    def twice(y: torch.Tensor) -> torch.Tensor:
        return layer(torch.tanh(layer(y)))

    with tether.cached():
        y = checkpoint(twice, x, use_reentrant=True)
        y = checkpoint(twice, y, use_reentrant=True)
        forward_calls = counter.calls
        y.sum().backward()
    assert forward_calls == 1  # both segments' forwards run under no_grad: one value
    assert counter.calls == 3  # and one per segment in the backward pass


# --- torch.nn.utils.parametrize.cached() (Note [torch's cached()]) ----------------------------


def test_torch_cached_caches_tether_parametrizations(device, dtype):
    layer, counter = make_layer(device, dtype)
    with torch_parametrize.cached():
        first = layer.weight
        second = layer.weight
    assert first is second
    assert counter.calls == 1


def test_torch_cached_values_are_dropped_when_its_block_exits(device, dtype):
    layer, counter = make_layer(device, dtype)
    with torch_parametrize.cached():
        inside = layer.weight
    outside = layer.weight
    assert outside is not inside
    assert counter.calls == 2


def test_a_torch_cached_block_never_serves_the_previous_blocks_value(device, dtype):
    layer, _ = make_layer(device, dtype)
    with torch_parametrize.cached():
        before = layer.weight
    with torch.no_grad():  # an optimizer step: in place, unseen by the cache
        layer.parametrizations.weight.original.add_(1.0)
    with torch_parametrize.cached():
        after = layer.weight
    expected = layer.weight
    assert not torch.equal(after, before)
    assert torch.equal(after, expected)


@pytest.mark.parametrize("outer", ["tether", "torch"])
def test_torch_cached_nested_with_tether_cached_evaluates_once(outer, device, dtype):
    layer, counter = make_layer(device, dtype)
    inner = "torch" if outer == "tether" else "tether"
    with CACHES[outer]():
        with CACHES[inner]():
            in_inner = layer.weight
        after_inner = layer.weight
    assert after_inner is in_inner
    assert counter.calls == 1
    assert layer.weight is not in_inner


def test_assignment_inside_torch_cached_drops_the_stale_entry(device, dtype):
    layer, _ = make_layer(device, dtype)
    value = symmetric(device, dtype)
    with torch_parametrize.cached():
        _ = layer.weight
        layer.weight = value.clone()
        after = layer.weight
    assert torch.equal(after, value)


def test_inside_torch_cached_each_thread_caches_its_own_value(device, dtype):
    # torch's flag is global: every thread caches while one is inside its block.
    layer, _ = make_layer(device, dtype)
    main_has_read = threading.Event()
    seen: list[torch.Tensor] = []

    def other() -> None:
        if main_has_read.wait(TIMEOUT):
            seen.extend([layer.weight, layer.weight])

    thread = threading.Thread(target=other)
    thread.start()
    with torch_parametrize.cached():
        mine = layer.weight
        main_has_read.set()
        thread.join(TIMEOUT)
        again = layer.weight
    assert not thread.is_alive()
    assert seen[0] is seen[1]
    assert seen[0] is not mine
    assert again is mine


def test_a_thread_that_read_inside_torch_cached_takes_its_values_when_it_ends(device, dtype):
    layer, _ = make_layer(device, dtype)
    thread = threading.Thread(target=lambda: layer.weight)
    with torch_parametrize.cached():
        thread.start()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert thread.ident not in _cache._live


def test_torch_session_names_each_block_of_torch_cached():
    assert _cache.torch_session() is None
    with torch_parametrize.cached():
        first = _cache.torch_session()
        with torch_parametrize.cached():
            assert _cache.torch_session() is first
    with torch_parametrize.cached():
        second = _cache.torch_session()
    assert first is not None
    assert second is not None
    assert second is not first


def test_without_torchs_flag_tether_reads_uncached(monkeypatch, device, dtype):
    layer, counter = make_layer(device, dtype)
    monkeypatch.setattr(_cache, "torch_parametrize", _torch_compat._WithoutTorchCache)
    with torch_parametrize.cached():
        assert _cache.torch_session() is None
        first = layer.weight
        assert layer.weight is not first
    assert counter.calls == 2


def test_without_torchs_autograd_state_nothing_is_cached(monkeypatch, device, dtype):
    layer, counter = make_layer(device, dtype)
    expected = layer.weight
    counter.calls = 0
    monkeypatch.setattr(_cache, "keyable", False)  # as on a torch without one of the names
    with tether.cached():
        first = layer.weight
        second = layer.weight
    assert first is not second
    assert counter.calls == 2
    assert torch.equal(first, expected)


# --- the values and gradients of torch's parametrize under cached() (torch twins) -------------


def test_cached_gives_the_same_values_as_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Skew())
        parametrize.register_parametrization(layer, "weight", MatrixExp())
        x = torch.randn(2, 4)
        with parametrize.cached():
            return layer.weight, layer(layer(x))

    expected, actual = twin(scenario)
    assert_same(expected, actual)


@pytest.mark.parametrize("parametrize", IMPLEMENTATIONS)
def test_cached_returns_one_tensor_per_block(parametrize):
    layer = parametrize.register_parametrization(nn.Linear(4, 4), "weight", Symmetric())
    with parametrize.cached():
        assert layer.weight is layer.weight


def test_cached_gradients_match_torch():
    def scenario(parametrize):
        layer = nn.Linear(4, 4)
        parametrize.register_parametrization(layer, "weight", Skew())
        parametrize.register_parametrization(layer, "weight", Cayley())
        x = torch.randn(2, 4)
        with parametrize.cached():
            layer(layer(x)).sum().backward()
        return grads(layer)

    expected, actual = twin(scenario)
    assert_same(expected, actual)
