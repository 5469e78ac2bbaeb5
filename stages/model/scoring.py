"""Scoring text with a model: next-token losses per document and the bytes each token stands for.

Bits per byte (the loss in bits over the text's UTF-8 bytes) compares models with different
tokenizers and documents of different lengths; the evaluation, the audit and the curriculum's
document selection all score this way.
"""
from __future__ import annotations

import numpy as np
import torch


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
        x = torch.tensor([ids])
        logits = model(input_ids=x[:, :-1]).logits.float()
        out.append(torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="none").numpy())
    return out


def bits_per_byte(nll: list[np.ndarray], docs: list[list[int]], sizes: np.ndarray) -> np.ndarray:
    """Each document's bits per byte over the tokens `document_nll` scored."""
    return np.array([n.sum() / np.log(2) / max(int(sizes[ids[1:]].sum()), 1) for n, ids in zip(nll, docs)])
