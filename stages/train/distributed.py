"""Data-parallel training when a stage is launched with `torchrun`, on CPUs or GPUs.

Every process builds the same model and draws the same global batch (batches are a function of
seed and step); each takes its own rows of it. Two ways to keep the processes' models equal,
chosen at launch by `CONSORT_DATA_PARALLEL`:

- `ddp` (the default): every process holds the whole model; the gradients of the trainable
  parameters are averaged after every backward pass, before clipping. That is DDP's arithmetic,
  done by hand because only the trained parameters need syncing (the expert's frozen half has no
  gradient at all).
- `fsdp`: the model is trained as a copy sharded over the processes (FSDP2's `fully_shard`, one
  unit per decoder layer): each process holds 1/N of the weights, gradients and optimizer state,
  for a model too large for one device. The trained weights are gathered back into the stage's
  model at the end.

The device is the GPU of the process's local rank when CUDA is there (NCCL between processes),
otherwise the CPU (gloo); `CONSORT_DEVICE=cpu` keeps a GPU machine on the CPU. Only process 0
writes logs, checkpoints and outputs. Launched plainly (no torchrun), nothing is synced.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from stages.device import device

MODES = ("ddp", "fsdp")


def world() -> tuple[int, int]:
    """(rank, world size), joining the process group torchrun set up on first use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device().type == "cuda" else "gloo")
    return dist.get_rank(), size


def is_main() -> bool:
    return world()[0] == 0


def mode() -> str:
    """How the processes share the model (CONSORT_DATA_PARALLEL); one process is always plain."""
    chosen = os.environ.get("CONSORT_DATA_PARALLEL", "ddp")
    if chosen not in MODES:
        raise ValueError(f"CONSORT_DATA_PARALLEL={chosen!r}: use one of {', '.join(MODES)}")
    return chosen if world()[1] > 1 else "single"


def local_rows(n: int, part: str) -> slice:
    """This process's rows of a global batch part of n rows (every process gets the same number).

    `part` names the rows in the error when n does not divide by the number of processes.
    """
    rank, size = world()
    if n % size:
        raise ValueError(f"{part}: {n} rows do not split evenly over {size} processes; choose a batch size "
                         f"(and public share) whose rows divide by {size}, or launch with fewer processes")
    return slice(rank * n // size, (rank + 1) * n // size)


def training_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The module to train: `model` itself on the device, or under FSDP a sharded copy of it.

    Sharding units are the decoder layers (`model.model.layers`) and the rest as the root. FSDP2
    cannot shard 0-dim parameters (the owner's router bias): those stay whole on every process
    and are synced by `average_gradients`.
    """
    if mode() != "fsdp":
        return model.to(device())
    from torch.distributed.fsdp import fully_shard

    work = copy.deepcopy(model).to(device())
    scalars = {q for q in work.parameters() if q.ndim == 0}
    for layer in work.model.layers:
        fully_shard(layer, ignored_params=scalars)
    fully_shard(work, ignored_params=scalars)
    return work


def full(value: torch.Tensor) -> torch.Tensor:
    """A whole tensor on the CPU (gathered from every process if it is a shard: call on all of them)."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().to("cpu", copy=True)


def copy_back(model: torch.nn.Module, work: torch.nn.Module) -> None:
    """Leave the trained weights in `model`, on the CPU, whichever module `training_copy` gave."""
    if work is not model:
        trained = {n: full(q) for n, q in work.named_parameters() if q.requires_grad}
        with torch.no_grad():
            for name, q in model.named_parameters():
                if name in trained:
                    q.copy_(trained[name])
    model.to("cpu")


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce the gradients of the whole (unsharded) `params` to their mean, in one flat buffer.

    FSDP averages its shards' gradients itself; those are skipped.
    """
    _, size = world()
    grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    if size == 1 or not grads:
        return
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
