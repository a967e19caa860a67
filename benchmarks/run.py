"""Run tether's benchmarks and print their tables in markdown.

    python benchmarks/run.py            # the full run (about 10 minutes)
    python benchmarks/run.py --quick    # a shorter, noisier run (about a minute)
    python benchmarks/run.py --only getter rnn

Every table times tether side by side with PyTorch's equivalent (and geotorch's) in this one
process. Benchmarks never assert: a target that is missed is reported as such.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable

import torch
from _timing import header, ms, ratio, table

BENCHMARKS = ["getter", "rnn", "constraints", "orthogonal_maps", "compile", "scale"]


def orthogonal_maps(quick: bool) -> str | None:
    """The table of ``benchmarks/orthogonal_maps.py``, or None while that file is absent."""
    try:
        module = importlib.import_module("orthogonal_maps")
    except ModuleNotFoundError as error:
        if error.name != "orthogonal_maps":
            raise
        return None
    sizes = (64, 256) if quick else (64, 256, 1024)
    rows = module.run(sizes, quick)
    columns = ["map", "n", "torch (ms)", "tether (ms)", "speedup", "torch error", "tether error"]
    peaks = bool(rows) and "torch_peak_mib" in rows[0] and "tether_peak_mib" in rows[0]
    if peaks:
        columns += ["torch peak (MiB)", "tether peak (MiB)"]
    body = []
    for row in rows:
        cells = [
            row["map"],
            row["n"],
            ms(row["torch_ms"] / 1e3),
            ms(row["tether_ms"] / 1e3),
            ratio(row["speedup"]),
            f"{row['torch_error']:.1e}",
            f"{row['tether_error']:.1e}",
        ]
        if peaks:
            cells += [f"{row['torch_peak_mib']:.1f}", f"{row['tether_peak_mib']:.1f}"]
        body.append(cells)
    return "\n\n".join(
        [
            "### Orthogonal maps: tether against PyTorch",
            table(columns, body),
            "speedup = torch time / tether time; error = max |WᵀW - I|.",
            *([module.targets(rows)] if peaks and hasattr(module, "targets") else []),
        ]
    )


def runner(name: str) -> Callable[[bool], str | None]:
    if name == "orthogonal_maps":
        return orthogonal_maps
    return importlib.import_module(name).run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, smaller sizes")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: small kernels time steadily even on a busy machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print("## tether benchmarks" + (" (quick)" if args.quick else ""))
    print()
    print(header())
    start = time.perf_counter()
    for name in args.only or BENCHMARKS:
        section_start = time.perf_counter()
        section = runner(name)(args.quick)
        if section is None:
            continue
        print()
        print(section)
        print(f"\n({name}: {time.perf_counter() - section_start:.0f} s)", flush=True)
    print(f"\nTotal: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
