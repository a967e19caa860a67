"""A compiled training step: tether's constraints against PyTorch's, eager and compiled.

The model stacks an orthogonal, a spectrally normalized and a pruned (L1, 50 %) layer. With
PyTorch these are ``parametrizations.orthogonal``, ``parametrizations.spectral_norm`` and
``prune.l1_unstructured`` (which uses a forward pre-hook rather than a parametrization). The
forward pass is compiled with ``torch.compile``; the backward pass runs what the compiler
produced for it, and the optimizer step is eager.
"""

from __future__ import annotations

import copy
import time

import torch
from _timing import measure, ms, paired_ratio, rows, table, target
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.utils import parametrizations as torch_parametrizations
from torch.nn.utils import prune as torch_prune

import tether

WIDTH = 256
BATCH = 64


def base_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(WIDTH, WIDTH),
        nn.Tanh(),
        nn.Linear(WIDTH, WIDTH),
        nn.Tanh(),
        nn.Linear(WIDTH, WIDTH),
    )


def tether_model(base: nn.Sequential) -> nn.Sequential:
    model = copy.deepcopy(base)
    tether.orthogonal(model[0])
    tether.spectral_norm(model[2])
    tether.prune.l1_unstructured(model[4], "weight", amount=0.5)
    return tether.autocache(model)


def torch_model(base: nn.Sequential) -> nn.Sequential:
    model = copy.deepcopy(base)
    torch_parametrizations.orthogonal(model[0])
    torch_parametrizations.spectral_norm(model[2])
    torch_prune.l1_unstructured(model[4], "weight", amount=0.5)
    return model


def training_step(model: nn.Module, call: nn.Module, x: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad()
        call(x).square().mean().backward()
        optimizer.step()

    return step


def run(quick: bool = False) -> str:
    backend = "aot_eager" if quick else "inductor"
    base = base_model()
    x = torch.randn(BATCH, WIDTH)
    candidates = {}
    compile_rows = []
    for label, build in [("tether", tether_model), ("torch", torch_model)]:
        eager = build(base)
        candidates[f"{label}, eager"] = training_step(eager, eager, x)
        model = build(base)
        torch._dynamo.reset()
        counters.clear()
        step = training_step(model, torch.compile(model, backend=backend), x)
        start = time.perf_counter()
        step()  # compiles
        first = time.perf_counter() - start
        for _ in range(3):
            step()
        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
        candidates[f"{label}, compiled"] = step
        compile_rows.append([label, f"{first:.1f}", graphs, breaks])
    times = measure(candidates, 0.5 if quick else 4.0, rounds=1 if quick else 10)
    speedup = paired_ratio(times["torch, compiled"], times["tether, compiled"])
    breaks = sum(row[3] for row in compile_rows if row[0] == "tether")
    graphs = sum(row[2] for row in compile_rows if row[0] == "tether")
    return "\n\n".join(
        [
            f"### Training step, `Linear({WIDTH}, {WIDTH})` x 3 (orthogonal, spectral norm, "
            f"pruned), batch {BATCH}, `torch.compile(backend={backend!r})`",
            table(
                ["model", "time per step (ms)", "vs tether compiled"],
                rows(times, "tether, compiled", ms),
            ),
            table(["library", "first step (s)", "graphs compiled", "graph breaks"], compile_rows),
            "\n".join(
                [
                    target("torch compiled / tether compiled", speedup, ">= 1", speedup >= 1),
                    target("tether graph breaks", breaks, "0", breaks == 0),
                    target("tether graphs compiled in 4 steps", graphs, "1", graphs == 1),
                ]
            ),
        ]
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
