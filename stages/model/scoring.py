"""Scoring text with a model: next-token losses per document and the bytes each token stands for.

Bits per byte (the loss in bits over the text's UTF-8 bytes) compares models with different
tokenizers and documents of different lengths; the evaluation, the audit and the curriculum's
document selection all score this way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.device import autocast
from stages.io import read_jsonl
from stages.model.experts import expert_masks
from stages.runtime import follow_granted_threads


def token_bytes(tokenizer) -> np.ndarray:
    """Bytes each token stands for: a byte-level BPE token's string has one character per byte."""
    special = set(tokenizer.all_special_ids)
    sizes = np.zeros(len(tokenizer), dtype=np.int64)
    for token, idx in tokenizer.get_vocab().items():
        sizes[idx] = 0 if idx in special else len(token)
    return sizes


@torch.no_grad()
def document_nll(model, docs: list[list[int]]) -> list[np.ndarray]:
    """Each document's next-token NLL (nats) from its second token on, one document at a time."""
    out = []
    for ids in docs:
        x = torch.tensor([ids], device=model.device)
        logits = model(input_ids=x[:, :-1]).logits.float()
        out.append(torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="none").cpu().numpy())
    return out


def bits_per_byte(nll: list[np.ndarray], docs: list[list[int]], sizes: np.ndarray) -> np.ndarray:
    """Each document's bits per byte over the tokens `document_nll` scored."""
    return np.array([n.sum() / np.log(2) / max(int(sizes[ids[1:]].sum()), 1) for n, ids in zip(nll, docs)])


@dataclass(frozen=True)
class ScoredText:
    """The held-out tokens an evaluation scores, and whose document each target token is."""
    rows: np.ndarray  # (windows, seq_len + 1) token ids
    doc_of: np.ndarray  # (windows, seq_len): the document of each target token
    documents: int
    text: str  # the held-out split, whole: xz's second reference

    def per_document(self, values: np.ndarray) -> np.ndarray:
        """Per-target-token values (windows, seq_len) summed per document."""
        return np.bincount(self.doc_of.ravel(), weights=values.ravel(), minlength=self.documents)

    def tokens(self) -> np.ndarray:
        """Target tokens per document."""
        return np.bincount(self.doc_of.ravel(), minlength=self.documents).astype(float)


def fair_shares(lengths: list[int], budget: int) -> list[int]:
    """Tokens to take from the start of each document: an equal share each, a short document's
    leftover shared among the longer ones (water-filling), `budget` in all or every token."""
    take, left, open_docs = [0] * len(lengths), budget, sorted(range(len(lengths)), key=lengths.__getitem__)
    while open_docs and left > 0:
        share = max(1, left // len(open_docs))
        for i in list(open_docs):
            extra = min(share, lengths[i] - take[i], left)
            take[i] += extra
            left -= extra
            if take[i] == lengths[i]:
                open_docs.remove(i)
    return take


def windows(tokenizer, val: Path, max_tokens: int, seq_len: int) -> ScoredText:
    """Windows of seq_len + 1 tokens over the start of every held-out document, max_tokens targets in all.

    Each document gives its first tokens, an equal share of the budget (all of a short one), then
    EOS; the excerpts run on into one stream, cut into non-overlapping windows, so every document
    is scored and each target token is counted to its own document.
    """
    texts = [row["text"] for row in read_jsonl(val)]
    if not texts:
        raise ValueError(f"{val}: holds no document")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    take = fair_shares([len(d) for d in ids], max_tokens + 1 - len(ids))  # +1: the first token is no target
    stream = np.fromiter((t for d, k in zip(ids, take) for t in (*d[:k], tokenizer.eos_token_id)), dtype=np.int64)
    doc = np.repeat(np.arange(len(ids)), [k + 1 for k in take])
    window = min(seq_len, len(stream) - 1)
    n = (len(stream) - 1) // window
    rows = np.stack([stream[i * window:i * window + window + 1] for i in range(n)])
    doc_of = np.stack([doc[i * window + 1:i * window + window + 1] for i in range(n)])
    return ScoredText(rows=rows, doc_of=doc_of, documents=len(ids), text="\n\n".join(texts))


@torch.no_grad()
def token_nll(model, rows: np.ndarray, batch_size: int, precision: str = "fp32",
              routing: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Next-token NLL (nats) of every target token of every window, shape (windows, seq_len), and
    with `routing` (a merged model) in the same pass each token's share of routing weight per expert,
    (windows, seq_len, experts): the top-k weights, renormalised, averaged over layers."""
    model.eval()
    where = next(model.parameters()).device
    nll, shares = [], []
    for start in range(0, len(rows), batch_size):
        follow_granted_threads()  # cores another stage freed, lent to this one (flows/pipeline.CpuScheduler)
        batch = torch.from_numpy(rows[start:start + batch_size]).to(where)
        with autocast(precision):
            out = model(input_ids=batch[:, :-1], output_router_logits=routing)
        # Over the vocabulary as the last, contiguous dimension: cross_entropy over a transposed (batch, vocab,
        # length) view ran its log-softmax strided, 3.5x slower (2026-12-08, 49,152 logits x 2,040 tokens).
        targets = batch[:, 1:]
        nll.append(torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(),
                                                     reduction="none").view(targets.shape).cpu().numpy())
        if routing:
            k, total = model.config.num_experts_per_tok, 0
            for layer_logits in out.router_logits:
                probs = torch.softmax(layer_logits.float(), -1)
                top, idx = probs.topk(k, -1)
                weights = torch.zeros_like(probs).scatter_(1, idx, top)
                total = total + weights / weights.sum(-1, keepdim=True)
            shares.append((total / len(out.router_logits)).view(*batch[:, 1:].shape, -1).cpu().numpy())
    return np.concatenate(nll), np.concatenate(shares) if routing else None


def masked_token_nll(model, rows: np.ndarray, keeps: list[list[int]], batch_size: int,
                     precision: str = "fp32") -> list[np.ndarray]:
    """token_nll of `slice_experts(model, keep)` for each keep, scored without a copy of the model:
    every batch carries each configuration's copy of the same windows (experts.expert_masks)."""
    per_part = max(1, batch_size // len(keeps))
    parts: list[list[np.ndarray]] = [[] for _ in keeps]
    with expert_masks(model, keeps):
        for start in range(0, len(rows), per_part):
            chunk = rows[start:start + per_part]
            nll = token_nll(model, np.tile(chunk, (len(keeps), 1)), len(chunk) * len(keeps), precision)[0]
            for part, values in zip(parts, np.split(nll, len(keeps))):
                part.append(values)
    return [np.concatenate(part) for part in parts]
