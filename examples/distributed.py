"""Data-parallel training of a constrained model with DistributedDataParallel, on CPU.

Starts two processes that talk through the ``gloo`` backend (no GPU needed), wraps a small
model with an orthogonal layer, a spectrally normalised layer and a pruned layer in
``DistributedDataParallel``, and trains it for a few steps, each process on its own batches.
DDP averages the gradients of the originals (the trained tensors), so after every step all
processes hold the same originals; the constraints' buffers (the orthogonal base point,
spectral norm's power-iteration vectors) are broadcast from process 0 before every forward.
At the end it checks that every process holds the same weights and that the constraints
hold, and prints what it checked. Run it with ``python examples/distributed.py``; it takes a
few seconds. ``--processes`` changes the number of processes.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import tether


def model() -> nn.Sequential:
    torch.manual_seed(0)  # every process starts from the same weights (DDP checks this)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    tether.orthogonal(net[0])
    tether.spectral_norm(net[2])
    tether.prune.l1_unstructured(net[4], "weight", amount=0.5)
    return tether.autocache(net)


def worker(rank: int, world: int, init_file: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = model()
        ddp = DistributedDataParallel(net)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(rank)  # each process: its own data
        for _ in range(steps):
            x = torch.randn(16, 8, generator=generator)
            optimizer.zero_grad()
            ddp(x).square().mean().backward()
            optimizer.step()
        report(rank, world, net)
    finally:
        dist.destroy_process_group()


def report(rank: int, world: int, net: nn.Sequential) -> None:
    flat = torch.cat([t.detach().flatten() for t in net.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank != 0:
        return
    same = all(torch.equal(gathered[0], other) for other in gathered[1:])
    W = net[0].weight
    orthogonal = torch.allclose(W.T @ W, torch.eye(8), atol=1e-5)
    sigma = torch.linalg.matrix_norm(net[2].weight.detach(), ord=2).item()
    pruned = int((net[4].weight == 0).sum())
    print(f"{world} processes hold identical state_dicts: {same}")
    print(f"orthogonal layer still orthogonal: {orthogonal}")
    print(f"spectral norm of the normalised layer: {sigma:.3f}")
    print(f"pruned entries of the last layer: {pruned} of {net[4].weight.numel()}")
    if not (same and orthogonal and pruned == 8):
        raise RuntimeError("distributed training broke a constraint or desynchronised")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "rendezvous")
        mp.spawn(worker, args=(args.processes, init_file, args.steps), nprocs=args.processes)


if __name__ == "__main__":
    main()
