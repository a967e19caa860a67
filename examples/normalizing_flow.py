"""A normalising flow on 2-D data, whose linear layers are orthogonal x positive diagonal.

A normalising flow maps data ``x`` to a standard Gaussian ``z = f(x)`` through invertible
layers and scores ``log p(x) = log N(f(x)) + log |det ∂f/∂x|``, so every layer must be
invertible with a cheap log-determinant. The invertible 1 x 1 convolutions of Glow (Kingma
and Dhariwal, 2018, https://arxiv.org/abs/1807.03039) are linear maps ``W`` that mix the
coordinates between coupling layers; here each ``W = Q diag(s)`` with ``Q`` constrained by
``tether.orthogonal`` and ``s`` by ``tether.positive``. Then ``W`` is invertible by
construction (``W⁻¹ = diag(1/s) Qᵀ``, no solve) and ``log |det W| = Σ log s`` (``|det Q| =
1``), with no determinant to compute.

The flow alternates these maps with affine coupling layers (Dinh et al., 2017,
https://arxiv.org/abs/1605.08803) and is trained by maximum likelihood on two interleaved
half-moons. It prints the test negative log-likelihood, checks each linear layer's
log-determinant against ``torch.linalg.slogdet`` and the inverse against the forward map,
and saves the data, samples of the flow and its density to
``demo-output/normalizing_flow.png``. Run it with ``python examples/normalizing_flow.py``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import Tensor, nn

import tether


class InvertibleLinear(nn.Module):
    """``y = Q diag(s) x + b`` with ``Q`` orthogonal and ``s > 0``: ``log |det| = Σ log s``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.rotation = tether.orthogonal(nn.Linear(dim, dim))  # Q, and the shift b as bias
        nn.init.zeros_(self.rotation.bias)
        self.scale = nn.Parameter(torch.ones(dim))
        tether.positive(self, "scale")

    def weight(self) -> Tensor:
        return self.rotation.weight * self.scale  # Q diag(s): column j of Q times s_j

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.rotation(x * self.scale)
        return y, self.scale.log().sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return ((y - self.rotation.bias) @ self.rotation.weight) / self.scale


class Coupling(nn.Module):
    """``(x1, x2) -> (x1, x2 exp(a(x1)) + t(x1))``, with ``log |det| = Σ a(x1)``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.out = nn.Linear(hidden, 2)
        nn.init.zeros_(self.out.weight)  # starts as the identity
        nn.init.zeros_(self.out.bias)

    def shift_scale(self, x1: Tensor) -> tuple[Tensor, Tensor]:
        a, t = self.out(self.net(x1)).chunk(2, dim=1)
        return torch.tanh(a), t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, :1], x[:, 1:]
        a, t = self.shift_scale(x1)
        return torch.cat([x1, x2 * a.exp() + t], dim=1), a.sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        y1, y2 = y[:, :1], y[:, 1:]
        a, t = self.shift_scale(y1)
        return torch.cat([y1, (y2 - t) * (-a).exp()], dim=1)


class Flow(nn.Module):
    def __init__(self, couplings: int, hidden: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [InvertibleLinear(2)]
        for _ in range(couplings):
            layers += [Coupling(hidden), InvertibleLinear(2)]
        self.layers = nn.ModuleList(layers)

    def log_prob(self, x: Tensor) -> Tensor:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, term = layer(x)
            logdet = logdet + term
        gaussian = -0.5 * (x.square().sum(1) + 2 * math.log(2 * math.pi))
        return gaussian + logdet

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(n, 2, generator=generator)
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z


def moons(n: int, generator: torch.Generator) -> Tensor:
    """``n`` points on each of two interleaved half circles, centred and scaled."""
    t = torch.rand(2, n, generator=generator) * math.pi
    upper = torch.stack([t[0].cos(), t[0].sin()], dim=-1)
    lower = torch.stack([1 - t[1].cos(), 0.5 - t[1].sin()], dim=-1)
    points = torch.cat([upper, lower]) + 0.05 * torch.randn(2 * n, 2, generator=generator)
    return (points - torch.tensor([0.5, 0.25])) * 2


def check_layers(flow: Flow, x: Tensor) -> tuple[float, float]:
    """Largest errors of the linear layers' log-determinants and of the flow's inverse."""
    with torch.no_grad():
        logdet_error = max(
            (layer(x)[1][0] - torch.linalg.slogdet(layer.weight()).logabsdet).abs().item()
            for layer in flow.layers
            if isinstance(layer, InvertibleLinear)
        )
        z = x
        for layer in flow.layers:
            z = layer(z)[0]
        for layer in reversed(flow.layers):
            z = layer.inverse(z)
    return logdet_error, (z - x).abs().max().item()


def plot(flow: Flow, data: Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    with torch.no_grad():
        samples = flow.sample(2000, torch.Generator().manual_seed(1))
        grid = torch.linspace(-4, 4, 200)
        xx, yy = torch.meshgrid(grid, grid, indexing="xy")
        density = flow.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    figure, axes = plt.subplots(1, 3, figsize=(12, 4), layout="constrained")
    axes[0].scatter(*data.T.numpy(), s=2, alpha=0.5)
    axes[0].set_title("data")
    axes[1].scatter(*samples.T.numpy(), s=2, alpha=0.5, color="tab:orange")
    axes[1].set_title("samples of the flow")
    axes[2].imshow(density.reshape(200, 200).numpy(), origin="lower", extent=(-4, 4, -4, 4))
    axes[2].set_title("density of the flow")
    for ax in axes:
        ax.set_xlim(-4, 4)
        ax.set_ylim(-4, 4)
        ax.set_aspect("equal")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, a smaller network")
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="figure folder")
    args = parser.parse_args(argv)
    steps = 200 if args.quick else 3000

    generator = torch.Generator().manual_seed(0)
    train, test = moons(2000, generator), moons(1000, generator)
    torch.manual_seed(0)
    flow = Flow(couplings=4, hidden=32 if args.quick else 64)
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for step in range(steps):
        batch = train[torch.randint(len(train), (256,), generator=generator)]
        optimizer.zero_grad()
        loss = -flow.log_prob(batch).mean()
        loss.backward()
        optimizer.step()
        if step % (steps // 5) == 0:
            print(f"step {step:>4}: negative log-likelihood {loss.item():.3f}")

    with torch.no_grad():
        nll = -flow.log_prob(test).mean().item()
    logdet_error, inverse_error = check_layers(flow, test)
    gaussian = 0.5 * torch.logdet(2 * math.pi * math.e * torch.cov(train.T)).item()
    print(f"\ntest negative log-likelihood: {nll:.3f} nats (the best Gaussian: {gaussian:.3f})")
    print(f"linear layers: log|det W| = sum(log s) within {logdet_error:.1e} of slogdet")
    print(f"inverse of the flow: within {inverse_error:.1e} of the data")
    path = args.out / "normalizing_flow.png"
    plot(flow, train, path)
    print(f"figure: {path}")
    return nll


if __name__ == "__main__":
    main()
