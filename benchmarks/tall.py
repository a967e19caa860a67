"""Tall weights: registration, forward and backward of an ``n x 64`` weight, every tall helper.

``tether.orthogonal`` and ``torch.nn.utils.parametrizations.orthogonal`` (default map,
``use_trivialization=True``) on the weight of ``Linear(64, n)``, float32: one step registers
the constraint on a fresh layer, reads the weight and runs a backward pass through it. For
``n > 128`` tether's weight is thin (Note [Thin orthogonal weights]) and costs ``O(n k²)``;
PyTorch's completes the base to ``n x n`` and costs ``O(n³)``, so it runs only up to
``n = 4000`` (at 32000 it would not finish in minutes). The same step runs for
``tether.grassmannian``, ``tether.low_rank`` and ``tether.fixed_rank`` (rank 32) on the same
weight, and for ``tether.psd_low_rank`` (rank 64) on an ``n x n`` weight of rank 64, whose
step costs ``O(n² k)`` (the weight alone has ``n²`` entries), for ``n`` up to 4000; next to
it, the same step through the dense ``eigh`` the PSD right inverse used before (Note
[Eigenpairs of a symmetric matrix of low rank]), up to ``n = 2000``. The time is the median
of the interleaved rounds of ``_timing.measure``, on one thread (as ``benchmarks/scale.py``
runs it); the peak is the most memory the step holds at once, from ``torch.profiler``'s
allocation events. The machine is shared: read the ratios (against ``n = 4000``, and against
PyTorch), not the absolute times.

    python benchmarks/tall.py            # n = 1000, 4000, 16000, 32000 (PSD: 500 to 4000)
    python benchmarks/tall.py --quick    # n = 1000, 4000 (PSD: 500, 1000)
    python benchmarks/tall.py --device cuda    # on a GPU (peak from the CUDA allocator)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

import torch
from _timing import header, measure, median, ms, paired_ratio, ratio, target
from _timing import table as markdown_table
from torch import nn
from torch.nn.utils import parametrizations
from torch.profiler import ProfilerActivity, profile

import tether
from tether.constraints import _positive_definite
from tether.functional import _symmetric

K = 64
SIZES = (1000, 4000, 16000, 32000)
QUICK_SIZES = (1000, 4000)
# PyTorch's map is O(n³): above this it takes minutes.
TORCH_MAX_ROWS = 4000
# Issue 15: 32000 x 64 at most 12 times the time of 4000 x 64 (linear in n would be 8).
REFERENCE_ROWS, LARGEST_ROWS, GOAL = 4000, 32000, 12.0

# The other tall helpers, on the same n x K weight.
RANK = K // 2
HELPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "grassmannian": tether.grassmannian,
    "low_rank": lambda m: tether.low_rank(m, rank=RANK),
    "fixed_rank": lambda m: tether.fixed_rank(m, rank=RANK),
}
# psd_low_rank(rank=K) on an n x n weight of rank K: O(n² K).
PSD_SIZES = (500, 1000, 2000, 4000)
PSD_QUICK_SIZES = (500, 1000)
PSD_REFERENCE_ROWS = 1000
# The dense eigh of the PSD right inverse before: O(n³), a minute at 4000 on one thread.
DENSE_MAX_ROWS = 2000

Row = dict[str, object]


def _step(library: str, n: int, device: str = "cpu") -> Callable[[], None]:
    register = tether.orthogonal if library == "tether" else parametrizations.orthogonal

    def step() -> None:
        layer = register(nn.Linear(K, n, bias=False, device=device))
        layer.weight.sum().backward()

    return step


def _helper_step(helper: str, n: int, device: str = "cpu") -> Callable[[], None]:
    register = HELPERS[helper]

    def step() -> None:
        layer = register(nn.Linear(K, n, bias=False, device=device))
        layer.weight.sum().backward()

    return step


@contextmanager
def _dense_eigh() -> Iterator[None]:
    """The PSD constraints as before Note [Eigenpairs of a symmetric matrix of low rank]."""
    with (
        mock.patch.object(_symmetric, "low_rank_eigh", lambda S, rank: None),
        mock.patch.object(_positive_definite, "low_rank_eigh", lambda S, rank: None),
    ):
        yield


def _psd_step(n: int, dense: bool, device: str = "cpu") -> Callable[[], None]:
    generator = torch.Generator().manual_seed(n)
    B = (torch.randn(n, K, generator=generator) / math.sqrt(n)).to(device)
    member = B @ B.T

    def step() -> None:
        layer = nn.Module()
        layer.weight = nn.Parameter(member.clone())
        if dense:
            with _dense_eigh():
                tether.psd_low_rank(layer, rank=K)
        else:
            tether.psd_low_rank(layer, rank=K)
        layer.weight.sum().backward()

    return step


def _peak_mib(step: Callable[[], None], device: str = "cpu") -> float:
    """The most memory held at once during ``step``, in MiB, from the profiler's events (on
    CUDA, from the allocator's peak beyond what was held before).

    Everything the step holds it allocates itself (a fresh layer), so the running sum of the
    allocation (positive) and free (negative) events within the profile is what it holds.
    The profiler now and then returns a profile without memory events (seen once in a full
    run), so the step is profiled twice and the larger peak kept.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - held) / 2**20
    peak = 0
    for _ in range(2):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = prof.profiler.kineto_results.events()
        memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
        held = 0
        for event in memory:
            held += event.nbytes()
            peak = max(peak, held)
    return peak / 2**20


def rows(quick: bool, device: str = "cpu") -> list[Row]:
    """One row per ``n``: each library's median seconds and peak MiB, and two paired ratios.

    Every step of every size takes its turn in the same rounds, so that load from other
    processes falls on all alike; ``growth`` is tether's time over its time at ``n = 4000``
    and ``torch_over_tether`` PyTorch's over tether's, both medians of per-round ratios
    (``_timing.paired_ratio``). PyTorch's entries are ``None`` above ``TORCH_MAX_ROWS``.
    """
    min_run_time, rounds = (1.0, 3) if quick else (4.0, 5)
    sizes = QUICK_SIZES if quick else SIZES
    psd_sizes = PSD_QUICK_SIZES if quick else PSD_SIZES
    steps = {
        (library, n): _step(library, n, device)
        for n in sizes
        for library in ("tether", "torch")
        if library == "tether" or n <= TORCH_MAX_ROWS
    }
    steps.update(
        {(helper, n): _helper_step(helper, n, device) for helper in HELPERS for n in sizes}
    )
    steps.update({("psd_low_rank", n): _psd_step(n, False, device) for n in psd_sizes})
    steps.update(
        {("psd_dense", n): _psd_step(n, True, device) for n in psd_sizes if n <= DENSE_MAX_ROWS}
    )
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
                "helper": "orthogonal",
                "n": n,
                "k": K,
                "tether_seconds": median(ours),
                "torch_seconds": None if theirs is None else median(theirs),
                "torch_over_tether": None if theirs is None else paired_ratio(theirs, ours),
                "growth": None if reference is None else paired_ratio(ours, reference),
                "tether_peak_mib": _peak_mib(steps[("tether", n)], device),
                "torch_peak_mib": None if torch_step is None else _peak_mib(torch_step, device),
            }
        )
    for helper, helper_sizes, reference_rows in (
        *((helper, sizes, REFERENCE_ROWS) for helper in HELPERS),
        ("psd_low_rank", psd_sizes, PSD_REFERENCE_ROWS),
    ):
        reference = times.get(names.get((helper, reference_rows), ""))
        for n in helper_sizes:
            ours = times[names[(helper, n)]]
            dense = times.get(names.get(("psd_dense", n), "")) if helper == "psd_low_rank" else None
            result.append(
                {
                    "helper": helper,
                    "n": n,
                    "k": K,
                    "seconds": median(ours),
                    "peak_mib": _peak_mib(steps[(helper, n)], device),
                    "growth": None if reference is None else paired_ratio(ours, reference),
                    "reference_rows": reference_rows,
                    "dense_over_ours": None if dense is None else paired_ratio(dense, ours),
                }
            )
    return result


def _number(value: object, format: Callable[[float], str]) -> str:
    return format(value) if isinstance(value, float) else "-"


def table(result: list[Row]) -> str:
    """The markdown tables of :func:`rows`, and the targets on the growth from 4000 to 32000."""
    orthogonal = [row for row in result if row["helper"] == "orthogonal"]
    others = [row for row in result if row["helper"] != "orthogonal"]
    return f"{_orthogonal_table(orthogonal)}\n\n{_helpers_table(others)}"


def _helpers_table(result: list[Row]) -> str:
    lines = [
        [
            str(row["helper"]),
            f"{row['n']} x {row['n'] if row['helper'] == 'psd_low_rank' else row['k']}",
            _number(row["seconds"], ms),
            _number(row["peak_mib"], lambda mib: f"{mib:.1f}"),
            _number(row["growth"], ratio) + f" (n = {row['reference_rows']})",
            _number(row["dense_over_ours"], ratio),
        ]
        for row in result
    ]
    columns = [
        "helper",
        "weight",
        "time (ms)",
        "peak (MiB)",
        "time / time at n",
        "dense eigh / ours",
    ]
    targets = []
    for row in result:
        growth = row["growth"]
        if row["n"] == LARGEST_ROWS and isinstance(growth, float):
            goal = f"<= {GOAL:g}x (linear: {LARGEST_ROWS // REFERENCE_ROWS}x)"
            label = f"{row['helper']}, {LARGEST_ROWS} x {K} over {REFERENCE_ROWS} x {K}"
            targets.append(target(label, growth, goal, growth <= GOAL))
    note = (
        f"psd_low_rank(rank={K}) has an n x n weight: its step is O(n² k), so its time grows "
        f"16x from n = {PSD_REFERENCE_ROWS} to 4000; the last column is the same step through "
        f"the dense eigh of before (O(n³)), up to n = {DENSE_MAX_ROWS}."
    )
    return "\n\n".join(
        [markdown_table(columns, lines), *(["\n".join(targets)] if targets else []), note]
    )


def _orthogonal_table(result: list[Row]) -> str:
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
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    arguments = parser.parse_args()
    # One thread, as the other benchmarks: on a shared machine, threads that wait for each
    # other's time slices make the larger sizes look slower than they are.
    torch.set_num_threads(1)
    print(header())
    print()
    print(table(rows(arguments.quick, arguments.device)))


if __name__ == "__main__":
    main()
