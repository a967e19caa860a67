"""The mechanism: a drop-in, API-compatible superset of ``torch.nn.utils.parametrize``.

``import tether.parametrize as parametrize`` replaces ``torch.nn.utils.parametrize``: the same
functions, signatures, defaults, attribute layout (``Parametrized<Base>`` classes,
``module.parametrizations[name].original``) and ``state_dict`` keys, so checkpoints move both
ways. What tether adds: parametrized models pickle and deepcopy, one class per kind of
parametrized module, a thread-safe reentrant :func:`cached`, atomic registration, plain
callables as parametrizations, plain checkpoints loading through ``right_inverse``, and error
messages that name the module, the tensor and the fix.

Where behaviour differs from PyTorch's (besides those additions): reading a parametrized
tensor calls each parametrization's ``forward`` directly, so forward hooks (and pre-hooks)
registered on parametrization modules do not run; error messages are worded differently
(mostly the same exception types); a parametrization appended to a chain runs its
``right_inverse`` on the chain's value before its ``forward`` (so that a base point or
power-iteration vectors start from that value); and :func:`chains` gives read-only access to a
module's chains. ``docs/migration.md`` lists every difference.

Example:
    >>> import torch
    >>> import tether.parametrize as parametrize
    >>> class Symmetric(torch.nn.Module):
    ...     def forward(self, X):
    ...         return X.triu() + X.triu(1).mT
    >>> layer = parametrize.register_parametrization(torch.nn.Linear(3, 3), "weight", Symmetric())
    >>> torch.equal(layer.weight, layer.weight.T)
    True
    >>> type(layer).__name__, list(layer.state_dict())
    ('ParametrizedLinear', ['bias', 'parametrizations.weight.original'])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TypeVar

import torch
from torch import Tensor, nn

from tether._cache import cached
from tether._chains import class_before, original_names
from tether._checks import call_labelled, describe, registrable_tensor, tensor_label
from tether._classes import is_shared_class, parametrized_class
from tether._parametrization_list import ParametrizationList, plists_of
from tether._writes import register, restore_state, save_state, set_in_place

__all__ = [
    "FunctionParametrization",
    "ParametrizationList",
    "cached",
    "chains",
    "is_parametrized",
    "register_parametrization",
    "remove_parametrizations",
    "transfer_parametrizations_and_params",
    "type_before_parametrizations",
]

M = TypeVar("M", bound=nn.Module)


class FunctionParametrization(nn.Module):
    """Wraps a plain callable so that it can be registered as a parametrization.

    :func:`register_parametrization` wraps any callable that is not an ``nn.Module`` in this
    class. If the callable has a ``right_inverse`` attribute, it is used as the right inverse.

    Example:
        >>> import torch, tether
        >>> layer = tether.register_parametrization(torch.nn.Linear(3, 3), "weight", torch.tril)
        >>> layer.parametrizations.weight[0]
        FunctionParametrization(fn=<built-in method tril of type object at ...>)
    """

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.fn = fn
        inverse = getattr(fn, "right_inverse", None)
        if inverse is not None:
            # An instance attribute, so that a callable without one is seen as having no
            # right inverse (identity at registration, a clear error on assignment).
            self.right_inverse = inverse

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.fn(*tensors)

    def extra_repr(self) -> str:
        return f"fn={self.fn!r}"


def _as_module(parametrization: object, label: str) -> nn.Module:
    if isinstance(parametrization, nn.Module):
        return parametrization
    if callable(parametrization):
        return FunctionParametrization(parametrization)
    raise TypeError(
        f"Cannot parametrize {label} with {describe(parametrization)}: a parametrization must "
        "be an nn.Module or a callable taking the original tensor(s) and returning a tensor."
    )


def is_parametrized(module: nn.Module, tensor_name: str | None = None) -> bool:
    """Whether ``module`` has a parametrization on ``tensor_name`` (on any tensor if ``None``).

    Example:
        >>> import torch, tether
        >>> layer = tether.register_parametrization(torch.nn.Linear(2, 2), "weight", torch.tril)
        >>> tether.is_parametrized(layer), tether.is_parametrized(layer, "bias")
        (True, False)
    """
    plists = plists_of(module)
    return len(plists) > 0 if tensor_name is None else tensor_name in plists


def type_before_parametrizations(module: nn.Module) -> type:
    """The class ``module`` had before it was parametrized (its class if it is not).

    Example:
        >>> import torch, tether
        >>> layer = tether.register_parametrization(torch.nn.Linear(2, 2), "weight", torch.tril)
        >>> tether.type_before_parametrizations(layer)
        <class 'torch.nn.modules.linear.Linear'>
    """
    return class_before(module)


def chains(module: nn.Module) -> Mapping[str, ParametrizationList]:
    """The chain of parametrizations of each parametrized tensor of ``module``, by name.

    A read-only view of ``module.parametrizations`` (empty if nothing is parametrized), for
    code that walks a model's parametrizations: each value is the tensor's
    :class:`ParametrizationList`, whose items are the parametrizations, first applied first,
    and whose ``originals()`` are the unconstrained tensors.

    Example:
        >>> import torch, tether
        >>> layer = tether.orthogonal(torch.nn.Linear(3, 3))
        >>> {name: [type(p).__name__ for p in chain] for name, chain in chains(layer).items()}
        {'weight': ['Orthogonal']}
    """
    return MappingProxyType(plists_of(module))


def register_parametrization(
    module: M,
    tensor_name: str,
    parametrization: nn.Module | Callable[..., Tensor],
    *,
    unsafe: bool = False,
) -> M:
    """Register a parametrization on a parameter or buffer of ``module``.

    Afterwards ``module.<tensor_name>`` returns ``parametrization(original)``, where the
    unconstrained ``original`` lives at ``module.parametrizations[tensor_name].original``
    (the same ``Parameter`` object as before, so an optimizer built earlier still trains it).
    Registering on a tensor that is already parametrized appends to its chain.

    If the parametrization has ``right_inverse(X)``, the original is initialised with it, so
    that the parametrized tensor starts at the current value; if ``right_inverse`` returns a
    sequence, the originals are ``original0``, ``original1``, ... and ``forward`` takes them
    all. Assigning ``module.<tensor_name> = X`` runs the chain's ``right_inverse`` backwards.

    Compatible with :func:`torch.nn.utils.parametrize.register_parametrization`. In addition,
    ``parametrization`` may be any callable (it is wrapped in
    :class:`FunctionParametrization`), and a failed registration leaves the module exactly as
    it was.

    Args:
        module: the module to parametrize.
        tensor_name: the name of a parameter, buffer or parametrized tensor of ``module``.
        parametrization: an ``nn.Module`` or callable with ``forward``, optionally
            ``right_inverse``.
        unsafe: allow the parametrization to change the tensor's shape or dtype; the
            consistency checks are skipped.

    Returns:
        ``module``, now of class ``Parametrized<Base>``.

    Raises:
        ValueError: ``tensor_name`` is not a tensor of ``module``, or the parametrization
            changes its shape or dtype (without ``unsafe``), or its ``right_inverse`` returns
            something ``forward`` cannot take.
        TypeError: ``parametrization`` is not callable, or the arguments have the wrong type.

    Example:
        >>> import torch, tether
        >>> class Skew(torch.nn.Module):
        ...     def forward(self, X):
        ...         A = X.triu(1)
        ...         return A - A.mT
        >>> layer = tether.register_parametrization(torch.nn.Linear(3, 3), "weight", Skew())
        >>> torch.equal(layer.weight, -layer.weight.T)
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"register_parametrization() needs an nn.Module; got {describe(module)}.")
    if not isinstance(tensor_name, str):
        raise TypeError(
            f"register_parametrization() needs the tensor's name as a str; got "
            f"{describe(tensor_name)}. Example: register_parametrization(layer, 'weight', f)."
        )
    label = tensor_label(module, tensor_name)
    parametrization = _as_module(parametrization, label)
    parametrization.train(module.training)
    if is_parametrized(module, tensor_name):
        plist = plists_of(module)[tensor_name]
        if not unsafe:
            _check_appended(module, tensor_name, parametrization, label)
        plist.append(parametrization)
        plist.unsafe |= unsafe
        _adopt(module)
        return module

    original = registrable_tensor(module, tensor_name, label)
    plist = ParametrizationList([parametrization], original, unsafe=unsafe, label=label)
    # Everything that can fail has been checked; from here on we only move objects around.
    base = type_before_parametrizations(module)
    names = frozenset(plists_of(module)) | {tensor_name}
    is_parameter = tensor_name in module._parameters
    del (module._parameters if is_parameter else module._buffers)[tensor_name]
    module.__class__ = parametrized_class(base, names)
    container = module._modules.get("parametrizations")
    if container is None:
        container = nn.ModuleDict()
        module.add_module("parametrizations", container)
    container._modules[tensor_name] = plist
    return module


def _check_appended(
    module: nn.Module, tensor_name: str, parametrization: nn.Module, label: str
) -> None:
    """Prepare a parametrization appended to a chain, and check it maps the tensor's space to
    itself.

    Its ``right_inverse`` runs first, on the chain's current value, so that a parametrization
    with state of its own (an orthogonal base point, power-iteration vectors) starts from that
    value, exactly as it would when registered on a plain tensor holding it; only then does
    ``forward`` run. PyTorch calls ``forward`` first, which fails for such parametrizations.
    A ``right_inverse`` that refuses the current value leaves the parametrization as it was
    (Note [A right_inverse that refuses the chain's value]). The originals are not changed:
    the tensor becomes ``parametrization(current)``.
    """
    fix = "Keep shape and dtype in forward and right_inverse, or register with unsafe=True."
    refusal: Exception | None = None
    with torch.no_grad():
        current = getattr(module, tensor_name)
        context = f"Cannot parametrize {label}"
        inverse = getattr(parametrization, "right_inverse", None)
        if inverse is not None:
            saved = save_state(parametrization)
            try:
                restored = call_labelled(inverse, current, context, label)
            except NotImplementedError:
                restored = current
            except Exception as error:
                # Note [A right_inverse that refuses the chain's value]
                #     PyTorch calls right_inverse when appending only on forward's output, so
                #     a parametrization whose right_inverse accepts only members of its set
                #     (and raises for the chain's current value) is valid there. For such a
                #     parametrization tether does what PyTorch does: forward on the current
                #     value, then right_inverse on the result (keeping what it stores); its
                #     refusal is reported only if forward fails too.
                restore_state(saved)
                refusal, restored = error, current
            if refusal is None:
                if isinstance(restored, (tuple, list)):
                    raise ValueError(
                        f"{context} with {type(parametrization).__name__}: its right_inverse "
                        f"returns {len(restored)} tensors (original0, original1, ...), and a "
                        "parametrization with several originals must be the first on a tensor. "
                        f"Register it first: tether.remove_parametrizations(module, "
                        f"{tensor_name!r}), register it, then register the others after it."
                    )
                if isinstance(restored, Tensor) and restored.shape != current.shape:
                    raise ValueError(
                        f"{context} with {type(parametrization).__name__}: its right_inverse "
                        f"turns a value of shape {tuple(current.shape)} into an original of "
                        f"shape {tuple(restored.shape)}, and a parametrization whose original "
                        "has another shape than the tensor must be the first on a tensor. "
                        f"Register it first: tether.remove_parametrizations(module, "
                        f"{tensor_name!r}), register it, then register the others after it."
                    )
                _check_like(current, restored, f"parametrization.right_inverse({label})", fix)
        try:
            value = call_labelled(parametrization, current, context, label)
        except Exception:
            if refusal is not None:
                raise refusal from None
            raise
        _check_like(current, value, f"parametrization({label})", fix)
        if refusal is not None and inverse is not None:
            try:
                restored = call_labelled(inverse, value, context, label)
            except NotImplementedError:
                return
            except Exception:
                restore_state(saved)
                raise
            _check_like(current, restored, f"parametrization.right_inverse({label})", fix)


def _check_like(reference: Tensor, value: object, what: str, fix: str) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{what} must return a tensor; got {describe(value)}. {fix}")
    if value.dtype != reference.dtype or value.shape != reference.shape:
        raise ValueError(
            f"{what} must keep the shape and dtype of the tensor.\n"
            f"  expected: shape {tuple(reference.shape)}, dtype {reference.dtype}\n"
            f"  got:      shape {tuple(value.shape)}, dtype {value.dtype}\n{fix}"
        )


def _adopt(module: nn.Module) -> None:
    """Move a module parametrized by torch's parametrize onto tether's shared class."""
    if not is_shared_class(type(module)):
        module.__class__ = parametrized_class(
            type_before_parametrizations(module), frozenset(plists_of(module))
        )
        plists_of(module)  # its chains become tether's too


def remove_parametrizations(module: M, tensor_name: str, leave_parametrized: bool = True) -> M:
    """Remove the parametrizations on ``module.<tensor_name>``, leaving a plain tensor.

    With ``leave_parametrized=True`` the tensor keeps its current (parametrized) value; with
    ``False`` it goes back to the unconstrained original. When there is one original, it is the
    very same ``Parameter`` object that comes back (its data replaced in place), so an
    optimizer built before still trains it. When no parametrized tensor is left, the module gets
    its original class back.

    Args:
        module: a parametrized module.
        tensor_name: the parametrized tensor.
        leave_parametrized: keep the parametrized value (``True``) or the original.

    Returns:
        ``module``.

    Raises:
        ValueError: ``module.<tensor_name>`` is not parametrized, or ``leave_parametrized=False``
            with several originals, or the value cannot be stored in the original (its dtype
            differs, which ``unsafe=True`` allows).

    Example:
        >>> import torch, tether
        >>> layer = tether.register_parametrization(torch.nn.Linear(3, 3), "weight", torch.tril)
        >>> weight = layer.parametrizations.weight.original
        >>> layer = tether.remove_parametrizations(layer, "weight")
        >>> type(layer).__name__, layer.weight is weight, torch.equal(weight, weight.tril())
        ('Linear', True, True)
    """
    label = tensor_label(module, tensor_name)
    plists = plists_of(module)
    if tensor_name not in plists:
        known = ", ".join(repr(n) for n in plists) or "none"
        raise ValueError(
            f"Cannot remove the parametrizations on {label}: it is not parametrized. "
            f"Parametrized tensors of this module: {known}."
        )
    plist = plists[tensor_name]
    if plist.is_tensor:
        original = plist.original
        if leave_parametrized:
            with torch.no_grad():
                value = getattr(module, tensor_name)
            if value.dtype != original.dtype:
                raise ValueError(
                    f"Cannot remove the parametrizations on {label} with leave_parametrized=True:"
                    f" the parametrized value has dtype {value.dtype} but the original "
                    f"{original.dtype}, so it cannot be stored in the same Parameter. Use "
                    "leave_parametrized=False, or convert the module first."
                )
            with torch.no_grad():
                set_in_place(original, value)
    elif leave_parametrized:
        value = getattr(module, tensor_name)
        original = nn.Parameter(value.detach()) if value.requires_grad else value.detach()
    else:
        raise ValueError(
            f"Cannot remove the parametrizations on {label} with leave_parametrized=False: it is "
            f"parametrized in terms of {plist.ntensors} tensors (original0, ...), so there is no "
            "single original to leave. Use leave_parametrized=True."
        )

    plist.changed()
    base = type_before_parametrizations(module)
    del plists_of(module)[tensor_name]
    remaining = frozenset(plists_of(module))
    if remaining:
        module.__class__ = parametrized_class(base, remaining)
    else:
        del module._modules["parametrizations"]
        module.__class__ = base
    register(module, tensor_name, original)
    return module


def transfer_parametrizations_and_params(
    from_module: nn.Module, to_module: M, tensor_name: str | None = None
) -> M:
    """Register the parametrizations of ``from_module`` on ``to_module``, sharing originals.

    Transfers the parametrizations of ``tensor_name`` (of every parametrized tensor if
    ``None``): the same parametrization objects are registered on ``to_module`` (creating the
    tensor there if it lacks it), and its originals become the very ``Parameter`` objects of
    ``from_module``, so both modules train the same weights. Does nothing if ``from_module``
    is not parametrized. Compatible with
    :func:`torch.nn.utils.parametrize.transfer_parametrizations_and_params`.

    Returns:
        ``to_module``.

    Raises:
        ValueError: ``tensor_name`` is given but not parametrized on ``from_module``.

    Example:
        >>> import torch, tether
        >>> a = tether.register_parametrization(torch.nn.Linear(3, 3), "weight", torch.tril)
        >>> b = tether.transfer_parametrizations_and_params(a, torch.nn.Linear(3, 3))
        >>> b.parametrizations.weight.original is a.parametrizations.weight.original
        True
    """
    plists = plists_of(from_module)
    if not plists:
        return to_module
    if tensor_name is not None and tensor_name not in plists:
        raise ValueError(
            f"Cannot transfer {tensor_label(from_module, tensor_name)}: it is not parametrized. "
            f"Parametrized tensors: {', '.join(repr(n) for n in plists)}."
        )
    for name in plists if tensor_name is None else [tensor_name]:
        source = plists[name]
        if not hasattr(to_module, name):
            with torch.no_grad():
                setattr(to_module, name, nn.Parameter(getattr(from_module, name)))
        for parametrization in source:
            register_parametrization(to_module, name, parametrization)
        target = plists_of(to_module)[name]
        for original_name in original_names(source):  # the chain drops its cached values
            setattr(target, original_name, getattr(source, original_name))
    return to_module
