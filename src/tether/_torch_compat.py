"""Every private name of PyTorch that tether uses, looked up once here and guarded.

PyTorch may rename or remove a private name in any release. Each one is looked up at import
with :func:`_find`, so a missing name never makes ``import tether`` fail: it degrades to the
fallback documented next to it (slower, or a feature tether then leaves to PyTorch's own
behaviour, never a wrong value). ``tests/test_torch_compat.py`` fails, naming the name, as
soon as a release drops one of :data:`NAMES` or :data:`ATTRIBUTES`; follow the rename here.

Besides the names below, tether reads a few private attributes of torch's objects on each
instance (:data:`ATTRIBUTES`): ``nn.Module``'s storage dictionaries, which every library that
subclasses ``nn.Module`` relies on and which the property getter reads on its hot path, and
``Tensor._version``. They cannot be looked up once; the same test checks that they exist.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import CodeType, ModuleType
from typing import Any

import torch
import torch.nn.utils.parametrize as _torch_parametrize
from torch import Tensor, nn

__all__ = [
    "ATTRIBUTES",
    "NAMES",
    "any_autocast_enabled",
    "autograd_node",
    "exists",
    "forward_hooks",
    "forward_hooks_always_called",
    "forward_pre_hooks",
    "graph_task_id",
    "has_autograd_state",
    "hook_function",
    "is_functorch_wrapped_tensor",
    "is_traceable_wrapper_subclass",
    "load_state_dict_pre_hooks",
    "reparametrize_module_code",
    "resolve",
    "saved_tensors_hooks",
    "swap_tensors_dict_code",
    "torch_parametrize",
    "weight_norm",
]

#: The private names looked up below, each as ``torch.<path>``.
NAMES: list[str] = []


_MISSING = object()


def resolve(path: str) -> Any:
    """The object at ``path`` (``"torch.a.b"``), importing submodules on the way.

    A private sentinel, never an error, when this torch has no such name.
    """
    owner: Any = torch
    for name in path.split(".")[1:]:
        found = getattr(owner, name, _MISSING)
        if found is _MISSING and isinstance(owner, ModuleType):
            try:
                found = importlib.import_module(f"{owner.__name__}.{name}")
            except ImportError:
                return _MISSING
        if found is _MISSING:
            return _MISSING
        owner = found
    return owner


def exists(path: str) -> bool:
    """Whether this torch has the name at ``path`` (``"torch.a.b"``)."""
    return resolve(path) is not _MISSING


def _find(path: str) -> Any:
    """The object at ``path``, recorded in :data:`NAMES`; None if this torch has none."""
    NAMES.append(path)
    found = resolve(path)
    return None if found is _MISSING else found


def _function(path: str, fallback: Callable[..., Any]) -> Callable[..., Any]:
    found = _find(path)
    return found if callable(found) else fallback


def _absent(*args: object) -> None:
    """Stands for a private function of torch that this torch does not have."""


# The cache key (Note [The cache key] in _cache.py): the saved-tensor hooks in force, the
# backward pass running in this thread and the node it runs. Without any one of them the
# cache cannot tell its contexts apart, so nothing is cached (has_autograd_state is False).
saved_tensors_hooks = _function("torch._C._autograd._top_saved_tensors_default_hooks", _absent)
graph_task_id = _function("torch._C._current_graph_task_id", _absent)
autograd_node = _function("torch._C._current_autograd_node", _absent)
#: Whether this torch has the three functions above.
has_autograd_state = _absent not in (saved_tensors_hooks, graph_task_id, autograd_node)


def _maybe_autocast() -> bool:
    """Stands for ``_is_any_autocast_enabled``: "maybe", so callers ask per device type."""
    return True


# Whether autocast is on for any device type: one call, about ten times cheaper than the
# per-device query, for the cache key and tether.functional.autocast_enabled. Without it,
# both ask torch's public per-device functions on every call (slower, same answers).
any_autocast_enabled = _function("torch._C._is_any_autocast_enabled", _maybe_autocast)


def _maybe_wrapped(value: Tensor) -> bool:
    """Stands for ``is_functorch_wrapped_tensor``: "maybe", so values are not read."""
    return True


# Whether a tensor is a torch.func wrapper (under vmap or grad), whose values cannot be read:
# the finiteness checks of _checks.py skip those. Without it, they skip every tensor (no
# check, never an error).
is_functorch_wrapped_tensor = _function(
    "torch._C._functorch.is_functorch_wrapped_tensor", _maybe_wrapped
)


def _has_flatten_protocol(value: object) -> bool:
    """Stands for ``is_traceable_wrapper_subclass``: a subclass with flatten and unflatten."""
    return (
        isinstance(value, Tensor)
        and type(value) is not Tensor
        and hasattr(value, "__tensor_flatten__")
        and hasattr(type(value), "__tensor_unflatten__")
    )


# Whether an original is a tensor subclass (DTensor, ...) that must be given new data with
# torch.utils.swap_tensors rather than set_() (ParametrizationList). Without it, a test of
# the same protocol written here.
is_traceable_wrapper_subclass = _function(
    "torch.utils._python_dispatch.is_traceable_wrapper_subclass", _has_flatten_protocol
)


def _weight_norm_composite(v: Tensor, g: Tensor, dim: int) -> Tensor:
    """Stands for ``torch._weight_norm``: the same formula in public operations."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


# Weight normalization g * v / ||v|| as one operator (tether.functional.weight_normalize),
# the one torch's weight_norm calls, so that values match torch's bit for bit. Without it,
# the same formula in public operations (equal up to rounding).
weight_norm = _function("torch._weight_norm", _weight_norm_composite)


def _code(function: Any) -> CodeType | None:
    code = getattr(function, "__code__", None)
    return code if isinstance(code, CodeType) else None


# The code objects of functional_call's swapping functions, recognised on the stack
# (Note [functional_call on a parametrized name] in _serving.py). Without either,
# functional_call assigns through right_inverse, as torch's own parametrize does.
swap_tensors_dict_code = _code(
    _find("torch.nn.utils._named_member_accessor.NamedMemberAccessor.swap_tensors_dict")
)
reparametrize_module_code = _code(
    _find("torch.nn.utils.stateless._reparametrize_module.__wrapped__")
)


class _WithoutTorchCache:
    """Stands for ``torch.nn.utils.parametrize`` in a torch without the names of Note
    [torch's cached()]: its ``cached()`` is then never seen as active."""

    _cache_enabled = 0
    _cache = None


def _torch_flags(module: Any) -> Any:
    """``module`` if it has the names of Note [torch's cached()], else a stand-in."""
    if hasattr(module, "_cache_enabled") and hasattr(module, "_cache"):
        return module
    return _WithoutTorchCache


NAMES += ["torch.nn.utils.parametrize._cache_enabled", "torch.nn.utils.parametrize._cache"]
#: Where the getter reads the nesting count ``_cache_enabled`` of torch's ``cached()`` and
#: its dictionary ``_cache`` (Note [torch's cached()] in _cache.py). Without them, a
#: stand-in whose ``cached()`` is never active: tether ignores torch's block.
torch_parametrize: Any = _torch_flags(_torch_parametrize)


def _hooks(attribute: str) -> Callable[[nn.Module], dict[int, Any]]:
    def hooks(module: nn.Module) -> dict[int, Any]:
        found: dict[int, Any] | None = module.__dict__.get(attribute)
        return {} if found is None else found

    hooks.__doc__ = f"``module.{attribute}``, or a new empty dict if this torch has none."
    return hooks


# torch keeps a module's hooks in private dicts, by handle id, and offers no lookup. tether
# finds its own hooks there to register them once and to remove them (tether.autocache with
# enabled=False, tether.prune's loader of torch's pruned checkpoints). Without a dict, an
# empty one: the hooks are then registered again on each call and never removed (each pair
# of autocache hooks nests harmlessly; the prune loader renames nothing on modules it no
# longer prunes).
forward_pre_hooks = _hooks("_forward_pre_hooks")
forward_hooks = _hooks("_forward_hooks")
forward_hooks_always_called = _hooks("_forward_hooks_always_called")
load_state_dict_pre_hooks = _hooks("_load_state_dict_pre_hooks")


def hook_function(entry: object) -> object:
    """The function registered as a load_state_dict pre-hook, from its entry in the dict.

    torch wraps each such hook in an object whose ``hook`` attribute is the function; without
    it, None (the hook is then not recognised, see the note on the hook dicts).
    """
    return getattr(entry, "hook", None)


#: Private attributes of torch's objects that tether reads or writes on instances, by the
#: torch class (or, for ``_metadata``, the ``state_dict()`` result) that carries them.
ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("torch.nn.Module", "_parameters"),
    ("torch.nn.Module", "_buffers"),
    ("torch.nn.Module", "_modules"),
    ("torch.nn.Module", "_non_persistent_buffers_set"),
    ("torch.nn.Module", "_forward_pre_hooks"),
    ("torch.nn.Module", "_forward_hooks"),
    ("torch.nn.Module", "_forward_hooks_always_called"),
    ("torch.nn.Module", "_load_state_dict_pre_hooks"),
    ("torch.nn.Module", "_load_from_state_dict"),
    ("torch.nn.Module.state_dict()", "_metadata"),
    ("torch.Tensor", "_version"),
)
