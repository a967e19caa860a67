"""``sparsity``: how many entries of each tensor, and of the model, are zero."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tether._parametrization_list import plists_of
from tether.prune._mask import find_mask

__all__ = ["Sparsity", "TensorSparsity", "sparsity"]


class TensorSparsity(NamedTuple):
    """One row of a :class:`Sparsity` table: the zeros of one tensor (or of all, ``"total"``)."""

    name: str
    zeros: int
    total: int
    fraction: float


def _row(name: str, zeros: int, total: int) -> TensorSparsity:
    return TensorSparsity(name, zeros, total, zeros / total if total else 0.0)


@dataclass(frozen=True)
class Sparsity:
    """The result of :func:`sparsity`: one row per tensor, and the total; prints as a table.

    Iterating gives the per-tensor rows; ``report["0.weight"]`` looks one up by name.

    Attributes:
        tensors: a :class:`TensorSparsity` ``(name, zeros, total, fraction)`` per tensor.
        total: the same over all the tensors listed, under the name ``"total"``.

    Example:
        >>> import torch
        >>> from tether import prune
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> prune.global_unstructured([(net[0], "weight"), (net[1], "weight")],
        ...                           prune.L1Unstructured, amount=0.5)
        >>> report = prune.sparsity(net)
        >>> report.total
        TensorSparsity(name='total', zeros=12, total=24, fraction=0.5)
        >>> [row.name for row in report]
        ['0.weight', '1.weight']
    """

    tensors: tuple[TensorSparsity, ...]

    @property
    def total(self) -> TensorSparsity:
        return _row(
            "total", sum(row.zeros for row in self.tensors), sum(row.total for row in self.tensors)
        )

    def __iter__(self) -> Iterator[TensorSparsity]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> TensorSparsity:
        for row in self.tensors:
            if row.name == name:
                return row
        known = ", ".join(repr(row.name) for row in self.tensors) or "none"
        raise KeyError(f"No tensor named {name!r} in this sparsity report. Tensors: {known}.")

    def __str__(self) -> str:
        rows = [*self.tensors, self.total]
        cells = [(r.name, str(r.zeros), str(r.total), f"{100 * r.fraction:.1f}%") for r in rows]
        header = ("tensor", "zeros", "total", "sparsity")
        widths = [max(len(c[i]) for c in [header, *cells]) for i in range(4)]

        def line(c: tuple[str, str, str, str]) -> str:
            first = c[0].ljust(widths[0])
            return "  ".join([first, *(v.rjust(w) for v, w in zip(c[1:], widths[1:], strict=True))])

        rule = "-" * len(line(header))
        return "\n".join([line(header), *map(line, cells[:-1]), rule, line(cells[-1])])

    def __repr__(self) -> str:
        return str(self)


def sparsity(module: nn.Module, *, include_unpruned: bool = False) -> Sparsity:
    """Count the zeros of each pruned tensor of ``module``, and of all of them together.

    Counts the zeros of the values the model computes with (``module.weight``, pruned), which
    is what pruning is meant to produce; entries that happen to be zero count too. Names are
    those of the plain model (``"0.weight"``), as in :func:`tether.plain_state_dict`.

    Args:
        module: any module; the tensors of its submodules are included.
        include_unpruned: also list the parameters and parametrized tensors that are not
            pruned (biases, unpruned layers), so that the total covers the whole model.

    Returns:
        A :class:`Sparsity`: print it for a table, or read its rows.

    Example:
        >>> import torch
        >>> from tether import prune
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
        >>> _ = prune.l1_unstructured(net[0], "weight", amount=0.3)
        >>> _ = prune.ln_structured(net[2], "weight", amount=1, n=2, dim=0)
        >>> print(prune.sparsity(net))
        tensor    zeros  total  sparsity
        0.weight      6     20     30.0%
        2.weight      5     10     50.0%
        --------------------------------
        total        11     30     36.7%
    """
    rows: list[TensorSparsity] = []
    inside: set[int] = set()  # the parametrizations themselves: not part of the plain model
    for path, submodule in module.named_modules():
        if id(submodule) in inside:
            continue
        plists = plists_of(submodule)
        for plist in plists.values():
            inside.update(id(m) for m in plist.modules())
        at = f"{path}." if path else ""
        names = [n for n in plists if include_unpruned or find_mask(submodule, n) is not None]
        if include_unpruned:
            names += [n for n, p in submodule._parameters.items() if p is not None]
        for name in names:
            with torch.no_grad():
                value: Tensor = getattr(submodule, name)
            rows.append(_row(at + name, int((value == 0).sum()), value.numel()))
    return Sparsity(tuple(rows))
