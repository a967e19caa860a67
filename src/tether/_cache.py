"""The cache behind :func:`tether.cached`: reentrant, thread-local, and invalidated on writes.

Each thread that enters :func:`cached` gets its own dictionary from parametrization lists to
their computed tensors, so one thread never reads a value another thread computed. Writes
(assigning ``module.weight = X`` or loading a ``state_dict``) drop the stale entry from every
live cache, so a reader inside ``cached()`` never sees a value older than the last write.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "active_threads",
    "cached",
    "enter",
    "enter_tracing",
    "invalidate",
    "leave",
    "leave_tracing",
    "lookup",
    "tracing",
]

#: Number of threads currently inside ``cached()``; the property getter reads only this
#: module-level integer when no thread caches, so the uncached path stays cheap.
active_threads = 0

_lock = threading.Lock()
_live: dict[int, dict[nn.Module, Tensor]] = {}
# Bumped by every invalidation: a value computed while a write happened is not stored, so a
# reader never keeps a value computed from half-old data.
_writes = 0


# Note [The cache under torch.compile]
#     Dynamo cannot trace the thread-local dictionaries and the lock above, so while it traces
#     a model that autocache wraps, the hooks enter a plain module-level dictionary instead,
#     from id(parametrization list) to the tensor its first read put in the graph. Dynamo
#     follows the reads and writes of that dictionary: every later read returns the same node,
#     the gradients of all the reads add up in the backward graph, and the map's backward runs
#     once per call (AOTAutograd's common subexpression elimination would merge the repeated
#     forwards, but not their backwards: one per read). The hooks leave the dictionary at the
#     end of the traced forward, so nothing of it reaches the compiled code: the graph holds
#     one evaluation, and only the final None is written back. Compilation runs one frame at
#     a time, so no other thread traces into the dictionary meanwhile. Across a graph break
#     the dictionary is real between the two graphs: the second takes the weight the first
#     computed as an input (Dynamo warns, once when it compiles, that it read the .grad of a
#     non-leaf tensor), and an eager thread that sees it meanwhile only takes the path of
#     lookup below that ignores it. A model compiled without autocache, or inside cached(),
#     puts one evaluation in the graph per read.

#: While Dynamo traces an autocached model: the parametrized tensors computed so far.
tracing: dict[int, Tensor] | None = None
# The autocached module whose call opened ``tracing``: nested ones share it.
_tracing_owner: nn.Module | None = None


def enter_tracing(module: nn.Module) -> None:
    """Open the traced cache for a call of ``module`` unless an outer call has (Note [The
    cache under torch.compile]); pair with :func:`leave_tracing`. Only while compiling."""
    global tracing, _tracing_owner
    # Left open by a trace that failed (an export that raised): start afresh.
    if tracing is None or _tracing_owner is module:
        tracing = {}
        _tracing_owner = module


def leave_tracing(module: nn.Module) -> None:
    """Close the traced cache if the call of ``module`` opened it."""
    global tracing, _tracing_owner
    if _tracing_owner is module:
        tracing = None
        _tracing_owner = None


class _ThreadState(threading.local):
    depth = 0
    values: dict[nn.Module, Tensor] | None = None


_state = _ThreadState()


@contextlib.contextmanager
def cached() -> Iterator[None]:
    """Compute each parametrized tensor at most once inside the block.

    Reading ``module.weight`` twice inside ``cached()`` evaluates the parametrization once and
    returns the same tensor the second time, which saves work when a weight is used several
    times in a forward pass (an RNN cell applied at every step). The cache is dropped when the
    outermost block exits.

    Beyond ``torch.nn.utils.parametrize.cached``: blocks nest (the cache lives until the
    outermost one exits), each thread has its own cache, it also works as a decorator, and
    assigning ``module.weight = X`` or calling ``load_state_dict`` inside the block drops the
    stale value.

    Example:
        >>> import torch, tether
        >>> layer = tether.register_parametrization(torch.nn.Linear(3, 3), "weight", torch.tril)
        >>> with tether.cached():
        ...     layer.weight is layer.weight
        True
        >>> @tether.cached()
        ... def twice(x):
        ...     return layer(layer(x))
        >>> twice(torch.ones(1, 3)).shape
        torch.Size([1, 3])
    """
    enter()
    try:
        yield
    finally:
        leave()


def enter() -> None:
    """Enter the cache in this thread, as ``with cached():`` does; pair with :func:`leave`.

    For code that cannot hold a ``with`` block open, such as a forward pre-hook and a forward
    hook (:func:`tether.autocache`). Every ``enter()`` must be matched by one ``leave()`` in the
    same thread, even when an exception is raised in between.
    """
    global active_threads
    state = _state
    if state.depth == 0:
        values: dict[nn.Module, Tensor] = {}
        with _lock:
            _live[threading.get_ident()] = values
            active_threads += 1
        state.values = values
    state.depth += 1


def leave() -> None:
    """Leave the cache entered by :func:`enter`; the outermost exit drops the cached values."""
    global active_threads
    state = _state
    state.depth -= 1
    if state.depth == 0:
        with _lock:
            _live.pop(threading.get_ident(), None)
            active_threads -= 1
        state.values = None


def lookup(plist: nn.Module) -> Tensor:
    """Return the cached value of ``plist`` for this thread, computing it on a miss."""
    if torch.compiler.is_compiling():
        # The thread's dictionary and lock would break the graph: the traced cache of an
        # autocached model instead, or (a model compiled inside cached()) one evaluation per
        # read (Note [The cache under torch.compile]).
        traced = tracing
        if traced is None:
            return plist.forward()
        key = id(plist)
        if key not in traced:
            traced[key] = plist.forward()
        return traced[key]
    values = _state.values
    tensor: Tensor | None = None if values is None else values.get(plist)
    if tensor is None:
        writes = _writes
        tensor = plist.forward()
        if values is not None:  # None: another thread is caching, this one is not
            with _lock:
                if writes == _writes:
                    values[plist] = tensor
    return tensor


def invalidate(plist: nn.Module) -> None:
    """Drop ``plist`` from every thread's cache (its value changed)."""
    global _writes
    if active_threads:
        with _lock:
            _writes += 1
            for values in _live.values():
                values.pop(plist, None)
