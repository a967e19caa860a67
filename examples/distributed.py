"""Data-parallel training of a constrained model on CPU: DDP, compiled DDP, or FSDP2.

Trains a small model with an orthogonal layer, a spectrally normalised layer and a pruned
layer in several processes that talk through the ``gloo`` backend (no GPU needed), each
process on its own batches, then checks that every process holds the same weights and that
the constraints hold in every process, and prints what it checked.

- ``--strategy ddp`` (the default): ``DistributedDataParallel``. DDP averages the gradients of
  the originals (the trained tensors), so all processes keep the same originals; the
  constraints' buffers (orthogonal base point, spectral norm's vectors, pruning masks) are
  broadcast from process 0 before every forward. ``--compile`` adds ``torch.compile``.
- ``--strategy fsdp``: FSDP2's ``fully_shard``. Each process stores a shard of every original;
  reading ``layer.weight`` outside forward gathers the originals (every process must read it)
  and gives the full constrained weight. The model is also saved and loaded back through
  ``torch.distributed.checkpoint``.

Run it standalone (it starts its own processes; ``--processes`` sets how many)::

    python examples/distributed.py --strategy fsdp

or under ``torchrun``, which starts the processes and sets ``RANK`` and ``WORLD_SIZE``::

    torchrun --standalone --nproc_per_node=2 examples/distributed.py --strategy fsdp

Either takes a few seconds (``--quick`` trains 5 steps instead of 20); ``--compile`` takes
longer (compiling is slow on a CPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor

import tether


def model() -> nn.Sequential:
    torch.manual_seed(0)  # every process starts from the same weights (DDP checks this)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    tether.orthogonal(net[0])
    tether.spectral_norm(net[2])
    tether.prune.l1_unstructured(net[4], "weight", amount=0.5)
    return tether.autocache(net)


def wrap(net: nn.Sequential, args: argparse.Namespace) -> nn.Module:
    """What trains: ``net`` wrapped for the chosen strategy (parametrize first, then wrap)."""
    if args.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in (net[0], net[2], net[4]):
            fully_shard(layer)  # one unit per layer: it gathers its originals in its forward
        fully_shard(net)
        return net
    ddp: nn.Module = nn.parallel.DistributedDataParallel(net)
    return torch.compile(ddp) if args.compile else ddp


def train(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    net = model()
    trained = wrap(net, args)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)  # each process: its own data
    for _ in range(args.steps):
        x = torch.randn(16, 8, generator=generator)
        optimizer.zero_grad()
        trained(x).square().mean().backward()
        optimizer.step()
    report(rank, world, net)
    if args.strategy == "fsdp":
        checkpoint(rank, net, args)


def full_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The ``state_dict`` with FSDP's shards gathered (a collective: every process calls it)."""
    state = net.state_dict()
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def report(rank: int, world: int, net: nn.Sequential) -> None:
    flat = torch.cat([t.detach().flatten() for t in full_state(net).values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    # Read outside forward, in every process (under FSDP each read gathers the originals).
    W, V, P = (net[i].weight.detach() for i in (0, 2, 4))
    orthogonal = torch.allclose(W.T @ W, torch.eye(8), atol=1e-5)
    sigma = torch.linalg.matrix_norm(V, ord=2)
    pruned = int((P == 0).sum())
    holds = torch.tensor(float(orthogonal and pruned == 8))
    dist.all_reduce(holds, op=dist.ReduceOp.MIN)  # 1 only if the constraints hold everywhere
    if rank != 0:
        return
    same = all(torch.equal(gathered[0], other) for other in gathered[1:])
    print(f"{world} processes hold identical state_dicts: {same}")
    print(f"orthogonal layer still orthogonal: {orthogonal}")
    print(f"spectral norm of the normalised layer: {sigma.item():.3f}")
    print(f"pruned entries of the last layer: {pruned} of {P.numel()}")
    print(f"constraints hold in every process: {bool(holds)}")
    if not (same and holds):
        raise RuntimeError("distributed training broke a constraint or desynchronised")


def checkpoint(rank: int, net: nn.Sequential, args: argparse.Namespace) -> None:
    """Save the sharded model with ``torch.distributed.checkpoint`` and load it into a new one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    folder = [tempfile.mkdtemp() if rank == 0 else ""]
    dist.broadcast_object_list(folder)  # every process writes its shards into one folder
    try:
        dcp.save(get_model_state_dict(net), checkpoint_id=folder[0])
        fresh = wrap(model(), args)  # untrained: other weights than the saved ones
        state = get_model_state_dict(fresh)
        dcp.load(state, checkpoint_id=folder[0])
        set_model_state_dict(fresh, state)
        x = torch.randn(4, 8)
        with torch.no_grad():
            same = torch.equal(net.eval()(x), fresh.eval()(x))
        if rank == 0:
            print(f"torch.distributed.checkpoint round trip gives the same outputs: {same}")
        if not same:
            raise RuntimeError("the checkpoint did not restore the model")
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(folder[0], ignore_errors=True)


def spawned(rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train(rank, world, args)
        dist.barrier()  # see the torchrun branch of main()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DDP model")
    parser.add_argument("--processes", type=int, default=2, help="when not run by torchrun")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 20)")
    parser.add_argument("--quick", action="store_true", help="5 training steps (unless --steps)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (5 if args.quick else 20)
    if args.compile and args.strategy != "ddp":
        parser.error("--compile goes with --strategy ddp")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")  # rendezvous from torchrun's environment variables
        try:
            train(dist.get_rank(), dist.get_world_size(), args)
            # Every process is done communicating before any tears its group down: a process
            # whose peer still sends while gloo's threads are destroyed can abort at exit.
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "rendezvous")
        mp.spawn(spawned, args=(args.processes, init_file, args), nprocs=args.processes)


if __name__ == "__main__":
    main()
