"""Where a module keeps its chains of parametrizations, and what each chain holds.

One source of truth for three questions every part of tether asks, answered the same way for
chains that tether built and for chains that ``torch.nn.utils.parametrize`` built (tether
appends to those, loads into them and names their tensors in messages):

- which tensors of a module are parametrized, and by which chain (:func:`chains_of`);
- the class a module had before it was parametrized (:func:`class_before`);
- the names and tensors of a chain's originals (:func:`original_names`, :func:`originals`).

This module imports nothing of tether, so that the lowest layers (``_checks``) can use it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["chains_of", "class_before", "original_names", "originals"]


def chains_of(module: nn.Module) -> dict[str, Any]:
    """The chain (``ParametrizationList``) of each parametrized tensor of ``module``, by name.

    The dictionary is the module's own (removing a parametrization deletes from it): callers
    that hand it out must wrap it read-only. Read through ``__dict__`` so that it works while
    a module is half built and never triggers ``__getattr__``.
    """
    container = module.__dict__.get("_modules", {}).get("parametrizations")
    if not isinstance(container, nn.ModuleDict):
        return {}
    chains: dict[str, Any] = container.__dict__["_modules"]
    return chains


def class_before(module: nn.Module) -> type:
    """The class ``module`` had before it was parametrized (its class if it is not).

    tether's parametrized classes record it (``_tether_base``), read with ``getattr`` because
    FSDP2's ``fully_shard`` subclasses a module's class again; torch's parametrized classes
    subclass it directly.
    """
    cls = type(module)
    base: type | None = getattr(cls, "_tether_base", None)
    if base is not None:
        return base
    if chains_of(module):  # parametrized by torch's own parametrize
        return cls.__bases__[0]
    return cls


def original_names(chain: Any) -> list[str]:
    """``["original"]``, or ``["original0", "original1", ...]`` for a many-to-one chain."""
    if chain.is_tensor:
        return ["original"]
    return [f"original{i}" for i in range(chain.ntensors)]


def originals(chain: Any) -> tuple[Tensor, ...]:
    """The unconstrained tensors of ``chain``, in the order its first parametrization takes."""
    return tuple(getattr(chain, name) for name in original_names(chain))
