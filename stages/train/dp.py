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

import math
from pathlib import Path

import numpy as np
import torch

from stages import params as P
from stages.device import resolved
from stages.model.router_rows import as_router_row, hidden_sums
from stages.train.loop import PlainSteps, train


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


class PrivateSteps(PlainSteps):
    """DP-SGD's way of taking a step of the training loop (Opacus): Poisson-sampled documents
    instead of `make_batch`, each document's gradient clipped (GradSampleModule, DPOptimizer),
    the noise added once per step. Micro-batches (train.grad_accumulation) are clipped and added
    up without noise or a step, so the release is the same as in one pass. It stays on the CPU
    and does not resume: that would need the accountant's history and the loader's and the
    noise's generator states in the checkpoint."""
    resumable = False

    def __init__(self, docs: list[np.ndarray], t: P.TrainParams, dp: P.DPParams, init_noise: float) -> None:
        from opacus.data_loader import DPDataLoader

        self.t, self.dp = t, dp
        self.sample_rate = min(1.0, t.batch_size / len(docs))
        self.sigma = training_noise(dp, self.sample_rate, t.steps)
        self.accountant = accountant_for(dp.accountant)
        self.accountant.history = [(init_noise, 1.0, 1)]
        self.loader = DPDataLoader(DocumentWindows(docs, t.seq_len, t.seed), sample_rate=self.sample_rate,
                                   generator=torch.Generator().manual_seed(t.seed))
        self.batches = iter(self.loader)

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        from opacus import GradSampleModule

        return GradSampleModule(model)

    def optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        from opacus.optimizers import DPOptimizer

        private = DPOptimizer(opt, noise_multiplier=self.sigma, max_grad_norm=self.dp.max_grad_norm,
                              expected_batch_size=self.t.batch_size,
                              generator=torch.Generator().manual_seed(self.t.seed + 17))
        private.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        return private

    def batch(self, make_batch, step: int) -> torch.Tensor:
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def place(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def split(self, batch: torch.Tensor, parts: int) -> list[torch.Tensor]:
        return [m for m in batch.tensor_split(parts) if len(m)]  # Poisson batches vary in size

    def backward(self, opt, loss: torch.Tensor, weight: float, last: bool) -> None:
        loss.backward()  # Opacus scales each document's gradient itself: no weight
        if not last:
            opt.signal_skip_step(do_skip=True)
            opt.step()
            opt.zero_grad(set_to_none=True)  # the per-document gradients; their clipped sum stays

    def step(self, opt, trained: list[torch.nn.Parameter], p: P.TrainParams) -> None:
        opt.step()  # clip the last micro-batch's documents, add the noise once, step

    def log_numbers(self, batch: torch.Tensor) -> dict[str, float]:
        return {"documents": int(batch.shape[0]), "epsilon": self.epsilon()}

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(delta=self.dp.delta))

    def finish(self, model: torch.nn.Module, work: torch.nn.Module) -> None:
        pass  # GradSampleModule trained `model`'s own parameters


def document_loss(module: torch.nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean over documents of each document's mean token loss (windows padded with -1)."""
    inputs, targets = rows[:, :-1].clamp_min(0), rows[:, 1:]
    logits = module(input_ids=inputs).logits.float()
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-1, reduction="none")
    valid = (targets >= 0).float()
    loss = ((per_token * valid).sum(1) / valid.sum(1).clamp_min(1)).mean()
    return loss, {"loss": loss.item()}


def train_dp(model: torch.nn.Module, docs: list[np.ndarray], t: P.TrainParams, dp: P.DPParams, log_path: Path,
             lr_scale, init_noise: float, desc: str) -> dict:
    """DP-SGD over the model's trainable parameters: the training loop with PrivateSteps; returns
    the summary with the epsilon spent."""
    if resolved(t.precision) == "bf16":
        # Opacus computes per-document gradients in hooks on each layer's fp32 activations and
        # gradients; under autocast they arrive in bfloat16 and its clipping norms lose precision.
        print(f"{desc}: DP-SGD trains in fp32 (precision bf16 does not apply to Opacus's per-document gradients)")
    if t.activation_checkpointing:
        print(f"{desc}: DP-SGD trains without activation checkpointing (Opacus's hooks need each layer's activations)")
    t = t.model_copy(update={"precision": "fp32", "activation_checkpointing": False})
    private = PrivateSteps(docs, t, dp, init_noise)
    summary = train(model, document_loss, None, t, None, log_path, desc, lr_scale=lr_scale, steps=private)
    summary["dp"] = {"epsilon": private.epsilon(), "delta": dp.delta, "target_epsilon": dp.target_epsilon,
                     "accountant": dp.accountant, "noise_multiplier": private.sigma, "init_noise_multiplier": init_noise,
                     "sample_rate": private.sample_rate, "max_grad_norm": dp.max_grad_norm,
                     "empty_batches": summary["skipped_steps"]}
    return summary
