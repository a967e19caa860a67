"""A low-rank adapter: fine-tune a frozen layer through a trainable rank-r update.

A "pretrained" layer ``W0`` (here random) is frozen. The new task needs ``W0 + D``, where the
change ``D`` has rank 4 (the premise of low-rank adaptation, LoRA: Hu et al., 2021,
https://arxiv.org/abs/2106.09685). Instead of fine-tuning the whole ``128 x 128`` matrix, the
adapted layer computes ``x W0ᵀ + x Dᵀ`` with ``D`` constrained by ``tether.low_rank(rank=4)``,
which stores it as factors ``U diag(s) Vᵀ`` (``U``, ``V`` with orthonormal columns). The
update starts at zero, so the adapted model starts as the pretrained one. It prints the
number of trained parameters, the fit, and how well ``D`` is recovered, and shows that
``W0`` did not move. Run it with ``python examples/low_rank_adapter.py``; ``--quick`` runs
fewer steps.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import tether


class Adapted(nn.Module):
    """``base(x) + x Dᵀ`` with ``base`` frozen and ``D`` of rank at most ``rank``."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.update = nn.Linear(base.in_features, base.out_features, bias=False)
        tether.low_rank(self.update, rank=rank)
        self.update.weight = torch.zeros_like(base.weight)  # start exactly at the base model

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.update(x)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, in a second or two")
    args = parser.parse_args(argv)
    steps = 200 if args.quick else 1000
    n, rank = 128, 4

    generator = torch.Generator().manual_seed(0)
    pretrained = nn.Linear(n, n)
    change = torch.randn(n, rank, generator=generator) @ torch.randn(rank, n, generator=generator)
    change = 0.5 * change / torch.linalg.matrix_norm(change, ord=2)
    target = pretrained.weight.detach() + change

    torch.manual_seed(0)
    model = Adapted(pretrained, rank)
    before = pretrained.weight.detach().clone()
    trained = [p for p in model.parameters() if p.requires_grad]
    print(
        f"trained parameters: {sum(p.numel() for p in trained)} "
        f"(the full matrix has {pretrained.weight.numel()})"
    )

    optimizer = torch.optim.Adam(trained, lr=3e-2)
    for step in range(steps):
        x = torch.randn(64, n, generator=generator)
        y = x @ target.T + pretrained.bias.detach()
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        if step % (steps // 5) == 0 or step == steps - 1:
            print(f"step {step:>4}: mse {loss.item():.2e}")

    D = model.update.weight.detach()
    recovered = (torch.linalg.matrix_norm(D - change) / torch.linalg.matrix_norm(change)).item()
    print(f"rank of the learned update: {torch.linalg.matrix_rank(D).item()}")
    print(f"relative error of the learned update: {recovered:.4f}")
    print(f"pretrained weight unchanged: {torch.equal(pretrained.weight, before)}")
    return recovered


if __name__ == "__main__":
    main()
