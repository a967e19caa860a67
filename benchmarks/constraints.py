"""Each constraint's map, forward and backward, against geotorch's equivalent.

Both libraries constrain the ``(n, n)`` weight of a freshly initialised ``Linear(n, n)`` with
their defaults (low and fixed rank: rank ``n / 4``; sphere: every row); the time is one read of
``layer.weight`` and a backward pass through it, with a random cotangent of unit norm.
"""

from __future__ import annotations

from collections.abc import Callable

import geotorch
import torch
from _timing import compare, ms, ratio, table
from torch import nn

import tether

Register = Callable[[nn.Module], object]

# name: (tether, geotorch)
CONSTRAINTS: dict[str, tuple[Register, Register]] = {
    "sphere (rows)": (
        lambda m: tether.sphere(m, dim=-1),
        lambda m: geotorch.sphere(m, "weight"),
    ),
    "orthogonal": (tether.orthogonal, lambda m: geotorch.orthogonal(m, "weight")),
    "grassmannian": (tether.grassmannian, lambda m: geotorch.grassmannian(m, "weight")),
    "symmetric": (tether.symmetric, lambda m: geotorch.symmetric(m, "weight")),
    "skew": (tether.skew, lambda m: geotorch.skew(m, "weight")),
    "positive_definite": (
        tether.positive_definite,
        lambda m: geotorch.positive_definite(m, "weight"),
    ),
    "positive_semidefinite": (
        tether.positive_semidefinite,
        lambda m: geotorch.positive_semidefinite(m, "weight"),
    ),
    "low_rank (n/4)": (
        lambda m: tether.low_rank(m, rank=m.weight.shape[0] // 4),
        lambda m: geotorch.low_rank(m, "weight", m.weight.shape[0] // 4),
    ),
    "fixed_rank (n/4)": (
        lambda m: tether.fixed_rank(m, rank=m.weight.shape[0] // 4),
        lambda m: geotorch.fixed_rank(m, "weight", m.weight.shape[0] // 4),
    ),
    "invertible (GL+)": (tether.invertible, lambda m: geotorch.invertible(m, "weight")),
    "special_linear (SL)": (tether.special_linear, lambda m: geotorch.sln(m, "weight")),
    "almost_orthogonal": (
        tether.almost_orthogonal,
        lambda m: geotorch.almost_orthogonal(m, "weight"),
    ),
}


def timed_step(register: Register, n: int) -> Callable[[], None]:
    """Constrain a fresh ``Linear(n, n)``; return one read of the weight with a backward."""
    layer = nn.Linear(n, n, bias=False)
    register(layer)
    # Unit norm, the scale of a real gradient: the cost of some backward passes (the matrix
    # exponential's) grows with the norm of the cotangent.
    cotangent = torch.randn(n, n) / n

    def step() -> None:
        (layer.weight * cotangent).sum().backward()

    return step


SIZES = (64, 256, 1024)
QUICK_SIZES = (64, 256)


def run(quick: bool = False) -> str:
    rows = []
    for n in QUICK_SIZES if quick else SIZES:
        # About 0.4 s per map and size (less for the slow large maps, whose few runs are
        # enough: their times vary by far less than the differences we look for).
        min_run_time = (0.1 if quick else 0.4) * (0.5 if n >= 1024 else 1.0)
        for name, (ours, theirs) in CONSTRAINTS.items():
            candidates: dict[str, Callable[[], None]] = {}
            errors = []
            for label, register in [("tether", ours), ("geotorch", theirs)]:
                try:
                    candidates[label] = timed_step(register, n)
                except Exception as error:  # a library may not support a case: report it
                    errors.append(f"{label}: {type(error).__name__}")
            times = compare(candidates, min_run_time, rounds=1) if candidates else {}
            tether_time, geotorch_time = times.get("tether"), times.get("geotorch")
            speedup = ratio(geotorch_time / tether_time) if tether_time and geotorch_time else "n/a"
            rows.append(
                [
                    name,
                    n,
                    ms(tether_time) if tether_time else "n/a",
                    ms(geotorch_time) if geotorch_time else "n/a",
                    speedup,
                    "; ".join(errors),
                ]
            )
    columns = ["constraint", "n", "tether (ms)", "geotorch (ms)", "speedup", "notes"]
    if not any(row[-1] for row in rows):
        columns, rows = columns[:-1], [row[:-1] for row in rows]
    return "\n\n".join(
        [
            "### Constraints: map forward + backward on an `(n, n)` weight",
            table(columns, rows),
            "speedup = geotorch time / tether time (above 1: tether is faster).",
        ]
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
