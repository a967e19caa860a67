"""Orthogonal maps: tether's against ``torch.nn.utils.parametrizations.orthogonal``.

Both libraries constrain the ``(n, n)`` float32 weight of a ``Linear(n, n)`` with the same map
(and the default ``use_trivialization=True``), and both originals are set to the same point,
a Gaussian ``X / √n`` (so ``‖A‖₂ ≈ 3``: a weight some way from its base, as in training) with
``±1`` on the diagonal (where PyTorch's Householder map would truncate ``|X[i, i]| < 1`` to 0).
The time is the median of one read of ``layer.weight`` plus a backward pass through it;
the error is ``max |WᵀW - I|``; the peak is the most memory that the step holds at once
beyond what was held before it, from ``torch.profiler``'s allocation events.

    python benchmarks/orthogonal_maps.py             # n = 64, 256, 1024 (a few minutes)
    python benchmarks/orthogonal_maps.py --quick     # shorter runs, n = 64, 256
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from _timing import compare, header, ms, ratio, table, target
from torch import nn
from torch.nn.utils import parametrizations
from torch.profiler import ProfilerActivity, profile, record_function

import tether

MAPS = ("matrix_exp", "householder")
SIZES = (64, 256, 1024)
QUICK_SIZES = (64, 256)
# The speedups asked of each map at n = 256 and 1024.
GOALS = {"matrix_exp": 4.0, "householder": 5.0}

Row = dict[str, object]


def orthogonal_layer(library: str, orthogonal_map: str, original: torch.Tensor) -> nn.Linear:
    """An orthogonal ``Linear`` of ``library`` ("tether" or "torch") with ``original`` as its
    unconstrained tensor, so that both libraries start from the same point."""
    layer = nn.Linear(original.shape[-1], original.shape[-2], bias=False)
    register = tether.orthogonal if library == "tether" else parametrizations.orthogonal
    register(layer, orthogonal_map=orthogonal_map)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(original)
    return layer


def weight_step(layer: nn.Module, cotangent: torch.Tensor) -> Callable[[], None]:
    """One read of ``layer.weight`` and a backward pass from ``cotangent``."""

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        (layer.weight * cotangent).sum().backward()

    return step


def _error(layer: nn.Linear) -> float:
    with torch.no_grad():
        W = layer.weight.double()
        eye = torch.eye(W.shape[-1], dtype=W.dtype)
        return (W.mT @ W - eye).abs().max().item()


def _peak_mib(step: Callable[[], None]) -> float:
    """The most memory held at once during ``step``, beyond what was held before, in MiB.

    The step runs twice under the profiler and the second run is measured: every block it
    frees (the previous gradient first) was then allocated under the profiler, which reports
    the size of a block freed only if it saw the block allocated.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        with record_function("measured"):
            step()
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == "measured")
    start, end = window.start_ns(), window.start_ns() + window.duration_ns()
    memory = [e for e in events if e.name() == "[memory]" and start <= e.start_ns() <= end]
    held = peak = 0
    for event in sorted(memory, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak / 2**20


def run(sizes: Sequence[int] = SIZES, quick: bool = False) -> list[Row]:
    """One row per map and size: times in ms, ``speedup`` = torch time / tether time.

    Keys: ``map``, ``n``, ``torch_ms``, ``tether_ms``, ``speedup``, ``torch_error``,
    ``tether_error`` (``max |WᵀW - I|``), ``torch_peak_mib``, ``tether_peak_mib``.
    """
    rows: list[Row] = []
    generator = torch.Generator().manual_seed(0)
    for n in sizes:
        # The large steps take seconds each: a few runs are enough to see ratios of 5.
        min_run_time = (0.1 if quick else 0.5) * (0.2 if n >= 1024 else 1.0)
        for orthogonal_map in MAPS:
            original = torch.randn(n, n, generator=generator) / n**0.5
            original.diagonal().copy_(original.diagonal().sign())
            cotangent = torch.randn(n, n, generator=generator)
            layers = {
                lib: orthogonal_layer(lib, orthogonal_map, original) for lib in ("torch", "tether")
            }
            steps = {lib: weight_step(layer, cotangent) for lib, layer in layers.items()}
            times = compare(steps, min_run_time, rounds=1 if n >= 1024 or quick else 3)
            peaks = {lib: _peak_mib(step) for lib, step in steps.items()}
            rows.append(
                {
                    "map": orthogonal_map,
                    "n": n,
                    "torch_ms": times["torch"] * 1e3,
                    "tether_ms": times["tether"] * 1e3,
                    "speedup": times["torch"] / times["tether"],
                    "torch_error": _error(layers["torch"]),
                    "tether_error": _error(layers["tether"]),
                    "torch_peak_mib": peaks["torch"],
                    "tether_peak_mib": peaks["tether"],
                }
            )
    return rows


def report(rows: Sequence[Row]) -> str:
    """The rows as a markdown table, followed by the targets at n = 256 and 1024."""
    columns = [
        "map",
        "n",
        "torch (ms)",
        "tether (ms)",
        "speedup",
        "torch error",
        "tether error",
        "torch peak (MiB)",
        "tether peak (MiB)",
    ]
    body = [
        [
            row["map"],
            row["n"],
            ms(float(row["torch_ms"]) / 1e3),  # type: ignore[arg-type]
            ms(float(row["tether_ms"]) / 1e3),  # type: ignore[arg-type]
            ratio(float(row["speedup"])),  # type: ignore[arg-type]
            f"{row['torch_error']:.1e}",
            f"{row['tether_error']:.1e}",
            f"{row['torch_peak_mib']:.1f}",
            f"{row['tether_peak_mib']:.1f}",
        ]
        for row in rows
    ]
    return "\n\n".join(
        [
            "### Orthogonal maps: forward + backward of a float32 `(n, n)` weight",
            table(columns, body),
            "speedup = torch time / tether time; error = max |WᵀW - I|.",
            targets(rows),
        ]
    )


def targets(rows: Sequence[Row]) -> str:
    """The targets at n = 256 and 1024: each map's speedup, and a peak no higher than torch's."""
    lines = []
    for row in rows:
        if row["n"] not in (256, 1024):
            continue
        name, speedup = str(row["map"]), float(row["speedup"])  # type: ignore[arg-type]
        goal = GOALS[name]
        lines.append(
            target(f"{name} speedup at n = {row['n']}", speedup, f">= {goal:.0f}x", speedup >= goal)
        )
        peak = float(row["tether_peak_mib"]) / float(row["torch_peak_mib"])  # type: ignore[arg-type]
        lines.append(target(f"{name} peak / torch peak at n = {row['n']}", peak, "<= 1", peak <= 1))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, n = 64 and 256")
    parser.add_argument("--sizes", type=int, nargs="+", help="matrix sizes n")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(header())
    print()
    print(report(run(args.sizes or (QUICK_SIZES if args.quick else SIZES), args.quick)))


if __name__ == "__main__":
    main()
