"""``ParametrizationList``: the chain of parametrizations on one tensor and its originals."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from tether import _cache, _chains, _distributed
from tether._checks import (
    call_labelled,
    expect_arity,
    expect_finite,
    expect_same_dtype,
    expect_same_shape,
    expect_tensor,
    expect_tensors,
    not_scriptable,
)
from tether._writes import SavedState, register, restore_state, save_state, set_in_place

__all__ = ["ParametrizationList", "Plan", "plists_of"]

_Parameter = nn.Parameter


class Plan(NamedTuple):
    """Originals computed for a value by :meth:`ParametrizationList.plan`, not yet written.

    ``saved`` is the parametrizations' own state from before their right inverses ran (they may
    write a norm or a base point): :meth:`ParametrizationList.rollback` puts it back.
    """

    originals: tuple[Tensor, ...]
    saved: SavedState


class _Serve:
    """Stands for the chain's ``forward`` while a value is served: returns it unchanged."""

    def __init__(self, value: Tensor | None) -> None:
        self.value = value

    def __call__(self, *args: Any) -> Tensor | None:
        return self.value


class ParametrizationList(nn.ModuleList):
    """The parametrizations of one tensor, in order, and the original tensor(s) they act on.

    ``module.parametrizations[tensor_name]`` is a ``ParametrizationList`` once ``tensor_name``
    is parametrized. It holds the unconstrained tensor as ``original`` or, when the first
    parametrization's ``right_inverse`` returns several tensors, as ``original0``,
    ``original1``, ... Calling it evaluates the chain; :meth:`right_inverse` runs the chain
    backwards and stores the result in the originals.

    It is built by :func:`tether.register_parametrization`; users do not instantiate it.

    Every write goes through it, so that it can drop its own entries from the caches
    (Note [Writers of a chain]).

    Args:
        modules: the parametrizations, first applied first.
        original: the parameter or buffer being parametrized. With one original it keeps its
            identity (its data is replaced in place), so an optimizer holding it still trains it.
        unsafe: allow the chain to change the shape or dtype of the tensor.
        label: how error messages name the tensor, e.g. ``"Linear.weight"``.
    """

    # Note [Writers of a chain]
    #     A cached read serves the chain's value until something writes, so every write must
    #     drop the chain from the caches, and a path that forgot to would serve a stale weight,
    #     silently. The chain therefore drops its entries itself, on each kind of write:
    #
    #     - assignment and loading: ``plan`` computes the new originals (running the right
    #       inverses backwards, checked, nothing written but the parametrizations' own state),
    #       then ``commit`` writes them or ``rollback`` undoes that state; several chains
    #       (a whole ``load_state_dict``) plan first and commit together, all or nothing;
    #     - a replaced original (transfer, ``load_state_dict(assign=True)``, pruning) through
    #       ``__setattr__``, and a parametrization added or removed through the list methods;
    #     - a value served in place of the chain's (``functional_call``, resets): ``serve``
    #       and ``stop_serving``;
    #     - anything else that changes what ``forward`` computes without passing through here
    #       (a pruning mask updated in place, an averaged copy re-expressed): ``changed()``.
    #
    #     Optimizer steps write into the originals in place and do not notify: a cache lives
    #     for one ``cached()`` block (one forward pass), between steps.

    original: Tensor
    unsafe: bool
    is_tensor: bool
    ntensors: int

    def __init__(
        self,
        modules: Sequence[nn.Module],
        original: Tensor,
        unsafe: bool = False,
        *,
        label: str | None = None,
    ) -> None:
        if len(modules) == 0:
            raise ValueError("ParametrizationList requires one or more modules.")
        super().__init__(modules)
        self.unsafe = unsafe
        self.label = label or "the parametrized tensor"
        self._shape: torch.Size | None = original.shape
        # Nothing is written until every check has passed, so a failed registration leaves the
        # original tensor untouched.
        originals = self._initial_originals(original)
        if not unsafe:
            with torch.no_grad():
                context = f"Cannot parametrize {self.label}"
                value = call_labelled(self._evaluate, originals, context, self.label)
            self._check_value(value, original)
        self._adopt(original, originals)

    def _initial_originals(self, original: Tensor) -> tuple[Tensor, ...]:
        """The originals for ``original``'s value, checked against it; sets ``is_tensor``."""
        context = f"Cannot parametrize {self.label}"
        fix = "Give it finite values first, e.g. with the layer's reset_parameters()."
        if any(getattr(module, "right_inverse", None) is not None for module in self):
            expect_finite(original, context, fix)
        new = self._run_backwards(original, context, registering=True)
        self.is_tensor = isinstance(new, Tensor)
        originals = (new,) if isinstance(new, Tensor) else new
        self.ntensors = len(originals)
        expect_arity(self[0], self.ntensors, self.label)
        if self.is_tensor:
            fix = "A right_inverse that returns one tensor must keep the original's dtype."
            what = f"right_inverse changed the dtype of {self.label}."
            expect_same_dtype(original.dtype, originals[0].dtype, what, fix)
            if originals[0].device != original.device:
                raise ValueError(
                    f"right_inverse moved {self.label} to another device.\n"
                    f"  expected device: {original.device}\n  got device:      "
                    f"{originals[0].device}\nReturn a tensor on the original's device."
                )
        return originals

    def _adopt(self, original: Tensor, originals: tuple[Tensor, ...]) -> None:
        """Register the originals: ``original`` itself (its data replaced) when there is one."""
        if self.is_tensor:
            with torch.no_grad():
                set_in_place(original, originals[0])
            register(self, "original", original)
            return
        for i, tensor in enumerate(originals):
            if isinstance(original, nn.Parameter):
                tensor = nn.Parameter(tensor, original.requires_grad)
            tensor.requires_grad_(original.requires_grad)
            register(self, f"original{i}", tensor)

    def _run_backwards(
        self, value: Tensor, context: str, *, registering: bool
    ) -> Tensor | tuple[Tensor, ...]:
        """Run each ``right_inverse`` from the last parametrization to the first, on ``value``.

        When registering, a parametrization without one (or whose ``right_inverse`` raises
        ``NotImplementedError``) passes the value on unchanged, as torch's parametrize does;
        when assigning, every parametrization must have one (checked by :meth:`plan`).
        """
        new: object = value
        with torch.no_grad():
            for i, module in enumerate(reversed(self)):
                inverse = getattr(module, "right_inverse", None)
                if inverse is None:
                    continue
                if i > 0:  # only the first parametrization's right_inverse may return several
                    what = f"right_inverse of {type(self[len(self) - i]).__name__} on {self.label}"
                    new = expect_tensor(new, what, "Return a tensor.")
                try:
                    new = call_labelled(inverse, new, context, self.label)
                except NotImplementedError:
                    if not registering:
                        raise
        return expect_tensors(new, f"right_inverse of the parametrizations on {self.label}")

    def _check_value(self, value: object, original: Tensor) -> None:
        fix = "Keep shape and dtype in forward, or register with unsafe=True."
        if not isinstance(value, Tensor):
            raise ValueError(
                f"The parametrization on {self.label} must return a tensor; "
                f"got {type(value).__name__}."
            )
        expect_same_dtype(
            original.dtype,
            value.dtype,
            f"Registering a parametrization may not change the dtype of {self.label}.",
            fix,
        )
        expect_same_shape(
            original.shape,
            value.shape,
            f"Registering a parametrization may not change the shape of {self.label}.",
            fix,
        )

    def parametrized_shape(self) -> torch.Size:
        """The shape of the parametrized tensor (evaluated once after an original was replaced)."""
        if self._shape is None:
            with torch.no_grad():
                self._shape = self().shape
        return self._shape

    def __setattr__(self, name: str, value: Any) -> None:
        replaced = name.startswith("original")  # transfer, load_state_dict(assign=True), pruning
        if replaced:
            self.__dict__["_shape"] = None
        super().__setattr__(name, value)
        if replaced:
            self.changed()

    def originals(self) -> tuple[Tensor, ...]:
        """The unconstrained tensors, in the order the first parametrization takes them."""
        return _chains.originals(self)

    def _evaluate(self, originals: tuple[Tensor, ...]) -> Any:
        modules = iter(self._modules.values())
        value = next(modules)(*originals)
        for module in modules:
            value = module(value)
        return value

    def forward(self) -> Tensor:
        """Evaluate the chain on the originals.

        This is the hot path of every read of a parametrized tensor, so it calls each
        parametrization's ``forward`` directly rather than through ``nn.Module.__call__``:
        forward hooks registered on parametrization modules do not run here.
        """
        modules = iter(self._modules.values())
        if self.is_tensor:
            original: Tensor | None = self._parameters.get("original")
            if original is None:
                original = self._buffers["original"]
            elif type(original) is not _Parameter:  # FSDP2 shard? Note [Sharded originals]
                original = _distributed.full(original)
            value = next(modules).forward(original)
        else:
            originals = self.originals()
            if type(originals[0]) is not _Parameter:
                originals = _distributed.full_originals(originals)
            value = next(modules).forward(*originals)
        for module in modules:
            value = module.forward(value)
        return value

    # -- writers (Note [Writers of a chain]) ---------------------------------------------------

    def right_inverse(self, value: Tensor) -> None:
        """Set the originals so that the chain evaluates to ``value``.

        Runs each parametrization's ``right_inverse`` from last to first and writes the result
        into the original tensor(s) in place, keeping their identity. This is what assigning
        ``module.weight = value`` does.

        Raises:
            TypeError: ``value`` is not a tensor.
            ValueError: ``value`` has the wrong shape or holds NaN or infinite entries, or a
                ``right_inverse`` returned the wrong number, shape or dtype of tensors.
            RuntimeError: a parametrization in the chain has no ``right_inverse``.
        """
        self.commit(self.plan(value))

    def plan(self, value: object) -> Plan:
        """The originals :meth:`right_inverse` would store for ``value``, computed and checked.

        Nothing is written but what a ``right_inverse`` writes into its own parametrization
        (a norm, a base point): :meth:`commit` writes the originals, :meth:`rollback` undoes
        the rest. If a step fails, it is undone here and the error raised.
        """
        value = expect_tensor(
            value, f"The value assigned to {self.label}", "Assign a torch.Tensor."
        )
        if not self.unsafe:
            expected = self.parametrized_shape()
            expect_same_shape(
                expected,
                value.shape,
                f"Cannot assign to {self.label}: the value has the wrong shape.",
                f"Assign a tensor of shape {tuple(expected)}.",
            )
        # Check the whole chain first: a right_inverse may update its parametrization's state,
        # which must not happen when a later step is bound to fail.
        for module in reversed(self):
            if getattr(module, "right_inverse", None) is None:
                raise RuntimeError(
                    f"Cannot assign to {self.label}: parametrization "
                    f"{type(module).__name__} does not implement right_inverse. Give it a "
                    "method right_inverse(X) returning Y with forward(Y) == X."
                )
        context = f"Cannot assign to {self.label}"
        expect_finite(value, context, "Assign finite values.")
        saved = save_state(self)
        try:
            results = self._run_backwards(value, context, registering=False)
            return Plan(self._checked(results), saved)
        except BaseException:
            restore_state(saved)
            raise

    def _checked(self, results: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``results`` as a tuple, if they fit the originals (number, dtype, shape)."""
        results = (results,) if isinstance(results, Tensor) else results
        if len(results) != self.ntensors:
            raise ValueError(
                f"right_inverse on {self.label} must return {self.ntensors} tensor(s), as it "
                f"did at registration; got {len(results)}."
            )
        fix = "right_inverse must return tensors like those it returned at registration."
        names = _chains.original_names(self)
        for name, dest, src in zip(names, self.originals(), results, strict=True):
            what = f"right_inverse returned a wrong tensor for {self.label} ({name})."
            expect_same_dtype(dest.dtype, src.dtype, what, fix)
            if not self.unsafe:
                expect_same_shape(dest.shape, src.shape, what, fix)
        return results

    def commit(self, plan: Plan) -> None:
        """Write what :meth:`plan` computed into the originals, keeping their identity.

        Note [Assignment and reading threads]
            torch's parametrize points the original at the new value's memory with ``set_``,
            which frees the old memory at once, while a forward pass in another thread may
            still be reading it (it then reads garbage, or crashes). When the shape is fixed
            (no ``unsafe``), tether copies the new value into the original's memory instead:
            a concurrent read sees old or new entries, never freed memory, and the original
            keeps its address. The one visible difference: a view of the original taken
            before the assignment (``state_dict()`` without cloning) shows the new value,
            as it already does after an optimizer step.
        """
        with torch.no_grad():
            for dest, src in zip(self.originals(), plan.originals, strict=True):
                set_in_place(dest, src, copy=not self.unsafe)
        self.changed()

    def rollback(self, plan: Plan) -> None:
        """Undo what the right inverses of :meth:`plan` wrote into their parametrizations."""
        restore_state(plan.saved)
        self.changed()

    def serve(self, value: Tensor | None, token: object) -> None:
        """Return ``value`` as the chain's value, without running it, until :meth:`stop_serving`.

        Served values form a stack, each under its own ``token``; the top one is served.
        """
        self._served().append((token, value))
        self.__dict__["forward"] = _Serve(value)
        self.changed()

    def stop_serving(self, token: object) -> None:
        """Stop serving the value served under ``token`` (compared by identity)."""
        stack = [entry for entry in self._served() if entry[0] is not token]
        if stack:
            self.__dict__["_tether_served"] = stack
            self.__dict__["forward"] = _Serve(stack[-1][1])
        else:
            self.__dict__.pop("forward", None)
            self.__dict__.pop("_tether_served", None)
        self.changed()

    def served_token(self) -> object | None:
        """The token of the value being served, if any (see :meth:`serve`)."""
        stack = self._served()
        return stack[-1][0] if stack else None

    def _served(self) -> list[tuple[object, Tensor | None]]:
        stack: list[tuple[object, Tensor | None]] = self.__dict__.setdefault("_tether_served", [])
        return stack

    def changed(self) -> None:
        """Drop this chain's cached values: what it computes changed without passing through it.

        Every write of the chain's own (assignment, loading, a replaced original or
        parametrization) already does this; call it after changing a parametrization's state
        in place from outside (Note [Writers of a chain]).
        """
        _cache.invalidate(self)

    def append(self, module: nn.Module) -> ParametrizationList:
        super().append(module)
        self.changed()
        return self

    def insert(self, index: int, module: nn.Module) -> None:
        super().insert(index, module)
        self.changed()

    def extend(self, modules: Iterable[nn.Module]) -> ParametrizationList:
        super().extend(modules)
        self.changed()
        return self

    def __setitem__(self, index: int, module: nn.Module) -> None:
        super().__setitem__(index, module)
        self.changed()

    def __delitem__(self, index: int | slice) -> None:
        super().__delitem__(index)
        self.changed()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.changed()

    def __prepare_scriptable__(self) -> nn.Module:
        """Refuse ``torch.jit.script`` with the alternatives (Note [TorchScript])."""
        raise not_scriptable(self, self.label)


def plists_of(module: nn.Module) -> dict[str, ParametrizationList]:
    """The ``ParametrizationList`` of each parametrized tensor of ``module``, by name.

    On a module of tether's classes, a chain that torch's parametrize built (tether appended
    to it, or torch parametrized one more tensor) becomes tether's in place, so that every
    writer finds the protocol of Note [Writers of a chain].
    """
    chains = _chains.chains_of(module)
    if getattr(type(module), "_tether_base", None) is not None:
        for name, chain in chains.items():
            if not isinstance(chain, ParametrizationList):
                _adopt_chain(chain, f"{_chains.class_before(module).__name__}.{name}")
    return chains


def _adopt_chain(chain: nn.Module, label: str) -> None:
    """Make a chain of torch's parametrize one of tether's: same tensors, tether's methods."""
    chain.__dict__["label"] = label
    chain.__dict__["_shape"] = None
    chain.__class__ = ParametrizationList
