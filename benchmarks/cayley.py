"""The Cayley map: tether's against PyTorch's, and a training step against POGO.

Three tables, every candidate timed side by side in this process (``_timing.measure``):

1. The Cayley map, forward + backward of a float32 ``(n, n)`` weight: an orthogonal
   ``Linear(n, n)`` (``tether.orthogonal`` against ``torch.nn.utils.parametrizations.orthogonal``,
   both with ``orthogonal_map="cayley"`` and their default base point), and the map alone
   (``tether.functional.cayley`` against ``torch.linalg.solve(I - A/2, I + A/2)``, PyTorch's
   formulation). The original is a Gaussian ``X / √n``, as in ``orthogonal_maps.py``.
2. One training step of an orthogonal ``Linear(n, n)``, batch 64, mean squared error: each of
   tether's maps with Adam (the Cayley map also without its base point,
   ``use_trivialization=False``), PyTorch's Cayley map with Adam, and POGO (``pogo-torch``, an
   optimizer that keeps a plain weight near the orthogonal matrices, with its VectorAdam).
3. Convolution kernels, ``Conv2d(256, 256, 3)`` (65,536 matrices of 3 x 3) and of 2 x 2:
   forward + backward of the kernel with the Cayley and the Householder maps, layer and map;
   ``SO(n)`` rows register ``tether.special_orthogonal`` against PyTorch's ``orthogonal``.

Errors are ``max |WᵀW - I|`` (for training, after the timed steps). Never a pass/fail gate.

    python benchmarks/cayley.py            # n = 64, 256, 1024 (a few minutes)
    python benchmarks/cayley.py --quick    # shorter runs, smaller sizes
    python benchmarks/cayley.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _timing import header, measure, median, ms, paired_ratio, ratio
from _timing import table as markdown_table
from orthogonal_maps import orthogonal_layer, weight_step
from torch import nn
from torch.nn.utils import parametrizations

import tether
from tether.functional import cayley, householder

try:
    from pogo import POGO
    from pogo.base import VectorAdam
except ModuleNotFoundError:  # the bench extra is not installed: no POGO column
    POGO = None

SIZES = (64, 256, 1024)
QUICK_SIZES = (64, 256)
TRAINING_SIZES = (256, 1024)
QUICK_TRAINING_SIZES = (256,)
TETHER_MAPS = ("cayley", "householder", "matrix_exp")
BATCH = 64
LR = 1e-3

Row = dict[str, Any]


def _error(W: torch.Tensor) -> float:
    W = W.detach().double().flatten(0, -3) if W.dim() > 2 else W.detach().double()
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    return (W.mT @ W - eye).abs().max().item()


def _map_step(f: Callable[[torch.Tensor], torch.Tensor], A: torch.Tensor, cotangent: torch.Tensor):
    leaf = A.clone().requires_grad_()

    def step() -> None:
        leaf.grad = None
        (f(leaf) * cotangent).sum().backward()

    return step


def _torch_cayley(A: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye - A / 2, eye + A / 2)


def _torch_householder(X: torch.Tensor) -> torch.Tensor:
    A = X.tril(-1)
    return torch.linalg.householder_product(A, 2.0 / (1.0 + (A * A).sum(dim=-2)))


def map_rows(sizes: Sequence[int], quick: bool, device: str = "cpu") -> list[Row]:
    """Table 1: the orthogonal layer and the map alone, torch against tether."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for n in sizes:
        original = torch.randn(n, n, generator=generator) / math.sqrt(n)
        cotangent = torch.randn(n, n, generator=generator).to(device)
        L = original.tril()
        A = (L - L.mT).to(device)
        layers = {
            lib: orthogonal_layer(lib, "cayley", original).to(device) for lib in ("torch", "tether")
        }
        seconds = (0.3 if quick else 2.0) * (3.0 if n >= 1024 else 1.0)
        row: Row = {"section": "map", "n": n}
        candidates = {lib: weight_step(layer, cotangent) for lib, layer in layers.items()}
        for lib, layer in layers.items():
            row[f"{lib}_error"] = _error(layer.weight)
        candidates |= {
            "torch_map": _map_step(_torch_cayley, A, cotangent),
            "tether_map": _map_step(cayley, A, cotangent),
        }
        times = measure(candidates, seconds, rounds=3)
        for name, blocks in times.items():
            row[f"{name}_ms"] = median(blocks) * 1e3
        row["layer_speedup"] = paired_ratio(times["torch"], times["tether"])
        row["map_speedup"] = paired_ratio(times["torch_map"], times["tether_map"])
        with torch.no_grad():
            row["torch_map_error"] = _error(_torch_cayley(A))
            row["tether_map_error"] = _error(cayley(A))
        rows.append(row)
    return rows


def _training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    return step


def training_rows(sizes: Sequence[int], quick: bool, device: str = "cpu") -> list[Row]:
    """Table 2: one training step, each of tether's maps and torch's Cayley with Adam, POGO."""
    rows = []
    generator = torch.Generator().manual_seed(1)
    for n in sizes:
        x = torch.randn(BATCH, n, generator=generator).to(device)
        y = torch.randn(BATCH, n, generator=generator).to(device)
        models: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
        theirs = parametrizations.orthogonal(
            nn.Linear(n, n, bias=False, device=device), orthogonal_map="cayley"
        )
        models["torch cayley"] = (theirs, torch.optim.Adam(theirs.parameters(), lr=LR))
        for orthogonal_map in TETHER_MAPS:
            ours = tether.orthogonal(
                nn.Linear(n, n, bias=False, device=device), orthogonal_map=orthogonal_map
            )
            models[f"tether {orthogonal_map}"] = (ours, torch.optim.Adam(ours.parameters(), lr=LR))
        # Without the base point the map is 2 M⁻¹ - I: one product fewer each way.
        ours = tether.orthogonal(
            nn.Linear(n, n, bias=False, device=device),
            orthogonal_map="cayley",
            use_trivialization=False,
        )
        models["tether cayley, no base"] = (ours, torch.optim.Adam(ours.parameters(), lr=LR))
        if POGO is not None:
            plain = nn.Linear(n, n, bias=False, device=device)
            nn.init.orthogonal_(plain.weight)
            pogo = POGO(
                [plain.weight],
                base_optimizer=VectorAdam(),
                lr=LR,
                flatten_fn=lambda W: W.view(1, *W.shape),  # POGO takes batches of matrices
            )
            models["pogo"] = (plain, pogo)
        steps = {name: _training_step(model, opt, x, y) for name, (model, opt) in models.items()}
        seconds = (0.5 if quick else 3.0) * (3.0 if n >= 1024 else 1.0)
        times = measure(steps, seconds, rounds=3)
        for name, blocks in times.items():
            model = models[name][0]
            rows.append(
                {
                    "section": "training",
                    "n": n,
                    "method": name,
                    "ms": median(blocks) * 1e3,
                    "vs_pogo": (
                        paired_ratio(blocks, times["pogo"]) if "pogo" in times else math.nan
                    ),
                    "error": _error(model.weight),
                }
            )
    return rows


def conv_rows(quick: bool, device: str = "cpu") -> list[Row]:
    """Table 3: convolution kernels, a batch of small matrices, layer and map."""
    rows = []
    generator = torch.Generator().manual_seed(2)
    for k in (2, 3):
        shape = (256, 256, k, k)
        cotangent = torch.randn(shape, generator=generator).to(device)
        X = (torch.randn(shape, generator=generator) / math.sqrt(k)).to(device)
        L = X.tril()
        A = L - L.mT
        for label in ("cayley", "cayley, SO(n)", "householder"):
            orthogonal_map = label.split(",")[0]
            ours = tether.special_orthogonal if "SO" in label else tether.orthogonal
            layers = {}
            for lib in ("torch", "tether"):
                conv = nn.Conv2d(256, 256, k, bias=False, device=device)
                register = ours if lib == "tether" else parametrizations.orthogonal
                layers[lib] = register(conv, orthogonal_map=orthogonal_map)
            if orthogonal_map == "cayley":
                maps = {"torch_map": _torch_cayley, "tether_map": cayley}
                argument = A
            else:
                maps = {"torch_map": _torch_householder, "tether_map": householder}
                argument = X
            candidates = {lib: weight_step(layer, cotangent) for lib, layer in layers.items()}
            candidates |= {name: _map_step(f, argument, cotangent) for name, f in maps.items()}
            times = measure(candidates, 0.5 if quick else 3.0, rounds=3)
            row: Row = {"section": "conv", "kernel": f"{k} x {k}", "map": label}
            for name, blocks in times.items():
                row[f"{name}_ms"] = median(blocks) * 1e3
            row["layer_speedup"] = paired_ratio(times["torch"], times["tether"])
            row["map_speedup"] = paired_ratio(times["torch_map"], times["tether_map"])
            row["torch_error"] = _error(layers["torch"].weight)
            row["tether_error"] = _error(layers["tether"].weight)
            rows.append(row)
    return rows


def rows(quick: bool, device: str = "cpu") -> list[Row]:
    """The rows of the three tables; ``section`` says which (``map``, ``training``, ``conv``)."""
    return [
        *map_rows(QUICK_SIZES if quick else SIZES, quick, device),
        *training_rows(QUICK_TRAINING_SIZES if quick else TRAINING_SIZES, quick, device),
        *conv_rows(quick, device),
    ]


def _seconds(value: float) -> str:
    return ms(value / 1e3)


def table(rows: Sequence[Row]) -> str:
    """The rows as three markdown tables, each under its heading."""
    sections = []
    maps = [r for r in rows if r["section"] == "map"]
    if maps:
        body = [
            [
                r["n"],
                _seconds(r["torch_ms"]),
                _seconds(r["tether_ms"]),
                ratio(r["layer_speedup"]),
                _seconds(r["torch_map_ms"]),
                _seconds(r["tether_map_ms"]),
                ratio(r["map_speedup"]),
                f"{r['torch_error']:.1e}",
                f"{r['tether_error']:.1e}",
            ]
            for r in maps
        ]
        columns = [
            "n",
            "torch layer (ms)",
            "tether layer (ms)",
            "speedup",
            "torch map (ms)",
            "tether map (ms)",
            "speedup",
            "torch error",
            "tether error",
        ]
        sections += [
            "### Cayley map: forward + backward of a float32 `(n, n)` weight",
            markdown_table(columns, body),
            "layer: an orthogonal `Linear(n, n)`, base point included; map: the map alone. "
            "speedup = torch time / tether time; error = max |WᵀW - I|.",
        ]
    training = [r for r in rows if r["section"] == "training"]
    if training:
        body = [
            [
                r["n"],
                r["method"],
                _seconds(r["ms"]),
                "" if math.isnan(r["vs_pogo"]) else ratio(r["vs_pogo"]),
                f"{r['error']:.1e}",
            ]
            for r in training
        ]
        sections += [
            f"### Training step of an orthogonal `Linear(n, n)`, batch {BATCH}",
            markdown_table(["n", "method", "step (ms)", "time / POGO's", "error"], body),
            "Adam (lr 1e-3) for the parametrizations, VectorAdam inside POGO; error = "
            "max |WᵀW - I| after the timed steps (POGO only lands near the orthogonal matrices).",
            _training_targets(training),
        ]
    conv = [r for r in rows if r["section"] == "conv"]
    if conv:
        body = [
            [
                r["kernel"],
                r["map"],
                _seconds(r["torch_ms"]),
                _seconds(r["tether_ms"]),
                ratio(r["layer_speedup"]),
                _seconds(r["torch_map_ms"]),
                _seconds(r["tether_map_ms"]),
                ratio(r["map_speedup"]),
                f"{r['torch_error']:.1e}",
                f"{r['tether_error']:.1e}",
            ]
            for r in conv
        ]
        columns = [
            "kernel",
            "map",
            "torch layer (ms)",
            "tether layer (ms)",
            "speedup",
            "torch map (ms)",
            "tether map (ms)",
            "speedup",
            "torch error",
            "tether error",
        ]
        sections += [
            "### Convolution kernels: `Conv2d(256, 256, k)`, 65,536 matrices of k x k",
            markdown_table(columns, body),
            "Forward + backward of the kernel; layer includes the constraint's own work "
            "(generator, base point), map is the map alone; SO(n): tether.special_orthogonal "
            "against torch's orthogonal.",
        ]
    return "\n\n".join(sections)


def _training_targets(training: Sequence[Row]) -> str:
    """Whether tether's fastest map is no slower than POGO, per size."""
    lines = []
    for n in sorted({r["n"] for r in training}):
        ours = [r for r in training if r["n"] == n and str(r["method"]).startswith("tether")]
        best = min(ours, key=lambda r: r["vs_pogo"] if not math.isnan(r["vs_pogo"]) else r["ms"])
        if math.isnan(best["vs_pogo"]):
            lines.append(f"- n = {n}: POGO not installed (pip install -e '.[bench]')")
            continue
        met = "met" if best["vs_pogo"] <= 1.0 else "missed"
        lines.append(
            f"- n = {n}: fastest tether map ({best['method']}) at "
            f"{best['vs_pogo']:.2f}x POGO's time (target <= 1): {met}"
        )
    return "\n".join(lines)


def run(quick: bool = False, device: str = "cpu") -> str:
    """The three tables at once, for ``benchmarks/run.py``."""
    return table(rows(quick, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, smaller sizes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(header())
    print()
    print(run(args.quick, args.device))


if __name__ == "__main__":
    main()
