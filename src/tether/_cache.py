"""The cache behind :func:`tether.cached`, :func:`tether.autocache` and torch's ``cached()``.

Each thread that caches gets its own dictionary from parametrization lists to their computed
tensors, so one thread never reads a value another thread computed. Within it, a value is
stored per context (Note [The cache key]): a weight read under ``torch.no_grad()``, under
autocast or while a checkpointed segment is recomputed is computed again for that context, so
a cache only ever saves work and never changes a value or a gradient. Writes (assigning
``module.weight = X`` or loading a ``state_dict``) drop the stale entries from every live
cache, so a reader never sees a value older than the last write.

A thread caches inside :func:`cached` (and the calls of a model that :func:`tether.autocache`
wraps), and also while ``torch.nn.utils.parametrize.cached()`` is active (Note [torch's
cached()]).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from tether import _torch_compat

__all__ = [
    "active_threads",
    "cached",
    "enter",
    "enter_tracing",
    "invalidate",
    "leave",
    "leave_tracing",
    "lookup",
    "torch_parametrize",
    "torch_session",
    "tracing",
]

#: Number of threads currently inside ``cached()``; the property getter reads only this
#: module-level integer (and torch's flag, :func:`torch_session`) when no thread caches, so
#: the uncached path stays cheap.
active_threads = 0

# Note [The cache key]
#     A cached tensor is the parametrization's value together with the autograd graph that
#     leads back to the originals, and both depend on the context of the read: served in
#     another context, it would be wrong, silently. So each thread's cache stores a value
#     per (parametrization list, context), and the context is everything that changes the
#     value or its graph:
#
#     - grad mode: a value computed under ``torch.no_grad()`` (logging a norm, or the
#       forward of a reentrant checkpoint) has no graph; served to grad-mode code, the
#       originals would get no gradient;
#     - inference mode: an inference tensor cannot be saved for backward outside it;
#     - autocast, enabled and its dtype, for the device type of the originals: the value's
#       dtype (a bfloat16 weight read inside ``autocast(enabled=False)`` would not match the
#       float32 input);
#     - the backward pass running in this thread, and the node it runs: a reentrant
#       checkpoint (``use_reentrant=True``) recomputes its segment inside the backward pass,
#       from its own backward node, and at once backpropagates through what it recomputed,
#       freeing that graph. A weight served there from the forward (or from another segment)
#       would be backpropagated twice or through a freed graph. Keyed on the node, each
#       segment's recomputation computes the weight once for itself.
#
#     Reads under saved-tensor hooks are not cached at all. A non-reentrant checkpoint
#     (``use_reentrant=False``) runs its segment under such hooks: the forward records the
#     tensors that autograd saves, and the backward recomputes the segment and matches what
#     it saves to the forward's, by position. The recomputation must therefore evaluate the
#     parametrization exactly where the forward did, whether or not a cache is active when
#     the backward runs (usually it is not: autocache's call has returned). Evaluating at
#     every read, in both, is the one choice that always agrees. The hooks of
#     ``torch.autograd.graph.save_on_cpu`` cannot be told apart from a checkpoint's, so reads
#     under them are not cached either.
#
#     The backward position and the hooks are read from private functions of torch, looked
#     up once at import in tether._torch_compat; were one renamed, nothing is cached
#     (slower, never wrong), and tests/test_torch_compat.py fails.

# Note [torch's cached()]
#     ``torch.nn.utils.parametrize.cached()`` counts its nesting in the module-level integer
#     ``_cache_enabled`` and, when the outermost block exits, replaces its dictionary
#     ``_cache`` by a new one. While the count is positive, that dictionary therefore names
#     the current block: its session. tether honours the block by caching as inside its own
#     ``cached()``, with its own semantics (each thread caches on its own, writes drop stale
#     values, the key of Note [The cache key]). torch's flag is global, so every thread caches
#     while some thread is inside torch's block, as torch's own parametrizations do.
#
#     tether cannot see torch's block exit, so a thread's values remember their session and
#     are dropped when a read of that thread finds another session, or none: values from
#     one block are never served in the next, after an optimizer step. Until that read (or
#     the thread's end) they stay alive, with the old session's dictionary, as a tensor
#     returned by the block would. Both names are private to torch: :func:`torch_session`
#     reads them, guarded in tether._torch_compat, and a test fails if a later torch renames
#     them (tether then ignores torch's block).

_lock = threading.Lock()
# Bumped by every invalidation: a value computed while a write happened is not stored, so a
# reader never keeps a value computed from half-old data.
_writes = 0

#: What makes a read's value and graph what they are (Note [The cache key]): grad mode and
#: inference mode as ``grad + 2 * inference``, or a tuple when autocast or a backward pass
#: also counts.
Context = int | tuple[object, ...]


class _Values(dict[nn.Module, dict[Context, Tensor]]):
    """One thread's cached tensors, by parametrization list and then by context.

    ``session`` is the session of torch's ``cached()`` these values belong to, or None when
    they belong to tether's ``cached()`` only (Note [torch's cached()]).
    """

    def __init__(self, session: object | None) -> None:
        super().__init__()
        self.session = session


# The values of every thread that caches, by thread id; invalidate() drops entries from all.
# Weak: a thread's values die with the thread, including those a read left in a block of
# torch's cached() that ended meanwhile (Note [torch's cached()]).
_live: weakref.WeakValueDictionary[int, _Values] = weakref.WeakValueDictionary()


#: What the getter reads ``_cache_enabled`` from: one attribute read on the uncached path.
torch_parametrize: Any = _torch_compat.torch_parametrize


def torch_session() -> object | None:
    """The session of ``torch.nn.utils.parametrize.cached()`` now active, or None.

    Any object that stays the same within one outermost block of torch's ``cached()`` and
    differs between two blocks (Note [torch's cached()]). If a later torch renames the names
    read here, it returns None: tether then works without honouring torch's block.
    """
    owner = torch_parametrize
    return owner._cache if owner._cache_enabled else None


# Note [The cache under torch.compile]
#     Dynamo cannot trace the thread-local dictionaries and the lock above, so while it traces
#     a model that autocache wraps, the hooks enter a plain module-level dictionary instead,
#     from id(parametrization list) and the context to the tensor its first read in that
#     context put in the graph. The context is the part of Note [The cache key] that Dynamo
#     can read and that matters in a graph: grad mode and autocast (Dynamo cannot read
#     inference mode, and AOTAutograd, not the eager engine, runs the compiled backward).
#     Dynamo follows the reads and writes of that dictionary: every later read in the same
#     context returns the same node, the gradients of all the reads add up in the backward
#     graph, and the map's backward runs once per call and context (AOTAutograd's common
#     subexpression elimination would merge the repeated forwards, but not their backwards:
#     one per read). The hooks leave the dictionary at the
#     end of the traced forward, so nothing of it reaches the compiled code: the graph holds
#     one evaluation, and only the final None is written back. Compilation runs one frame at
#     a time, so no other thread traces into the dictionary meanwhile. Across a graph break
#     the dictionary is real between the two graphs: the second takes the weight the first
#     computed as an input (Dynamo warns, once when it compiles, that it read the .grad of a
#     non-leaf tensor), and an eager thread that sees it meanwhile only takes the path of
#     lookup below that ignores it. A model compiled without autocache, or inside cached(),
#     puts one evaluation in the graph per read.

#: While Dynamo traces an autocached model: the parametrized tensors computed so far.
tracing: dict[tuple[object, ...], Tensor] | None = None
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
    depth = 0  # nesting of tether's cached() (and autocached calls) in this thread
    values: _Values | None = None


_state = _ThreadState()


@contextlib.contextmanager
def cached() -> Iterator[None]:
    """Compute each parametrized tensor at most once per context inside the block.

    Reading ``module.weight`` twice inside ``cached()`` evaluates the parametrization once and
    returns the same tensor the second time, which saves work when a weight is used several
    times in a forward pass (an RNN cell applied at every step). The cache is dropped when the
    outermost block exits.

    The cache is keyed on the context of each read, so caching never changes a value or a
    gradient: a read under ``torch.no_grad()``, under ``torch.inference_mode()``, under
    autocast (per enabled state and dtype) or in a backward pass (a reentrant checkpoint's
    recomputation, per checkpointed segment) gets a value of its own, computed once for that
    context. Reads under saved-tensor hooks (a non-reentrant checkpoint's segment,
    ``save_on_cpu``) are not cached, so that a checkpoint recomputes exactly what it saved.

    Beyond ``torch.nn.utils.parametrize.cached``: blocks nest (the cache lives until the
    outermost one exits), each thread has its own cache, it also works as a decorator, and
    assigning ``module.weight = X`` or calling ``load_state_dict`` inside the block drops the
    stale value. Inside torch's ``cached()``, tether's parametrizations cache in the same way.

    Example:
        >>> import torch, tether
        >>> layer = tether.register_parametrization(torch.nn.Linear(3, 3), "weight", torch.tril)
        >>> with tether.cached():
        ...     layer.weight is layer.weight
        True
        >>> with tether.cached():
        ...     with torch.no_grad():
        ...         logged = layer.weight       # no graph: computed for no-grad reads only
        ...     layer.weight is logged           # grad mode: computed again, with its graph
        False
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


def _start(state: _ThreadState, session: object | None) -> _Values:
    """Give this thread a new, empty cache for ``session`` (None: tether's own block)."""
    values = _Values(session)
    with _lock:
        _live[threading.get_ident()] = values
    state.values = values
    return values


def _drop(state: _ThreadState) -> None:
    """Drop this thread's cache."""
    with _lock:
        _live.pop(threading.get_ident(), None)
    state.values = None


def enter() -> None:
    """Enter the cache in this thread, as ``with cached():`` does; pair with :func:`leave`.

    For code that cannot hold a ``with`` block open, such as a forward pre-hook and a forward
    hook (:func:`tether.autocache`). Every ``enter()`` must be matched by one ``leave()`` in the
    same thread, even when an exception is raised in between.
    """
    global active_threads
    state = _state
    if state.depth == 0:
        session = torch_session()
        values = state.values
        # Inside a block of torch's cached(), keep the values this thread cached in it.
        if values is None or values.session is not session:
            _start(state, session)
        with _lock:
            active_threads += 1
    state.depth += 1


def leave() -> None:
    """Leave the cache entered by :func:`enter`; the outermost exit drops the cached values.

    Unless the values belong to a block of torch's ``cached()`` that is still active: then
    they live on until that block ends (Note [torch's cached()]).
    """
    global active_threads
    state = _state
    state.depth -= 1
    if state.depth == 0:
        with _lock:
            active_threads -= 1
        values = state.values
        if values is None or values.session is None or values.session is not torch_session():
            _drop(state)


def _device_type(plist: nn.Module) -> str:
    """The device type of ``plist``'s originals (``tensor.device`` is slow to build)."""
    for tensors in (plist._parameters, plist._buffers):
        for tensor in tensors.values():
            if tensor is not None:
                return "cpu" if tensor.is_cpu else "cuda" if tensor.is_cuda else tensor.device.type
    return "cpu"


_autocast_devices: dict[str, bool] = {}


def _autocast(device_type: str) -> object:
    """Autocast's state for ``device_type``: its dtype when enabled, else False."""
    available = _autocast_devices.get(device_type)
    if available is None:  # e.g. "meta" has no autocast, and asking would raise
        available = _autocast_devices[device_type] = torch.amp.is_autocast_available(device_type)
    if not available:
        return False
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)


# Private to torch, guarded in tether._torch_compat (Note [The cache key]); bound to names
# of this module because lookup() is the path of every cached read.
_saved_tensors_hooks = _torch_compat.saved_tensors_hooks
_graph_task_id = _torch_compat.graph_task_id
_autograd_node = _torch_compat.autograd_node
_any_autocast = _torch_compat.any_autocast_enabled
#: Whether this torch has the first three; if not, nothing is cached rather than risk a wrong
#: key (without the fourth, the per-device query answers instead).
keyable = _torch_compat.has_autograd_state
_grad_enabled = torch.is_grad_enabled
_inference_mode = torch.is_inference_mode_enabled


def lookup(plist: nn.Module) -> Tensor:
    """Return the cached value of ``plist`` for this thread and context, computing it on a miss."""
    if torch.compiler.is_compiling():
        # The thread's dictionary and lock would break the graph: the traced cache of an
        # autocached model instead, or (a model compiled inside cached()) one evaluation per
        # read (Note [The cache under torch.compile]).
        traced = tracing
        if traced is None:
            return plist.forward()
        key = (id(plist), torch.is_grad_enabled(), _autocast(_device_type(plist)))
        if key not in traced:
            traced[key] = plist.forward()
        return traced[key]
    state = _state
    values = state.values
    if state.depth == 0:  # not inside tether's cached(): inside torch's, or not caching
        session = torch_session()
        if session is None:
            if values is not None:  # left from a block of torch's cached() that has ended
                _drop(state)
            return plist.forward()
        if values is None or values.session is not session:
            values = _start(state, session)
    # The key of this read (Note [The cache key]). This is the path of every cached read,
    # hence the functions bound to module names, and a small int for the common case.
    if not keyable or values is None or _saved_tensors_hooks(False) is not None:
        return plist.forward()  # under saved-tensor hooks: never cached
    task = _graph_task_id()  # -1 outside a backward pass
    context: Context
    if task == -1 and not _any_autocast():
        context = _grad_enabled() + 2 * _inference_mode()
    else:
        node = None if task == -1 else _autograd_node()
        autocast = _autocast(_device_type(plist))
        context = (_grad_enabled(), _inference_mode(), autocast, task, node)
    entries = values.get(plist)
    if entries is not None:
        tensor = entries.get(context)
        if tensor is not None:
            return tensor
    writes = _writes
    tensor = plist.forward()
    with _lock:
        if writes == _writes:
            values.setdefault(plist, {})[context] = tensor
    return tensor


def invalidate(plist: nn.Module) -> None:
    """Drop ``plist`` from every thread's cache, in every context (its value changed)."""
    global _writes
    if _live:
        with _lock:
            _writes += 1
            for values in _live.values():
                values.pop(plist, None)
