"""Tests for ``tether.autocache``: one evaluation per call, the uncached outputs and gradients,
a fresh value on every call, one value per context of a read (no_grad, inference mode,
autocast, activation checkpointing; also compiled), no cache left behind (exceptions,
interrupts), nesting, threads, undo, and copies.

The tests that take the ``device`` fixture follow ``--device`` (``tests/conftest.py``)."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import tether
from tests.copies import ROUNDTRIPS
from tests.parametrizations import CountingSymmetric

N = 4
STEPS = 6  # time steps of the recurrent model: reads of the recurrent kernel per call
TIMEOUT = 30.0  # seconds a thread waits for the other side before the test gives up


class Recurrent(nn.Module):
    """Runs an RNN cell over the time steps: reads ``cell.weight_hh`` once per step."""

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__()
        self.cell = nn.RNNCell(N, N, device=device)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        h = xs.new_zeros(xs.shape[1], N)
        for x in xs:
            h = self.cell(x, h)
        return h


class Raising(nn.Module):
    """Reads its parametrized weight, then raises the exception it was given."""

    def __init__(self, error: BaseException, device: torch.device) -> None:
        super().__init__()
        self.layer = nn.Linear(N, N, device=device)
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _ = self.layer.weight
        raise self.error


def counted(model: nn.Module, module: nn.Module, name: str) -> CountingSymmetric:
    """Register a counting parametrization on ``module.<name>``; the counter starts at 0."""
    counter = CountingSymmetric()
    tether.register_parametrization(module, name, counter)
    counter.calls = 0
    return counter


def recurrent(device: torch.device) -> tuple[Recurrent, CountingSymmetric]:
    model = Recurrent(device)
    return model, counted(model, model.cell, "weight_hh")


def inputs(device: torch.device) -> torch.Tensor:
    return torch.randn(STEPS, 3, N, device=device)


def counter_of(model: Recurrent) -> CountingSymmetric:
    counter = model.cell.parametrizations.weight_hh[0]
    assert isinstance(counter, CountingSymmetric)
    return counter


# --- one evaluation per call ------------------------------------------------------------------


def test_autocache_returns_the_model(device):
    model, _ = recurrent(device)
    assert tether.autocache(model) is model


def test_without_autocache_the_kernel_is_evaluated_at_every_step(device):
    model, counter = recurrent(device)
    model(inputs(device))
    assert counter.calls == STEPS


def test_the_kernel_is_evaluated_once_per_call(device):
    model, counter = recurrent(device)
    tether.autocache(model)
    model(inputs(device))
    assert counter.calls == 1


def test_each_call_evaluates_the_kernel_again(device):
    model, counter = recurrent(device)
    tether.autocache(model)
    for _ in range(3):
        model(inputs(device))
    assert counter.calls == 3


def test_reads_after_the_call_are_not_cached(device):
    model, counter = recurrent(device)
    tether.autocache(model)
    model(inputs(device))
    first = model.cell.weight_hh
    second = model.cell.weight_hh
    assert first is not second
    assert counter.calls == 3


def test_the_model_need_not_be_parametrized_itself(device):
    model, _ = recurrent(device)
    assert not tether.is_parametrized(model)
    tether.autocache(model)
    assert tether.is_parametrized(model.cell, "weight_hh")


def test_a_parametrized_tensor_of_the_model_itself_is_cached(device):
    layer = nn.Linear(N, N, device=device)
    counter = counted(layer, layer, "weight")
    tether.autocache(layer)
    layer.register_forward_pre_hook(lambda module, args: module.weight)  # a second read
    layer(torch.randn(2, N, device=device))
    assert counter.calls == 1


# --- the same results as without caching ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_and_gradients_equal_the_uncached_ones(dtype, device):
    model, _ = recurrent(device)
    model = model.to(dtype)
    twin = tether.autocache(copy.deepcopy(model))
    xs = inputs(device).to(dtype)

    expected = model(xs)
    expected.square().sum().backward()
    got = twin(xs)
    got.square().sum().backward()

    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, expected, rtol=16 * eps, atol=16 * eps)
    for (name, g), (_, e) in zip(twin.named_parameters(), model.named_parameters(), strict=True):
        scale = e.grad.abs().max().item()
        torch.testing.assert_close(
            g.grad, e.grad, rtol=64 * eps, atol=64 * eps * scale, msg=f"gradient of {name}"
        )


def test_orthogonal_kernel_gives_the_uncached_gradients(device):
    model = Recurrent(device).double()
    tether.orthogonal(model.cell, "weight_hh")
    twin = tether.autocache(copy.deepcopy(model))
    xs = inputs(device).double()
    model(xs).sum().backward()
    twin(xs).sum().backward()
    expected = model.cell.parametrizations.weight_hh.original.grad
    got = twin.cell.parametrizations.weight_hh.original.grad
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_a_call_after_an_optimizer_step_uses_the_new_weights(device):
    model, _ = recurrent(device)
    twin = tether.autocache(copy.deepcopy(model))
    xs = inputs(device)
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.5)
    twin(xs).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        for source, target in zip(twin.parameters(), model.parameters(), strict=True):
            target.copy_(source)
    torch.testing.assert_close(twin(xs), model(xs), rtol=0.0, atol=0.0)


# --- one value per context of a read (Note [The cache key]) ----------------------------------


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

SCENARIOS = [
    "no_grad_read_then_grad_read",
    "inference_mode_read_then_normal_read",
    "autocast_bf16_then_autocast_disabled",
    "reentrant_checkpoint_and_outside",
    "non_reentrant_checkpoint_and_outside",
]


class Reads(nn.Module):
    """Reads ``layer.weight`` in several contexts within one forward, as ``scenario`` says."""

    def __init__(self, layer: nn.Linear, scenario: str) -> None:
        super().__init__()
        self.layer = layer
        self.scenario = scenario

    def twice(self, y: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(y)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if self.scenario == "no_grad_read_then_grad_read":
            with torch.no_grad():
                layer.weight.norm()  # e.g. logged
            return layer(x)
        if self.scenario == "inference_mode_read_then_normal_read":
            with torch.inference_mode():
                layer.weight.norm()
            return layer(x)
        if self.scenario == "autocast_bf16_then_autocast_disabled":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                y = layer(x)  # a bfloat16 weight
                with torch.autocast(x.device.type, enabled=False):
                    return layer(y.float())  # a float32 weight
        # Two checkpointed segments that each read the weight twice, and one read outside.
        reentrant = self.scenario == "reentrant_checkpoint_and_outside"
        y = checkpoint(self.twice, x, use_reentrant=reentrant)
        y = checkpoint(self.twice, torch.tanh(y), use_reentrant=reentrant)
        return layer(torch.tanh(y))


def output_and_gradients(model: Reads, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of ``model`` and the gradients of its parameters and of ``x``."""
    x.grad = None
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters()] + [x.grad]
    assert all(g is not None for g in grads), "a gradient is missing"
    return [out.detach(), *(g for g in grads if g is not None)]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_reads_in_other_contexts_give_the_uncached_outputs_and_gradients(kind, scenario, device):
    # Issue 12, case 7: the gradient was None, off by 1.5, or the forward raised.
    model = Reads(LAYERS[kind](device), scenario)
    twin = tether.autocache(copy.deepcopy(model))
    x = torch.randn(3, N, device=device, requires_grad=True)
    expected = output_and_gradients(model, x)
    got = output_and_gradients(twin, x)
    eps = torch.finfo(torch.float32).eps
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        scale = e.abs().max().item()
        torch.testing.assert_close(g, e, rtol=16 * eps, atol=16 * eps * scale, msg=f"tensor {i}")


class LogsItsKernel(Recurrent):
    """A recurrent model that also reads its kernel under ``no_grad`` at every step."""

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        h = xs.new_zeros(xs.shape[1], N)
        for x in xs:
            with torch.no_grad():
                self.cell.weight_hh.norm()
            h = self.cell(x, h)
        return h


def test_the_kernel_is_evaluated_once_per_call_and_context(device):
    model = LogsItsKernel(device)
    counter = counted(model, model.cell, "weight_hh")
    tether.autocache(model)
    model(inputs(device))
    model(inputs(device))
    assert counter.calls == 4  # a no-grad value and a grad-mode value per call


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "scenario", ["no_grad_read_then_grad_read", "autocast_bf16_then_autocast_disabled"]
)
def test_compiled_the_traced_cache_keeps_grad_mode_and_autocast_apart(
    fresh_dynamo, scenario, device
):
    # Note [The cache under torch.compile]: the traced cache is keyed on the context too.
    model = Reads(LAYERS["squared"](device), scenario)
    twin = tether.autocache(copy.deepcopy(model))
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, N, device=device, requires_grad=True)
    expected = output_and_gradients(model, x)
    got = output_and_gradients(compiled, x)
    # Compiled and eager bfloat16 code round differently, with or without a cache.
    eps = torch.finfo(torch.bfloat16 if "autocast" in scenario else torch.float32).eps
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        scale = e.abs().max().item()
        torch.testing.assert_close(g, e, rtol=16 * eps, atol=16 * eps * scale, msg=f"tensor {i}")


# --- no cache left behind ---------------------------------------------------------------------


def raising(error: BaseException, device: torch.device) -> tuple[Raising, CountingSymmetric]:
    model = Raising(error, device)
    counter = counted(model, model.layer, "weight")
    tether.autocache(model)
    return model, counter


@pytest.mark.parametrize(
    "error", [ValueError("boom"), KeyboardInterrupt()], ids=["exception", "interrupt"]
)
def test_the_call_after_a_call_that_raised_evaluates_again(error, device):
    model, counter = raising(error, device)
    with pytest.raises(type(error)):
        model(torch.randn(2, N, device=device))
    model.error = RuntimeError("again")
    with pytest.raises(RuntimeError, match="again"):
        model(torch.randn(2, N, device=device))
    first = model.layer.weight
    assert model.layer.weight is not first
    assert counter.calls == 4


def test_reads_after_a_call_that_raised_are_not_cached(device):
    model, counter = raising(ValueError("boom"), device)
    with pytest.raises(ValueError, match="boom"):
        model(torch.randn(2, N, device=device))
    first = model.layer.weight
    assert model.layer.weight is not first
    assert counter.calls == 3


def test_reads_after_a_call_that_raised_inside_another_are_not_cached(device):
    model, _ = raising(ValueError("boom"), device)
    outer = tether.autocache(nn.Sequential(model))
    with pytest.raises(ValueError, match="boom"):
        outer(torch.randn(2, N, device=device))
    first = model.layer.weight
    assert model.layer.weight is not first


def test_a_failing_pre_hook_before_autocache_leaves_an_outer_cache_open(device):
    model, _ = recurrent(device)
    tether.autocache(model)

    def fail(module, args):
        raise ValueError("pre-hook")

    model.register_forward_pre_hook(fail, prepend=True)  # runs before autocache's own
    with tether.cached():
        with pytest.raises(ValueError, match="pre-hook"):
            model(inputs(device))
        first = model.cell.weight_hh
        assert model.cell.weight_hh is first  # the outer block still caches


class Catching(nn.Module):
    """Calls ``inner``, swallows its ValueError, then reads the cell's kernel twice."""

    def __init__(self, inner: Recurrent) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with contextlib.suppress(ValueError):
            self.inner(xs)
        return self.inner.cell.weight_hh, self.inner.cell.weight_hh


def test_a_failing_pre_hook_of_an_inner_model_leaves_the_outer_call_caching(device):
    model, _ = recurrent(device)
    tether.autocache(model)

    def fail(module, args):
        raise ValueError("pre-hook")

    model.register_forward_pre_hook(fail, prepend=True)  # runs before autocache's own
    outer = tether.autocache(Catching(model))
    first, second = outer(inputs(device))
    assert first is second


# --- nesting, idempotence, undo ---------------------------------------------------------------


def test_autocache_twice_registers_one_pair_of_hooks(device):
    model, counter = recurrent(device)
    tether.autocache(tether.autocache(model))
    assert len(model._forward_pre_hooks) == 1
    assert len(model._forward_hooks) == 1
    model(inputs(device))
    assert counter.calls == 1


def test_an_autocached_submodule_shares_the_cache_of_an_autocached_parent(device):
    model, counter = recurrent(device)
    tether.autocache(model.cell)
    parent = tether.autocache(nn.Sequential(model))
    parent(inputs(device))
    assert counter.calls == 1


def test_an_autocached_submodule_alone_caches_per_step(device):
    model, counter = recurrent(device)
    tether.autocache(model.cell)
    model(inputs(device))
    assert counter.calls == STEPS  # each cell call is its own call of the cell


def test_an_autocached_model_inside_cached_shares_the_block(device):
    model, counter = recurrent(device)
    tether.autocache(model)
    with tether.cached():
        model(inputs(device))
        model(inputs(device))
        inside = model.cell.weight_hh
    assert counter.calls == 1
    assert model.cell.weight_hh is not inside


def test_enabled_false_removes_the_hooks(device):
    model, counter = recurrent(device)
    tether.autocache(model)
    assert tether.autocache(model, enabled=False) is model
    assert not model._forward_pre_hooks
    assert not model._forward_hooks
    assert not model._forward_hooks_always_called
    model(inputs(device))
    assert counter.calls == STEPS


def test_enabled_false_keeps_other_hooks(device):
    model, _ = recurrent(device)
    seen: list[str] = []
    model.register_forward_pre_hook(lambda module, args: seen.append("pre"))
    tether.autocache(model)
    model.register_forward_hook(lambda module, args, out: seen.append("post"))
    tether.autocache(model, enabled=False)
    model(inputs(device))
    assert seen == ["pre", "post"]


def test_enabled_false_on_a_model_without_autocache_does_nothing(device):
    model, counter = recurrent(device)
    tether.autocache(model, enabled=False)
    model(inputs(device))
    assert counter.calls == STEPS


def test_autocache_needs_a_module():
    with pytest.raises(TypeError, match=r"autocache\(\) needs an nn.Module; got"):
        tether.autocache(lambda x: x)  # type: ignore[arg-type]


# --- threads ----------------------------------------------------------------------------------


class ReadsTwice(nn.Module):
    """Reads its weight, waits at a barrier shared by the callers, then reads it again."""

    def __init__(self, barrier: threading.Barrier, device: torch.device) -> None:
        super().__init__()
        self.layer = nn.Linear(N, N, device=device)
        self.barrier = barrier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.layer.weight
        self.barrier.wait(TIMEOUT)
        return first, self.layer.weight


def test_concurrent_calls_in_two_threads_each_cache_their_own_value(device):
    barrier = threading.Barrier(2)
    model = ReadsTwice(barrier, device)
    counter = counted(model, model.layer, "weight")
    tether.autocache(model)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def call(label: str) -> None:
        seen[label] = model(torch.randn(2, N, device=device))

    thread = threading.Thread(target=call, args=("other",))
    thread.start()
    call("main")
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert seen["main"][0] is seen["main"][1]
    assert seen["other"][0] is seen["other"][1]
    assert seen["main"][0] is not seen["other"][0]
    assert counter.calls == 2


# --- copies -----------------------------------------------------------------------------------


@pytest.mark.parametrize("roundtrip", list(ROUNDTRIPS))
def test_a_copy_of_an_autocached_model_caches_too(roundtrip, device):
    model, _ = recurrent(device)
    tether.autocache(model)
    clone = ROUNDTRIPS[roundtrip](model)
    assert isinstance(clone, Recurrent)
    counter = counter_of(clone)
    counter.calls = 0
    xs = inputs(device)
    torch.testing.assert_close(clone(xs), model(xs), rtol=0.0, atol=0.0)
    assert counter.calls == 1


@pytest.mark.parametrize("roundtrip", list(ROUNDTRIPS))
def test_autocache_can_be_removed_from_a_copy(roundtrip, device):
    model, _ = recurrent(device)
    clone = ROUNDTRIPS[roundtrip](tether.autocache(model))
    tether.autocache(clone, enabled=False)
    counter = counter_of(clone)
    counter.calls = 0
    clone(inputs(device))
    assert counter.calls == STEPS
