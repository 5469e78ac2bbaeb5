"""Differentially private expert training: DP-SGD with Opacus, the document as the privacy unit.

DESIGN.md section 8. What an owner with `owners.<name>.dp` set releases is covered by one
privacy budget, tracked by one accountant (PRV by default, or RDP):

- the router-row initialisation is a Gaussian-mechanism mean of per-document FFN inputs, each
  clipped to a norm set from *public* documents (so the clip itself leaks nothing);
- training samples documents with Poisson sampling (Opacus's DPDataLoader: the accounting
  assumes it; fixed-size shuffled batches would void the epsilon, so they are refused), one
  window per sampled document, and clips and noises each document's gradient (DPOptimizer);
- only the owner's FFN and router row learn (Opacus computes per-sample gradients of their
  Linear layers); the bias b stays 0 and there is no public-contrast batch share, because
  neither fits per-document clipping.

The noise of the training steps is chosen by bisection so that the whole history (the one
initialisation release plus every step) spends at most the target epsilon at the given delta.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from stages import params as P
from stages.model.router_rows import as_router_row, hidden_sums
from stages.runtime import step_bar
from stages.train.loop import cosine_lr


class DPConfigError(ValueError):
    """A DP configuration whose accounting would be invalid."""


def check_dp(dp: P.DPParams, owner: str) -> None:
    if dp.sampling != "poisson":
        raise DPConfigError(f"owners.{owner}.dp.sampling: {dp.sampling!r} batches void the privacy accounting "
                            "(it assumes Poisson sampling of documents); use sampling: poisson")


def accountant_for(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"prv": PRVAccountant, "rdp": RDPAccountant}[name]()


def spent_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon at delta of a history of (noise multiplier, sample rate, steps) Gaussian releases."""
    acc = accountant_for(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def training_noise(dp: P.DPParams, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier for the steps such that init + steps spend <= target epsilon."""
    init = [(dp.init_noise_multiplier, 1.0, 1)]
    if spent_epsilon(init + [(50.0, sample_rate, steps)], dp.delta, dp.accountant) > dp.target_epsilon:
        raise DPConfigError(f"dp.target_epsilon {dp.target_epsilon} is too small for the router initialisation "
                            f"(noise {dp.init_noise_multiplier}) and {steps} steps: raise it, or the init noise")
    lo, hi = 0.3, 50.0
    for _ in range(24):  # the ratio hi / lo ends below 1.0002
        mid = math.sqrt(lo * hi)
        if spent_epsilon(init + [(mid, sample_rate, steps)], dp.delta, dp.accountant) > dp.target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


@torch.no_grad()
def dp_router_row(anchor, tokenizer, private_texts: list[str], public_texts: list[str], seq_len: int,
                  noise_multiplier: float, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The owner's router row from a Gaussian-mechanism mean of per-document mean FFN inputs."""
    pub_sums, pub_counts = hidden_sums(anchor, tokenizer, public_texts, seq_len)
    clip = float(torch.quantile((pub_sums / pub_counts[:, None]).norm(dim=1), 0.9))
    sums, counts = hidden_sums(anchor, tokenizer, private_texts, seq_len)
    per_doc = sums / counts[:, None]
    per_doc = per_doc * torch.clamp(clip / per_doc.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
    noise = torch.randn(per_doc.shape[1], generator=generator, dtype=per_doc.dtype)
    noisy = per_doc.sum(0) + noise * noise_multiplier * clip
    return as_router_row(noisy / len(private_texts)), {"clip": clip, "documents": len(private_texts)}


class DocumentWindows(torch.utils.data.Dataset):
    """Item i: one random window of document i (padded with -1 where the document is short)."""

    def __init__(self, docs: list[np.ndarray], seq_len: int, seed: int) -> None:
        self.docs, self.seq_len = docs, seq_len
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> torch.Tensor:
        doc, n = self.docs[i], self.seq_len + 1
        start = int(self.rng.integers(0, len(doc) - n + 1)) if len(doc) > n else 0
        window = np.full(n, -1, dtype=np.int64)
        window[:min(n, len(doc))] = doc[start:start + n]
        return torch.from_numpy(window)


def train_dp(model: torch.nn.Module, docs: list[np.ndarray], t: P.TrainParams, dp: P.DPParams, log_path: Path,
             lr_scale, init_noise: float, desc: str) -> dict:
    """DP-SGD over the model's trainable parameters; returns the summary with the epsilon spent."""
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    if t.precision == "bf16":
        # Opacus computes per-document gradients in hooks on each layer's fp32 activations and
        # gradients; under autocast they arrive in bfloat16 and its clipping norms lose precision.
        print(f"{desc}: DP-SGD trains in fp32 (precision bf16 does not apply to Opacus's per-document gradients)")
    sample_rate = min(1.0, t.batch_size / len(docs))
    sigma = training_noise(dp, sample_rate, t.steps)
    accountant = accountant_for(dp.accountant)
    accountant.history = [(init_noise, 1.0, 1)]
    gsm = GradSampleModule(model)
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    groups: dict[float, list] = {}
    for n, q in named:
        groups.setdefault(lr_scale(n), []).append(q)
    base = torch.optim.AdamW([{"params": qs, "lr_scale": s, "weight_decay": t.weight_decay} for s, qs in groups.items()],
                             lr=t.lr, betas=(0.9, 0.95))
    opt = DPOptimizer(base, noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm, expected_batch_size=t.batch_size,
                      generator=torch.Generator().manual_seed(t.seed + 17))
    opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    loader = DPDataLoader(DocumentWindows(docs, t.seq_len, t.seed), sample_rate=sample_rate,
                          generator=torch.Generator().manual_seed(t.seed))
    batches = iter(loader)
    torch.manual_seed(t.seed)
    gsm.train()
    log, t0, skipped = [], time.perf_counter(), 0
    bar = step_bar(range(t.steps), desc, t.steps)
    for step in bar:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, t) * group["lr_scale"]
        if batch.numel() == 0:  # Poisson sampling can draw no document: nothing is released
            skipped += 1
            continue
        # Micro-batches (train.grad_accumulation) clip each document's gradient and add it up;
        # only the last one adds the noise and steps, so the release is the same as in one pass.
        micro = [m for m in batch.tensor_split(t.grad_accumulation) if len(m)]
        loss = 0.0
        for i, rows in enumerate(micro):
            inputs, targets = rows[:, :-1].clamp_min(0), rows[:, 1:]
            logits = gsm(input_ids=inputs).logits.float()
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1,
                                                          reduction="none")
            valid = (targets >= 0).float()
            per_doc = (per_token * valid).sum(1) / valid.sum(1).clamp_min(1)  # one loss per document
            opt.zero_grad(set_to_none=True)
            per_doc.mean().backward()
            if i < len(micro) - 1:
                opt.signal_skip_step(do_skip=True)
            opt.step()
            loss += per_doc.sum().item() / len(batch)
        if step % t.log_every == 0 or step == t.steps - 1:
            log.append({"step": step, "loss": loss, "documents": int(batch.shape[0]),
                        "epsilon": float(accountant.get_epsilon(delta=dp.delta))})
            bar.set_postfix(loss=f"{loss:.3f}", eps=f"{log[-1]['epsilon']:.2f}", refresh=False)
    bar.close()
    model.eval()
    elapsed = time.perf_counter() - t0
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(json.dumps(row) + "\n" for row in log))
    epsilon = float(accountant.get_epsilon(delta=dp.delta))
    tokens = (t.steps - skipped) * t.batch_size * t.seq_len
    return {"steps": t.steps, "resumed_from_step": 0, "final_loss": log[-1]["loss"] if log else float("nan"),
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0, "train_seconds": elapsed, "tokens_seen": tokens,
            "dp": {"epsilon": epsilon, "delta": dp.delta, "target_epsilon": dp.target_epsilon,
                   "accountant": dp.accountant, "noise_multiplier": sigma, "init_noise_multiplier": init_noise,
                   "sample_rate": sample_rate, "max_grad_norm": dp.max_grad_norm, "empty_batches": skipped}}
