"""Data-parallel training when a stage is launched with `torchrun` (gloo: CPU processes, one machine or many).

Every process builds the same model and draws the same global batch (batches are a function of
seed and step); each takes its own rows of it, and the gradients of the trainable parameters are
averaged across processes after every backward pass, before clipping. That is DDP's arithmetic
(done by hand because only the trained parameters need syncing, and the expert's frozen half has
no gradient at all). Only process 0 writes logs, checkpoints and outputs. Launched plainly (no
torchrun), nothing here does anything. The stages compute on the CPU; GPUs are not used yet.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size), joining the process group torchrun set up on first use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # the tensors are on the CPU
    return dist.get_rank(), size


def is_main() -> bool:
    return world()[0] == 0


def local_rows(n: int, part: str) -> slice:
    """This process's rows of a global batch part of n rows (every process gets the same number).

    `part` names the rows in the error when n does not divide by the number of processes.
    """
    rank, size = world()
    if n % size:
        raise ValueError(f"{part}: {n} rows do not split evenly over {size} processes; choose a batch size "
                         f"(and public share) whose rows divide by {size}, or launch with fewer processes")
    return slice(rank * n // size, (rank + 1) * n // size)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce the gradients of `params` to their mean over the processes, in one flat buffer."""
    _, size = world()
    if size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def finish() -> None:
    """Leave the process group (call at the end of a stage; a no-op without torchrun)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
