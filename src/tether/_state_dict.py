"""Plain checkpoints out: the ``state_dict`` a model would have without its parametrizations.

Plain checkpoints in are handled by the parametrized classes themselves (a plain ``weight``
key loads through ``right_inverse``); see ``tether._classes``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from tether._chains import chains_of

__all__ = ["plain_state_dict"]


def plain_state_dict(module: nn.Module, *, prefix: str = "") -> dict[str, Any]:
    """The ``state_dict`` of ``module`` as if every parametrization were removed.

    Each parametrized tensor appears under its plain name (``weight`` instead of
    ``parametrizations.weight.original``) with its current parametrized value, as
    ``tether.remove_parametrizations(m, name, leave_parametrized=True)`` would leave it. The
    model is not changed. Use it to export a model to code that knows nothing of tether, or to
    save only the constrained weights; such a checkpoint loads into plain modules and, through
    ``right_inverse``, back into parametrized ones.

    Args:
        module: any module, parametrized or not, at any depth.
        prefix: prepended to every key, as in ``nn.Module.state_dict``.

    Returns:
        An ``OrderedDict`` from names to detached tensors (and extra state).

    Example:
        >>> import torch, tether
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3))
        >>> _ = tether.register_parametrization(model[0], "weight", torch.tril)
        >>> list(model.state_dict())
        ['0.bias', '0.parametrizations.weight.original']
        >>> plain = tether.plain_state_dict(model)
        >>> list(plain), torch.equal(plain["0.weight"], model[0].weight)
        (['0.bias', '0.weight'], True)
        >>> torch.nn.Sequential(torch.nn.Linear(3, 3)).load_state_dict(plain)
        <All keys matched successfully>
    """
    state = module.state_dict(prefix=prefix)
    replacements: dict[str, list[tuple[str, Tensor]]] = {}
    named = module.named_modules(prefix=prefix.rstrip("."), remove_duplicate=False)
    for name, submodule in named:
        chains = chains_of(submodule)
        if not chains:
            continue
        at = f"{name}." if name else ""
        if _block_of(at, replacements) is not None:
            continue  # inside a parametrization, which the plain model does not have
        with torch.no_grad():
            for tensor_name, plist in chains.items():
                block = f"{at}parametrizations.{tensor_name}."
                # Reading may change state (spectral norm's power step in training mode): the
                # value is what the next read gives, and the model is left as it was.
                kept = [(t, t.clone()) for m in plist.children() for t in m.buffers()]
                value = getattr(submodule, tensor_name).detach()
                for tensor, saved in kept:
                    tensor.copy_(saved)
                replacements[block] = [(at + tensor_name, value)]

    plain: OrderedDict[str, Any] = OrderedDict()
    done: set[str] = set()
    for key, value in state.items():
        found = _block_of(key, replacements)
        if found is None:
            plain[key] = value
        elif found not in done:
            done.add(found)
            plain.update(replacements[found])
    for block, items in replacements.items():
        if block not in done:  # originals that were not saved (non-persistent buffers)
            plain.update(items)

    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        plain._metadata = OrderedDict(  # type: ignore[attr-defined]  # set ad hoc, as torch does
            (k, v) for k, v in metadata.items() if _block_of(f"{k}.", replacements) is None
        )
    return plain


def _block_of(key: str, blocks: dict[str, Any]) -> str | None:
    """The ``...parametrizations.<name>.`` block containing ``key``, if any (outermost first)."""
    start = 0
    while (index := key.find("parametrizations.", start)) >= 0:
        end = key.find(".", index + len("parametrizations.")) + 1
        if end and key[:end] in blocks:
            return key[:end]
        start = index + 1
    return None
