"""Tall orthogonal weights: registration, forward and backward of an ``n x 64`` weight.

``tether.orthogonal`` and ``torch.nn.utils.parametrizations.orthogonal`` (default map,
``use_trivialization=True``) on the weight of ``Linear(64, n)``, float32: one step registers
the constraint on a fresh layer, reads the weight and runs a backward pass through it. For
``n > 128`` tether's weight is thin (Note [Thin orthogonal weights]) and costs ``O(n k²)``;
PyTorch's completes the base to ``n x n`` and costs ``O(n³)``, so it runs only up to
``n = 4000`` (at 32000 it would not finish in minutes). The time is the median of the
interleaved rounds of ``_timing.measure``, on one thread (as ``benchmarks/scale.py`` runs
it); the peak is the most memory the step holds at
once, from ``torch.profiler``'s allocation events. The machine is shared: read the ratios
(against ``n = 4000``, and against PyTorch), not the absolute times.

    python benchmarks/tall.py            # n = 1000, 4000, 16000, 32000
    python benchmarks/tall.py --quick    # n = 1000, 4000
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _timing import header, measure, median, ms, paired_ratio, ratio, target
from _timing import table as markdown_table
from torch import nn
from torch.nn.utils import parametrizations
from torch.profiler import ProfilerActivity, profile

import tether

K = 64
SIZES = (1000, 4000, 16000, 32000)
QUICK_SIZES = (1000, 4000)
# PyTorch's map is O(n³): above this it takes minutes.
TORCH_MAX_ROWS = 4000
# Issue 15: 32000 x 64 at most 12 times the time of 4000 x 64 (linear in n would be 8).
REFERENCE_ROWS, LARGEST_ROWS, GOAL = 4000, 32000, 12.0

Row = dict[str, object]


def _step(library: str, n: int) -> Callable[[], None]:
    register = tether.orthogonal if library == "tether" else parametrizations.orthogonal

    def step() -> None:
        layer = register(nn.Linear(K, n, bias=False))
        layer.weight.sum().backward()

    return step


def _peak_mib(step: Callable[[], None]) -> float:
    """The most memory held at once during ``step``, in MiB, from the profiler's events.

    Everything the step holds it allocates itself (a fresh layer), so the running sum of the
    allocation (positive) and free (negative) events within the profile is what it holds.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = prof.profiler.kineto_results.events()
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    held = peak = 0
    for event in memory:
        held += event.nbytes()
        peak = max(peak, held)
    return peak / 2**20


def rows(quick: bool) -> list[Row]:
    """One row per ``n``: each library's median seconds and peak MiB, and two paired ratios.

    Every step of every size takes its turn in the same rounds, so that load from other
    processes falls on all alike; ``growth`` is tether's time over its time at ``n = 4000``
    and ``torch_over_tether`` PyTorch's over tether's, both medians of per-round ratios
    (``_timing.paired_ratio``). PyTorch's entries are ``None`` above ``TORCH_MAX_ROWS``.
    """
    min_run_time, rounds = (1.0, 3) if quick else (4.0, 5)
    sizes = QUICK_SIZES if quick else SIZES
    steps = {
        (library, n): _step(library, n)
        for n in sizes
        for library in ("tether", "torch")
        if library == "tether" or n <= TORCH_MAX_ROWS
    }
    for step in steps.values():
        step()  # warm up
    names = {key: f"{key[0]} {key[1]}" for key in steps}
    times = measure({names[key]: step for key, step in steps.items()}, min_run_time, rounds)
    reference = times.get(names.get(("tether", REFERENCE_ROWS), ""))
    result: list[Row] = []
    for n in sizes:
        ours = times[names[("tether", n)]]
        theirs = times.get(names.get(("torch", n), ""))
        torch_step = steps.get(("torch", n))
        result.append(
            {
                "n": n,
                "k": K,
                "tether_seconds": median(ours),
                "torch_seconds": None if theirs is None else median(theirs),
                "torch_over_tether": None if theirs is None else paired_ratio(theirs, ours),
                "growth": None if reference is None else paired_ratio(ours, reference),
                "tether_peak_mib": _peak_mib(steps[("tether", n)]),
                "torch_peak_mib": None if torch_step is None else _peak_mib(torch_step),
            }
        )
    return result


def _number(value: object, format: Callable[[float], str]) -> str:
    return format(value) if isinstance(value, float) else "-"


def table(result: list[Row]) -> str:
    """The markdown table of :func:`rows`, and the target on the growth from 4000 to 32000."""
    lines = [
        [
            f"{row['n']} x {row['k']}",
            _number(row["tether_seconds"], ms),
            _number(row["torch_seconds"], ms),
            _number(row["torch_over_tether"], ratio),
            _number(row["tether_peak_mib"], lambda mib: f"{mib:.1f}"),
            _number(row["torch_peak_mib"], lambda mib: f"{mib:.1f}"),
            _number(row["growth"], ratio),
        ]
        for row in result
    ]
    columns = [
        "weight",
        "tether (ms)",
        "torch (ms)",
        "torch / tether",
        "tether peak (MiB)",
        "torch peak (MiB)",
        f"tether time / n = {REFERENCE_ROWS}",
    ]
    text = markdown_table(columns, lines)
    growth = next((row["growth"] for row in result if row["n"] == LARGEST_ROWS), None)
    if isinstance(growth, float):
        goal = f"<= {GOAL:g}x (linear: {LARGEST_ROWS // REFERENCE_ROWS}x)"
        label = f"tether, {LARGEST_ROWS} x {K} over {REFERENCE_ROWS} x {K}"
        text = f"{text}\n\n{target(label, growth, goal, growth <= GOAL)}"
    note = f"PyTorch's `orthogonal` is O(n³) on tall weights: not run above n = {TORCH_MAX_ROWS}."
    return f"{text}\n\n{note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 1000, 4000 only")
    arguments = parser.parse_args()
    # One thread, as the other benchmarks: on a shared machine, threads that wait for each
    # other's time slices make the larger sizes look slower than they are.
    torch.set_num_threads(1)
    print(header())
    print()
    print(table(rows(arguments.quick)))


if __name__ == "__main__":
    main()
