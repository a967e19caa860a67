"""A classifier with a certified Lipschitz bound, from spectral normalization.

Each ``Linear`` layer of a small MLP gets ``tether.spectral_norm(..., exact=True)``, so its
largest singular value is exactly 1, and the activations (ReLU) are 1-Lipschitz: the
network's logits are then 1-Lipschitz in the input, whatever the training does. The logits
are scaled by a fixed temperature so that the classifier can still be confident. A bound
``L`` on the Lipschitz constant certifies robustness: a point classified with margin ``m``
(the gap between its two largest logits) keeps its label under any perturbation of norm
below ``m / (√2 L)``.

It trains the constrained MLP and an unconstrained one on two interleaved half-moons, then
prints their accuracy, the Lipschitz bound (the product of the layers' spectral norms) next to
the largest gradient norm found on the data (a lower estimate of the true constant), and the
median certified radius. Run it with ``python examples/lipschitz_classifier.py``; ``--quick``
runs fewer steps.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor, nn

import tether

TEMPERATURE = 10.0  # logits = TEMPERATURE * f(x) with f 1-Lipschitz: L = TEMPERATURE


def moons(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` points on each of two interleaved half circles, with a little noise."""
    t = torch.rand(2, n, generator=generator) * math.pi
    upper = torch.stack([t[0].cos(), t[0].sin()], dim=-1)
    lower = torch.stack([1 - t[1].cos(), 0.5 - t[1].sin()], dim=-1)
    points = torch.cat([upper, lower]) + 0.1 * torch.randn(2 * n, 2, generator=generator)
    return points, torch.arange(2).repeat_interleave(n)


def mlp(width: int, lipschitz: bool) -> nn.Sequential:
    layers = [nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 2))
    if lipschitz:
        for layer in layers:
            if isinstance(layer, nn.Linear):
                tether.spectral_norm(layer, exact=True)
    return nn.Sequential(*layers)


def lipschitz_bound(model: nn.Sequential, factor: float) -> float:
    """The product of the layers' spectral norms, times the output scale."""
    norms = [
        torch.linalg.matrix_norm(m.weight.detach(), ord=2).item()
        for m in model
        if isinstance(m, nn.Linear)
    ]
    return factor * math.prod(norms)


def largest_gradient(model: nn.Sequential, factor: float, points: Tensor) -> float:
    """The largest norm of the Jacobian of the logit difference over the points, / √2."""
    x = points.clone().requires_grad_(True)
    logits = factor * model(x)
    (gradient,) = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), x)
    return gradient.norm(dim=1).max().item() / math.sqrt(2)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, in a second or two")
    args = parser.parse_args(argv)
    steps = 300 if args.quick else 2000

    generator = torch.Generator().manual_seed(0)
    train, test = moons(500, generator), moons(500, generator)
    results = {}
    print(f"{'model':<14} {'accuracy':>9} {'bound L':>9} {'max |grad|':>11} {'radius':>8}")
    for name, lipschitz in [("unconstrained", False), ("spectral norm", True)]:
        torch.manual_seed(0)
        model = mlp(64, lipschitz)
        factor = TEMPERATURE if lipschitz else 1.0
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(factor * model(train[0]), train[1]).backward()
            optimizer.step()
        with torch.no_grad():
            logits = factor * model(test[0])
        accuracy = (logits.argmax(1) == test[1]).float().mean().item()
        bound = lipschitz_bound(model, factor)
        top = logits.topk(2, dim=1).values
        radius = ((top[:, 0] - top[:, 1]) / (math.sqrt(2) * bound)).median().item()
        estimate = largest_gradient(model, factor, test[0])
        print(f"{name:<14} {accuracy:>9.3f} {bound:>9.2f} {estimate:>11.2f} {radius:>8.4f}")
        results[name] = (accuracy, bound, estimate)
    print(
        "\nbound L: product of the layers' spectral norms (times the output scale); "
        "max |grad|: a lower estimate;\nradius: median certified radius, margin / (√2 L)"
    )
    return results


if __name__ == "__main__":
    main()
