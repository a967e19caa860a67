"""The ``Parametrized<Base>`` classes: one shared class per (base class, parametrized names).

A parametrized module keeps its own class as a base and gains a property per parametrized
tensor, like in ``torch.nn.utils.parametrize``. Unlike there, the class is shared by every
module with the same base class and the same parametrized names, so two parametrized
``Linear`` layers have the same type (ensembles with ``torch.func.stack_module_state`` work),
registering and removing in a loop creates no new classes, and the class can be rebuilt when
unpickling, so parametrized models pickle, deepcopy and ``torch.save`` whole.

Note [Shared classes and torch's parametrize]
    ``torch.nn.utils.parametrize`` edits ``module.__class__`` in place: it adds a property when
    it registers and deletes it when it removes. On a shared class that would change every
    module of the class. The metaclass below turns those edits into no-ops that are correct
    for all modules: every property here dispatches on the instance, serving its
    parametrization when the instance has one and the plain attribute otherwise. So torch's
    own ``register_parametrization`` and ``remove_parametrizations`` (and everything built on
    them, such as ``torch.nn.utils.parametrizations.orthogonal``) still work on modules that
    tether parametrized.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tether import _cache, _loading, _reset, _serving
from tether._checks import not_scriptable, parameter_assigned, tensor_label
from tether._parametrization_list import plists_of

__all__ = ["is_shared_class", "parametrized_class"]

_lock = threading.Lock()

# Lookups tried, in order, for an attribute that a parametrized module does not have: each
# takes (module, name) and returns the value or raises AttributeError. The mechanism knows
# nothing of them; tether.prune adds one that serves torch's ``<name>_mask`` and ``<name>_orig``.
attribute_fallbacks: list[Callable[[nn.Module, str], Any]] = []
_classes: weakref.WeakValueDictionary[tuple[type, frozenset[str]], type] = (
    weakref.WeakValueDictionary()
)


def is_shared_class(cls: type) -> bool:
    """Whether ``cls`` is one of tether's ``Parametrized<Base>`` classes."""
    return bool(cls.__dict__.get("_tether_shared", False))


def parametrized_class(base: type, names: frozenset[str]) -> type:
    """Return the shared ``Parametrized<Base>`` class with properties for ``names``."""
    key = (base, names)
    cls = _classes.get(key)
    if cls is None:
        with _lock:
            cls = _classes.get(key)
            if cls is None:
                cls = _make_class(base, names)
                _classes[key] = cls
    return cls


def _make_class(base: type, names: frozenset[str]) -> type:
    namespace: dict[str, Any] = {name: _tensor_property(name) for name in sorted(names)}
    namespace.update(
        __module__="tether.parametrize",
        __qualname__=f"Parametrized{base.__name__}",
        _tether_shared=True,
        _tether_names=names,
        _tether_base=base,
        __reduce_ex__=_reduce_ex,
        register_parameter=_register_parameter,
        register_buffer=_register_buffer,
        __setattr__=_setattr,
        __getattr__=_getattr,
        _tether_base_getattr=getattr(base, "__getattr__"),  # noqa: B009  # typed as absent on type
        _load_from_state_dict=_load_from_state_dict,
        __prepare_scriptable__=_prepare_scriptable,
    )
    if callable(getattr(base, "reset_parameters", None)):
        namespace["reset_parameters"] = _reset.reset_parameters
    meta = _metaclass_for(type(base))
    cls: type = meta(f"Parametrized{base.__name__}", (base,), namespace)
    return cls


class _SharedClassMeta(type):
    """Keeps shared classes valid when code edits them in place (Note [Shared classes...])."""

    def __setattr__(cls, name: str, value: Any) -> None:
        if is_shared_class(cls) and isinstance(value, property):
            value = _tensor_property(name)
        super().__setattr__(name, value)

    def __delattr__(cls, name: str) -> None:
        if is_shared_class(cls) and isinstance(cls.__dict__.get(name), property):
            return  # other modules of this class may still use it; it dispatches per instance
        super().__delattr__(name)


@functools.cache
def _metaclass_for(meta: type) -> type:
    if meta is type:
        return _SharedClassMeta
    return type(f"Shared{meta.__name__}", (_SharedClassMeta, meta), {})


def _tensor_property(name: str) -> property:
    def get_parametrized(self: nn.Module) -> Any:
        try:
            plist = self.__dict__["_modules"]["parametrizations"]._modules[name]
        except KeyError:
            return _plain_get(self, name)
        # Some thread in tether's cached(), a traced autocached call, or torch's cached()
        # (Note [torch's cached()] in _cache.py): three cheap reads on the uncached path.
        if (
            _cache.active_threads
            or _cache.tracing is not None
            or _cache.torch_parametrize._cache_enabled
        ):
            return _cache.lookup(plist)
        return plist.forward()

    def set_original(self: nn.Module, value: Tensor) -> None:
        plist = plists_of(self).get(name)
        if plist is None:
            self.__dict__[name] = value
        # Note [functional_call on a parametrized name]: torch.func.functional_call's swaps
        # serve the value as given; every other assignment goes through right_inverse.
        elif not _serving.swap_from_functional_call(plist, value):
            plist.right_inverse(value)

    def delete(self: nn.Module) -> None:
        if name in self.__dict__:
            del self.__dict__[name]
            return
        raise AttributeError(
            f"Cannot delete {tensor_label(self, name)}: it is parametrized. Use "
            f"tether.remove_parametrizations(module, {name!r}) to remove the parametrization."
        )

    return property(get_parametrized, set_original, delete, f"The parametrized {name!r}.")


def _base(module: nn.Module) -> Any:
    """The class ``module`` had before it was parametrized.

    Stored on the shared class rather than read as ``__bases__[0]``: FSDP2's ``fully_shard``
    subclasses a module's class again, with its own class first.
    """
    cls: Any = type(module)
    return cls._tether_base


def _plain_get(module: nn.Module, name: str) -> Any:
    """What attribute lookup gives when ``name`` is not parametrized on this instance."""
    try:
        return module.__dict__[name]
    except KeyError:
        return nn.Module.__getattr__(module, name)


def _setattr(self: nn.Module, name: str, value: Any) -> None:
    # Note [Assigning a Parameter to a parametrized name]
    #     ``layer.weight = nn.Parameter(W)`` asks for ``W`` itself to become the trained tensor
    #     (weight tying, ``fuse_linear_bn_eval``), which a parametrized name cannot be: going
    #     through ``right_inverse`` would copy ``W`` once and then train apart from it. PyTorch
    #     raises ``KeyError`` ("attribute already exists"); so does tether, saying what to do.
    if isinstance(value, nn.Parameter) and name in plists_of(self):
        raise parameter_assigned(self, name)
    base = _base(self)
    base.__setattr__(self, name, value)


def _getattr(self: nn.Module, name: str) -> Any:
    # Called when normal lookup fails, as for every parameter, buffer and submodule, which the
    # base class's __getattr__ (nn.Module's) finds; the fallbacks run only after that failed.
    try:
        return type(self)._tether_base_getattr(self, name)  # type: ignore[attr-defined]  # set in _make_class
    except AttributeError as missing:
        for fallback in attribute_fallbacks:
            try:
                return fallback(self, name)
            except AttributeError:
                continue
        raise missing


def _resync_class(module: nn.Module) -> None:
    """After torch's ``remove_parametrizations`` dropped a tensor, use the class that fits.

    torch removes a parametrization and then re-registers the plain tensor; when others remain
    it keeps the module's class, which here is shared and names the removed tensor too.
    """
    names = frozenset(plists_of(module))
    cls: Any = type(module)
    if names and names != cls._tether_names:
        module.__class__ = parametrized_class(_base(module), names)


def _register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _resync_class(self)
    base = _base(self)
    base.register_parameter(self, name, param)


def _register_buffer(
    self: nn.Module, name: str, tensor: Tensor | None, persistent: bool = True
) -> None:
    _resync_class(self)
    base = _base(self)
    base.register_buffer(self, name, tensor, persistent)


def _prepare_scriptable(self: nn.Module) -> nn.Module:
    """Refuse ``torch.jit.script`` with the alternatives (Note [TorchScript])."""
    name = next(iter(plists_of(self)), None)
    if name is None:  # the shared class, after torch's remove_parametrizations emptied it
        return self
    raise not_scriptable(self, tensor_label(self, name))


def _rebuild(base: type, names: tuple[str, ...]) -> nn.Module:
    """Unpickling entry point: an empty instance of the shared class for ``(base, names)``."""
    cls = parametrized_class(base, frozenset(names))
    module: nn.Module = object.__new__(cls)
    return module


def _reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    names = tuple(plists_of(self))
    # Without grad, a base class whose __getstate__ reads parametrized tensors (RNNs cache
    # their weights) stores plain leaves, which pickle and deepcopy accept.
    with torch.no_grad():
        state = self.__getstate__()  # type: ignore[no-untyped-call]  # untyped in torch
    return (_rebuild, (_base(self), names), state)


def _load_from_state_dict(
    self: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Accept plain checkpoints, and load the module all or nothing (see ``tether._loading``)."""
    assign = bool(local_metadata.get("assign_to_params_buffers"))
    _loading.prepare(self, state_dict, prefix, assign, error_msgs)
    base = _base(self)
    base._load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    )
