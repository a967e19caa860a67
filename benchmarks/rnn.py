"""A recurrent cell whose kernel is read at every time step: what caching saves.

An ``RNNCell`` with an orthogonal recurrent kernel runs over the time steps; one forward and
backward pass reads the kernel once per step. Without a cache the orthogonal map (a matrix
exponential) runs at every step, forward and backward.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.utils.parametrize as torch_parametrize
from _timing import measure, ms, paired_ratio, rows, table, target
from torch import nn
from torch.nn.utils import parametrizations as torch_parametrizations

import tether

HIDDEN = 128
BATCH = 32
STEPS = 50


class Recurrent(nn.Module):
    def __init__(self, cell: nn.RNNCell) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        h = xs.new_zeros(xs.shape[1], HIDDEN)
        for x in xs:
            h = self.cell(x, h)
        return h


def models() -> dict[str, nn.Module]:
    cell = nn.RNNCell(HIDDEN, HIDDEN)
    plain = Recurrent(copy.deepcopy(cell))
    theirs = Recurrent(torch_parametrizations.orthogonal(copy.deepcopy(cell), "weight_hh"))
    ours = Recurrent(tether.orthogonal(copy.deepcopy(cell), "weight_hh"))
    autocached = tether.autocache(copy.deepcopy(ours))
    return {"plain": plain, "torch": theirs, "tether": ours, "tether autocache": autocached}


def run(quick: bool = False) -> str:
    min_run_time = 0.5 if quick else 4.0
    model = models()
    xs = torch.randn(STEPS, BATCH, HIDDEN)

    def step(module: nn.Module) -> None:
        module(xs).sum().backward()

    def torch_cached() -> None:
        with torch_parametrize.cached():
            step(model["torch"])

    def tether_cached() -> None:
        with tether.cached():
            step(model["tether"])

    # Compiled as in benchmarks/compile.py: inductor, or aot_eager for a quick run.
    backend = "aot_eager" if quick else "inductor"
    compiled = {
        name: torch.compile(model[name], backend=backend) for name in ("torch", "tether autocache")
    }
    for module in compiled.values():
        step(module)  # compiles

    candidates = {
        "plain RNNCell (no constraint)": lambda: step(model["plain"]),
        "torch orthogonal": lambda: step(model["torch"]),
        "torch orthogonal + `parametrize.cached()`": torch_cached,
        "tether orthogonal": lambda: step(model["tether"]),
        "tether orthogonal + `tether.cached()`": tether_cached,
        "tether orthogonal + `tether.autocache`": lambda: step(model["tether autocache"]),
        "torch orthogonal, compiled": lambda: step(compiled["torch"]),
        "tether orthogonal + `tether.autocache`, compiled": lambda: step(
            compiled["tether autocache"]
        ),
    }
    times = measure(candidates, min_run_time, rounds=1 if quick else 10)
    ours = times["tether orthogonal + `tether.autocache`"]
    cached = paired_ratio(ours, times["torch orthogonal + `parametrize.cached()`"])
    uncached = paired_ratio(times["torch orthogonal"], ours)
    return "\n\n".join(
        [
            f"### `RNNCell({HIDDEN}, {HIDDEN})`, orthogonal `weight_hh`, batch {BATCH}, "
            f"{STEPS} steps, forward + backward",
            table(
                ["model", "time (ms)", "vs tether + autocache"],
                rows(times, "tether orthogonal + `tether.autocache`", ms),
            ),
            "\n".join(
                [
                    target("tether + autocache / torch + cached()", cached, "≤ 1.0", cached <= 1),
                    target(
                        "torch without cached() / tether + autocache",
                        uncached,
                        "≥ 5",
                        uncached >= 5,
                    ),
                ]
            ),
        ]
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
