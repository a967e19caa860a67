"""``autocache``: compute each parametrized tensor of a model once per call of the model."""

from __future__ import annotations

import sys
import threading
from types import FrameType
from typing import Any, TypeVar

import torch
from torch import nn

from tether import _cache
from tether._checks import describe
from tether._torch_compat import forward_hooks, forward_hooks_always_called, forward_pre_hooks

__all__ = ["autocache"]

M = TypeVar("M", bound=nn.Module)

# Note [autocache hooks]
#     ``autocache`` registers two module-level functions on the model: a forward pre-hook
#     that enters tether's cache and a forward hook, with ``always_call=True``, that leaves
#     it, so the cache is left when ``forward`` raises too. Plain functions (no closures, no
#     handles stored on the model) keep the model picklable and deep-copyable, and let
#     ``autocache`` find its own hooks again to stay idempotent and to remove them.
#
#     Each thread keeps a stack of the calls it entered, as ``(module, frame)`` pairs, where
#     ``frame`` is the frame that ran the pre-hook (the module's call machinery, alive until
#     the call returns). The forward hook pops the entry of its own module only, so a call
#     whose pre-hook did not run (another pre-hook raised first) leaves nothing unbalanced.
#     ``always_call`` covers ``Exception`` only: a ``KeyboardInterrupt`` inside ``forward``
#     skips the forward hook and would leave the cache open, serving stale weights after the
#     next optimizer step. So before entering, a pre-hook that finds entries whose frames are
#     no longer on the call stack leaves the cache once for each of them. (Between the
#     interrupt and that next call, reads in the thread are still cached.) The check walks
#     the stack only when an entry is open, i.e. for nested autocached modules.
#
#     The hooks decide when the cache is open; what it stores, and per which context of a
#     read (grad mode, autocast, a checkpoint's recomputation...), is the cache's business
#     (Note [The cache key] in _cache.py): a weight read under ``torch.no_grad()`` inside the
#     forward is computed once more for the grad-mode reads. A reentrant checkpoint inside
#     the model recomputes its segment during the backward pass, after the call returned:
#     then nothing is cached, unless the segment is itself an autocached module.
#
#     Under ``torch.compile`` Dynamo inlines both hooks into the graph, where touching
#     thread-local state would break it: they open and close a plain dictionary that Dynamo
#     can follow instead (Note [The cache under torch.compile] in _cache.py), so the graph
#     computes each weight once and runs its backward once, whatever the backend.


class _Calls(threading.local):
    def __init__(self) -> None:
        self.open: list[tuple[nn.Module, FrameType]] = []


_calls = _Calls()


def _on_stack(frame: FrameType, start: FrameType | None) -> bool:
    while start is not None:
        if start is frame:
            return True
        start = start.f_back
    return False


def _enter(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: enter the cache for this call (Note [autocache hooks])."""
    if torch.compiler.is_compiling():
        _cache.enter_tracing(module)
        return
    caller = sys._getframe(1)
    calls = _calls.open
    while calls and not _on_stack(calls[-1][1], caller):
        calls.pop()  # left open by an interrupted call
        _cache.leave()
    _cache.enter()
    calls.append((module, caller))


def _leave(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook, also run when ``forward`` raises: leave the cache this call entered."""
    if torch.compiler.is_compiling():
        _cache.leave_tracing(module)
        return
    calls = _calls.open
    if calls and calls[-1][0] is module:
        calls.pop()
        _cache.leave()


def _has_hooks(model: nn.Module) -> bool:
    return any(hook is _enter for hook in forward_pre_hooks(model).values())


def autocache(model: M, enabled: bool = True) -> M:
    """Compute every parametrized tensor inside ``model`` at most once per call of ``model``.

    Each call ``model(...)`` runs as if inside :func:`tether.cached`: the first read of a
    parametrized tensor (of ``model`` or of any module it calls) evaluates the
    parametrization, later reads in the same call return the same tensor, and the next call
    computes it again, so the values after an optimizer step are used. Forward and backward
    give the same results as without caching; what changes is the work: a recurrent cell
    that reads its orthogonal kernel at each of ``T`` steps computes it once instead of
    ``T`` times, in the forward and in the backward pass.

    As in :func:`tether.cached`, the cache is keyed on the context of each read: grad mode,
    inference mode, autocast (enabled and dtype) and the backward pass (a reentrant
    checkpoint's recomputation). A weight read under ``torch.no_grad()`` to log its norm, or
    under bfloat16 autocast, is computed once for that context and once for the others;
    reads inside a non-reentrant checkpoint (under saved-tensor hooks) are not cached, so
    that the checkpoint recomputes exactly what it saved. No cached value changes a result.

    It works by registering a forward pre-hook and a forward hook on ``model`` (the cache is
    left even when ``forward`` raises). It is idempotent, it nests (an autocached submodule
    inside an autocached model shares the outer call's cache), each thread caches on its
    own, the model still pickles and deep-copies, and under ``torch.compile`` it adds no
    graph break: the compiled graph computes each weight once and runs its backward once.
    ``autocache(model, enabled=False)`` removes the hooks.

    Prefer ``autocache`` when a whole model should cache on every call; use
    ``with tether.cached():`` to cache a block of code that calls several models, or a
    training step (forward and a second forward, e.g. for a regulariser) as one unit.

    Args:
        model: the module whose calls should cache; it need not be parametrized itself.
        enabled: ``False`` removes the caching hooks that ``autocache`` added to ``model``
            (nothing happens if there are none).

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch, tether
        >>> cell = tether.orthogonal(torch.nn.RNNCell(4, 4), "weight_hh")
        >>> class Unrolled(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.cell = cell
        ...     def forward(self, xs):
        ...         h = torch.zeros(xs.shape[1], 4)
        ...         for x in xs:                    # reads cell.weight_hh at every step
        ...             h = self.cell(x, h)
        ...         return h
        >>> model = tether.autocache(Unrolled())  # the kernel is computed once per call
        >>> model(torch.randn(10, 2, 4)).shape
        torch.Size([2, 4])
        >>> model = tether.autocache(model, enabled=False)  # back to computing it per read
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"autocache() needs an nn.Module; got {describe(model)}.")
    if enabled:
        if not _has_hooks(model):
            model.register_forward_pre_hook(_enter, prepend=True)
            model.register_forward_hook(_leave, always_call=True)
        return model
    pre_hooks, hooks = forward_pre_hooks(model), forward_hooks(model)
    for key in [k for k, hook in pre_hooks.items() if hook is _enter]:
        del pre_hooks[key]
    for key in [k for k, hook in hooks.items() if hook is _leave]:
        del hooks[key]
        forward_hooks_always_called(model).pop(key, None)
    return model
