"""The training loop shared by the anchor and expert stages.

Tracking is not done here: the loop appends one JSON line per logged step to a file the
stage declares as a metric, and the flow forwards those to MLflow after the stage ends.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from stages.io import read_jsonl
from stages.params import TrainParams
from stages.runtime import step_bar
from stages.train.distributed import average_gradients, copy_back, device, full, training_copy, world


def tokenize_corpus(tokenizer, jsonl: Path, max_docs: int | None = None) -> np.ndarray:
    """All documents of a JSON-lines corpus as one token array, each document followed by EOS."""
    texts = [row["text"] for _, row in zip(range(max_docs or 10**12), read_jsonl(jsonl))]
    if not texts:
        raise ValueError(f"{jsonl}: holds no document")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int32)


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """Random windows of seq_len + 1 tokens; a function of (seed, step) so a resumed run sees the same data."""
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"corpus has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
    gen = np.random.default_rng([seed, step])
    starts = gen.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    return torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))


def cosine_lr(step: int, p: TrainParams) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    progress = (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps)
    return p.lr * (p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def autocast(precision: str):
    """Matmuls in bfloat16 where asked (CPUs with AVX-512 BF16 and GPUs run them about 2x faster);
    weights, gradients and optimizer state stay fp32, so the frozen public half stays bit-identical."""
    kind = device().type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")


Batch = torch.Tensor | tuple[torch.Tensor, ...]


def micro_batches(batch: Batch, parts: int) -> list[Batch]:
    """A step's rows in `parts` micro-batches of equal size, row i in micro-batch i % parts.

    Strided rather than contiguous, so a batch laid out in blocks (an expert's owner rows, then
    public rows) gives every micro-batch the same mix; a tuple's tensors (rows and their labels)
    are split alike.
    """
    tensors = batch if isinstance(batch, tuple) else (batch,)
    rows = tensors[0].size(0)
    if rows % parts:
        raise ValueError(f"train.grad_accumulation: {rows} rows of a step do not split into {parts} equal "
                         f"micro-batches; choose a batch_size (per process) that divides by {parts}")
    split = [tuple(t[i::parts] for t in tensors) for i in range(parts)]
    return split if isinstance(batch, tuple) else [m[0] for m in split]


def to_device(batch: Batch) -> Batch:
    return tuple(t.to(device()) for t in batch) if isinstance(batch, tuple) else batch.to(device())


def lm_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and the mean squared log-partition (for the z-loss)."""
    flat = logits.reshape(-1, logits.size(-1)).float()
    ce = torch.nn.functional.cross_entropy(flat, targets.reshape(-1))
    z = torch.logsumexp(flat, dim=-1).pow(2).mean()
    return ce, z


CHECKPOINT_FORMAT = 2  # 2: the optimizer state keyed by parameter name (the same with and without FSDP)


@dataclass
class Checkpointer:
    """Saves the trainable state, optimizer and step; resumes only a run with the same fingerprint."""
    path: Path
    fingerprint: str

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if (state.get("fingerprint"), state.get("format")) != (self.fingerprint, CHECKPOINT_FORMAT):
            return None  # params, data or anchor changed since, or an older format: start over
        return state

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({**state, "fingerprint": self.fingerprint, "format": CHECKPOINT_FORMAT}, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def train(
    model: torch.nn.Module,
    step_loss: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]],
    make_batch: Callable[[int], Batch],
    p: TrainParams,
    checkpointer: Checkpointer,
    log_path: Path,
    desc: str,
    lr_scale: Callable[[str], float] = lambda name: 1.0,
    after_step: Callable[[torch.nn.Module], None] = lambda module: None,
) -> dict:
    """Run AdamW with a cosine schedule over the model's trainable parameters.

    `make_batch(step)` returns the batch of a step (a function of the step, so a resumed run sees
    the same data): a tensor of rows, or a tuple of tensors with a row each (rows and their
    labels); `step_loss(module, batch)` returns the mean loss over the rows it is given, which the
    module being trained minimises, and the numbers to log. With `p.grad_accumulation` > 1 it is
    called once per micro-batch (see micro_batches) and the gradients add up to the step's.
    `lr_scale(name)` multiplies the learning rate of the parameter of that name;
    `after_step(module)` runs after each optimizer step (for constraints on parameters). The
    module trained is `model` on the training device, or under FSDP a sharded copy of it
    (stages/train/distributed.py); either way the trained weights end in `model`, on the CPU. Under
    torchrun, `make_batch` returns this process's rows, gradients are averaged
    across processes and only process 0 writes the log and checkpoints.
    """
    rank, processes = world()
    start, log = 0, []
    resumed = checkpointer.load()
    if resumed:  # into the plain model, before it is copied or moved
        current = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in resumed["trainable"].items():
                current[name].copy_(value)
        start, log = resumed["step"], resumed["log"]
    work = training_copy(model)
    if p.activation_checkpointing:
        work.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    named = [(n, q) for n, q in work.named_parameters() if q.requires_grad]
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for n, q in named:
        groups.setdefault((lr_scale(n), p.weight_decay if q.ndim >= 2 else 0.0), []).append(q)
    opt = torch.optim.AdamW([{"params": qs, "lr_scale": scale, "weight_decay": wd}
                             for (scale, wd), qs in groups.items()], lr=p.lr, betas=(0.9, 0.95))
    # Optimizer state by parameter name and whole (gathered from the shards under FSDP).
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if resumed:
        set_optimizer_state_dict(work, opt, resumed["optimizer"], options=whole)
    torch.manual_seed(p.seed)
    work.train()
    tokens_per_step = p.batch_size * p.seq_len
    bar = step_bar(range(start, p.steps), desc, p.steps, disable=rank != 0)
    t0, timed_steps = time.perf_counter(), 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, p) * group["lr_scale"]
        opt.zero_grad(set_to_none=True)
        numbers: dict[str, float] = {}
        for micro in micro_batches(make_batch(step), p.grad_accumulation):
            with autocast(p.precision):
                loss, micro_numbers = step_loss(work, to_device(micro))
            (loss / p.grad_accumulation).backward()
            for k, v in micro_numbers.items():
                numbers[k] = numbers.get(k, 0.0) + v / p.grad_accumulation
        average_gradients([q for _, q in named])
        grad_norm = torch.nn.utils.clip_grad_norm_([q for _, q in named], p.grad_clip)
        opt.step()
        after_step(work)
        timed_steps += 1
        tok_s = timed_steps * tokens_per_step / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{numbers['loss']:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if step % p.log_every == 0 or step == p.steps - 1:
            if processes > 1:  # the logged numbers are the global batch's: the mean over processes
                values = torch.tensor(list(numbers.values()), dtype=torch.float64, device=device())
                torch.distributed.all_reduce(values)
                numbers = dict(zip(numbers, (values / processes).tolist()))
            log.append({"step": step, "lr": cosine_lr(step, p), "grad_norm": float(full(grad_norm)),
                        "tokens_per_s": tok_s, **numbers})
        if (step + 1) % p.checkpoint_every == 0 and step + 1 < p.steps:
            # Every process takes part in gathering the shards; process 0 writes.
            state = {"step": step + 1, "log": log, "optimizer": get_optimizer_state_dict(work, opt, options=whole),
                     "trainable": {n: full(q) for n, q in named}}
            if rank == 0:
                checkpointer.save(state)
    bar.close()
    copy_back(model, work)
    model.eval()
    if rank == 0:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(row) + "\n" for row in log))
    elapsed = time.perf_counter() - t0
    return {
        "steps": p.steps,
        "resumed_from_step": start,
        "final_loss": log[-1]["loss"] if log else float("nan"),
        "tokens_per_s": (p.steps - start) * tokens_per_step / elapsed if elapsed > 0 else 0.0,
        "train_seconds": elapsed,
        "tokens_seen": p.steps * tokens_per_step,
    }
