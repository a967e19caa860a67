"""Prune a small classifier in steps, fine-tuning in between: accuracy against sparsity.

Trains a small MLP to tell apart three interleaved 2-D spirals (generated on the fly, nothing
is downloaded), then prunes its weights step by step up to 95% sparsity, fine-tuning briefly
after each step, in two ways:

* layer by layer: ``tether.prune.l1_unstructured`` prunes each layer by the same fraction;
* globally: ``tether.prune.global_unstructured`` ranks the weights of all layers together.

It prints the test accuracy right after each pruning step and after fine-tuning, then the
per-tensor table of ``tether.prune.sparsity``, and makes the pruning permanent with
``tether.prune.remove``. Run it with ``python examples/prune_steps.py`` (a minute or so);
``--quick`` runs a smaller version in a few seconds.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from torch import Tensor, nn

from tether import prune

SPARSITIES = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95]


def spirals(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` points on each of three noisy spiral arms, and their labels."""
    t = torch.rand(3, n, generator=generator).sqrt() * 3 * math.pi
    angle = t + torch.arange(3).unsqueeze(1) * 2 * math.pi / 3
    points = torch.stack([t * angle.cos(), t * angle.sin()], dim=-1) / (3 * math.pi)
    points = points + 0.03 * torch.randn(points.shape, generator=generator)
    labels = torch.arange(3).repeat_interleave(n)
    return points.reshape(-1, 2), labels


def classifier(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(2, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 3),
    )


def layers(model: nn.Sequential) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model if isinstance(m, nn.Linear)]


def train(model: nn.Module, data: tuple[Tensor, Tensor], steps: int, lr: float) -> None:
    points, labels = data
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(points), labels).backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    points, labels = data
    return (model(points).argmax(dim=1) == labels).float().mean().item()


def pruned_count(module: nn.Module) -> int:
    """How many weights of ``module`` the mask prunes (0 before the first pruning)."""
    if not prune.is_pruned(module):
        return 0
    return int((module.parametrizations.weight[0].mask == 0).sum())


def prune_layerwise(model: nn.Sequential, sparsity: float) -> None:
    """Bring each layer to ``sparsity``: an int amount counts the weights still to prune."""
    for module, name in layers(model):
        target = round(sparsity * getattr(module, name).numel())
        prune.l1_unstructured(module, name, amount=target - pruned_count(module))


def prune_globally(model: nn.Sequential, sparsity: float) -> None:
    """Bring the weights of all layers together to ``sparsity``."""
    pairs = layers(model)
    total = sum(getattr(m, n).numel() for m, n in pairs)
    done = sum(pruned_count(m) for m, _ in pairs)
    amount = round(sparsity * total) - done
    prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=amount)


def main(argv: list[str] | None = None) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: one thread is fastest
    try:
        run(argv)
    finally:
        torch.set_num_threads(threads)


def run(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, in a few seconds")
    args = parser.parse_args(argv)
    points, width, steps, tune = (150, 48, 300, 60) if args.quick else (1000, 128, 2000, 300)

    generator = torch.Generator().manual_seed(0)
    train_data, test_data = spirals(points, generator), spirals(points, generator)
    torch.manual_seed(0)
    dense = classifier(width)
    train(dense, train_data, steps, lr=1e-2)
    print(
        f"dense model: {sum(p.numel() for p in dense.parameters())} parameters, "
        f"test accuracy {accuracy(dense, test_data):.3f}\n"
    )

    strategies = {"layer-wise l1": prune_layerwise, "global l1": prune_globally}
    models = {name: copy.deepcopy(dense) for name in strategies}
    print("sparsity | layer-wise l1: pruned  tuned | global l1: pruned  tuned")
    for sparsity in SPARSITIES:
        cells = []
        for name, strategy in strategies.items():
            model = models[name]
            strategy(model, sparsity)
            measured = prune.sparsity(model).total.fraction
            if abs(measured - sparsity) > 1e-3:
                raise RuntimeError(f"{name}: asked for {sparsity:.0%}, measured {measured:.1%}")
            pruned = accuracy(model, test_data)
            train(model, train_data, tune, lr=3e-3)
            cells.append(f"{pruned:.3f}  {accuracy(model, test_data):.3f}")
        print(f"{sparsity:>7.0%}  |{' ' * 16}{cells[0]} |{' ' * 12}{cells[1]}")

    final = models["global l1"]
    print(f"\nglobal l1 at {SPARSITIES[-1]:.0%}, per tensor:\n{prune.sparsity(final)}")
    before = accuracy(final, test_data)
    for module, name in layers(final):
        prune.remove(module, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in layers(final))
    print(
        f"\nafter prune.remove: plain {type(final[0]).__name__} layers, {zeros} zero weights, "
        f"test accuracy {accuracy(final, test_data):.3f} (before: {before:.3f})"
    )


if __name__ == "__main__":
    main()
