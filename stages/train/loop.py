"""The training loop of every training stage: the anchor, the experts (with DP-SGD as an option:
stages/train/dp.py's PrivateSteps), the unrestricted reference and the router tuning.

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

from stages.device import autocast, device
from stages.io import read_jsonl
from stages.params import TrainParams
from stages.runtime import follow_granted_threads, step_bar
from stages.train.distributed import average_gradients, copy_back, full, training_copy, world


def tokenize_corpus(tokenizer, jsonl: Path, max_docs: int | None = None) -> np.ndarray:
    """All documents of a JSON-lines corpus as one token array, each document followed by EOS."""
    texts = [row["text"] for _, row in zip(range(max_docs or 10**12), read_jsonl(jsonl))]
    if not texts:
        raise ValueError(f"{jsonl}: holds no document")
    return tokenize_texts(tokenizer, texts)


def tokenize_texts(tokenizer, texts: list[str]) -> np.ndarray:
    """Texts as one token array, each followed by EOS."""
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


def rows_of(batch: Batch) -> int:
    return (batch[0] if isinstance(batch, tuple) else batch).size(0)


class PlainSteps:
    """How `train` takes a step unless told otherwise: `make_batch`'s rows in equal strided
    micro-batches, their gradients added, averaged across processes and clipped to
    `grad_clip`; resumable from a checkpoint. stages/train/dp.py's PrivateSteps is the other way."""
    resumable = True

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        return training_copy(model)

    def optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return opt

    def batch(self, make_batch: Callable[[int], Batch], step: int) -> Batch:
        return make_batch(step)

    def place(self, batch: Batch) -> Batch:
        return to_device(batch)

    def split(self, batch: Batch, parts: int) -> list[Batch]:
        return micro_batches(batch, parts)

    def backward(self, opt, loss: torch.Tensor, weight: float, last: bool) -> None:
        (loss * weight).backward()

    def step(self, opt, trained: list[torch.nn.Parameter], p: TrainParams) -> torch.Tensor | None:
        average_gradients(trained)
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, p.grad_clip)
        opt.step()
        return grad_norm

    def log_numbers(self, batch: Batch) -> dict[str, float]:
        return {}

    def finish(self, model: torch.nn.Module, work: torch.nn.Module) -> None:
        copy_back(model, work)


def train(
    model: torch.nn.Module,
    step_loss: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]],
    make_batch: Callable[[int], Batch] | None,
    p: TrainParams,
    checkpointer: Checkpointer | None,
    log_path: Path,
    desc: str,
    lr_scale: Callable[[str], float] = lambda name: 1.0,
    after_step: Callable[[torch.nn.Module], None] = lambda module: None,
    steps: PlainSteps | None = None,
) -> dict:
    """Run AdamW with a cosine schedule over the model's trainable parameters.

    `make_batch(step)` returns the batch of a step (a function of the step, so a resumed run sees
    the same data): a tensor of rows, or a tuple of tensors with a row each (rows and their
    labels); `step_loss(module, batch)` returns the mean loss over the rows it is given, which the
    module being trained minimises, and the numbers to log. With `p.grad_accumulation` > 1 it is
    called once per micro-batch (see micro_batches) and the gradients add up to the step's.
    `lr_scale(name)` multiplies the learning rate of the parameter of that name;
    `after_step(module)` runs after each optimizer step (for constraints on parameters). `steps`
    says how a step is taken (PlainSteps by default; DP-SGD's PrivateSteps draws its own batches
    and clips per document, and does not resume). The module trained is `model` on the training
    device, or under FSDP a sharded copy of it (stages/train/distributed.py); either way the
    trained weights end in `model`, on the CPU. Under torchrun, `make_batch` returns this
    process's rows, gradients are averaged across processes and only process 0 writes the log
    and checkpoints.
    """
    steps = steps or PlainSteps()
    rank, processes = world()
    start, log = 0, []
    resumed = checkpointer.load() if steps.resumable and checkpointer else None
    if resumed:  # into the plain model, before it is copied or moved
        current = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in resumed["trainable"].items():
                current[name].copy_(value)
        start, log = resumed["step"], resumed["log"]
    work = steps.module(model)
    if p.activation_checkpointing:
        work.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    named = [(n, q) for n, q in work.named_parameters() if q.requires_grad]
    trained = [q for _, q in named]
    # Weight decay on matrices only: biases and norms (1-d) are not pulled to zero.
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for n, q in named:
        groups.setdefault((lr_scale(n), p.weight_decay if q.ndim >= 2 else 0.0), []).append(q)
    opt = steps.optimizer(torch.optim.AdamW([{"params": qs, "lr_scale": scale, "weight_decay": wd}
                                             for (scale, wd), qs in groups.items()], lr=p.lr, betas=(0.9, 0.95)))
    # Optimizer state by parameter name and whole (gathered from the shards under FSDP).
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if resumed:
        set_optimizer_state_dict(work, opt, resumed["optimizer"], options=whole)
    torch.manual_seed(p.seed)
    work.train()
    tokens_per_step = p.batch_size * p.seq_len
    bar = step_bar(range(start, p.steps), desc, p.steps, disable=rank != 0)
    t0, timed_steps, skipped = time.perf_counter(), 0, 0
    for step in bar:
        follow_granted_threads()  # cores another stage freed, lent to this one (flows/pipeline.CpuScheduler)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, p) * group["lr_scale"]
        batch = steps.batch(make_batch, step)
        micro = steps.split(batch, p.grad_accumulation)
        if not micro:  # DP-SGD's Poisson sampling can draw no document: nothing is released
            skipped += 1
            continue
        total = sum(rows_of(m) for m in micro)
        opt.zero_grad(set_to_none=True)
        numbers: dict[str, float] = {}
        for i, rows in enumerate(micro):
            with autocast(p.precision):
                loss, micro_numbers = step_loss(work, steps.place(rows))
            weight = rows_of(rows) / total
            steps.backward(opt, loss, weight, last=i == len(micro) - 1)
            for k, v in micro_numbers.items():
                numbers[k] = numbers.get(k, 0.0) + v * weight
        grad_norm = steps.step(opt, trained, p)
        after_step(work)
        timed_steps += 1
        tok_s = timed_steps * tokens_per_step / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{numbers['loss']:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if step % p.log_every == 0 or step == p.steps - 1:
            if processes > 1:  # the logged numbers are the global batch's: the mean over processes
                values = torch.tensor(list(numbers.values()), dtype=torch.float64, device=device())
                torch.distributed.all_reduce(values)
                numbers = dict(zip(numbers, (values / processes).tolist()))
            norm = {"grad_norm": float(full(grad_norm))} if grad_norm is not None else {}
            log.append({"step": step, "lr": cosine_lr(step, p), **norm, "tokens_per_s": tok_s, **numbers,
                        **steps.log_numbers(batch)})
        if steps.resumable and checkpointer and (step + 1) % p.checkpoint_every == 0 and step + 1 < p.steps:
            # Every process takes part in gathering the shards; process 0 writes.
            state = {"step": step + 1, "log": log, "optimizer": get_optimizer_state_dict(work, opt, options=whole),
                     "trainable": {n: full(q) for n, q in named}}
            if rank == 0:
                checkpointer.save(state)
    bar.close()
    steps.finish(model, work)
    model.eval()
    if rank == 0:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(row) + "\n" for row in log))
    elapsed = time.perf_counter() - t0
    ran = p.steps - start - skipped
    return {
        "steps": p.steps,
        "resumed_from_step": start,
        "skipped_steps": skipped,
        "final_loss": log[-1]["loss"] if log else float("nan"),
        "tokens_per_s": ran * tokens_per_step / elapsed if elapsed > 0 else 0.0,
        "train_seconds": elapsed,
        "tokens_seen": (p.steps - skipped) * tokens_per_step,
    }
