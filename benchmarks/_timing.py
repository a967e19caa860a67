"""Shared helpers of the benchmarks: interleaved timing, the machine header, markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable, Sequence
from importlib import metadata

import torch
from torch.utils import benchmark

Candidates = dict[str, str | Callable[[], object]]


def measure(
    candidates: Candidates,
    min_run_time: float,
    rounds: int = 3,
    env: dict[str, object] | None = None,
) -> dict[str, list[list[float]]]:
    """Seconds per call of each candidate, block by block, round by round, side by side.

    A candidate is a callable or a statement evaluated in ``env`` (a statement avoids the cost
    of a call when timing something as small as an attribute read). The candidates take
    turns: each round times every candidate for ``min_run_time / rounds`` seconds with
    ``torch.utils.benchmark``, so that load from other processes falls on all of them alike.
    The calls that ``blocked_autorange`` makes to choose a block size warm up and are not
    counted.
    """
    timers = {}
    for name, candidate in candidates.items():
        scope = dict(env or {})
        if callable(candidate):
            scope["fn"] = candidate
            candidate = "fn()"
        timers[name] = benchmark.Timer(
            stmt=candidate, globals=scope, num_threads=torch.get_num_threads()
        )
    times: dict[str, list[list[float]]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time / rounds).times)
    return times


def compare(
    candidates: Candidates,
    min_run_time: float,
    rounds: int = 3,
    env: dict[str, object] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each candidate over all blocks of :func:`measure`."""
    times = measure(candidates, min_run_time, rounds, env)
    return {name: median(blocks) for name, blocks in times.items()}


def median(rounds: list[list[float]]) -> float:
    """The median over all blocks of all rounds."""
    return statistics.median(t for blocks in rounds for t in blocks)


def paired_ratio(numerator: list[list[float]], denominator: list[list[float]]) -> float:
    """The median over rounds of the ratio of two candidates' medians in the same round.

    Each ratio compares blocks measured moments apart, so a machine whose load changes during
    the run (other processes) disturbs it far less than the ratio of overall medians.
    """
    return statistics.median(
        statistics.median(a) / statistics.median(b)
        for a, b in zip(numerator, denominator, strict=True)
    )


def rows(
    times: dict[str, list[list[float]]], reference: str, unit: Callable[[float], str]
) -> list[list[str]]:
    """Table rows: each candidate's median time and its paired ratio to ``reference``."""
    return [
        [name, unit(median(rounds)), ratio(paired_ratio(rounds, times[reference]))]
        for name, rounds in times.items()
    ]


def target(label: str, value: float, goal: str, met: bool) -> str:
    """One line of a benchmark's list of targets."""
    return f"- {label}: {value:.2f} (target {goal}): {'met' if met else 'missed'}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def header() -> str:
    """The machine and the library versions, as a markdown list."""
    return "\n".join(
        [
            f"- CPU: {_cpu_model()}, {os.cpu_count()} cores, "
            f"torch threads: {torch.get_num_threads()}",
            f"- Python {platform.python_version()}, torch {torch.__version__}, "
            f"tether {_version('tether')}, geotorch {_version('geotorch')}",
        ]
    )


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; the first column is left-aligned, the others right-aligned."""
    align = [":---", *["---:"] * (len(columns) - 1)]
    lines = [columns, align, *[[str(cell) for cell in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.2f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 1e-2 else f"{seconds * 1e3:.1f}"


def ratio(value: float) -> str:
    return f"{value:.2f}x"
