"""Stage: the public domain embedding that initialises the public router row.

A domain embedding is the anchor's mean FFN input over up to `router_init_docs` documents of a
domain (DESIGN.md section 3, the anchor fallback; the sentence-embedder variant comes later).
Each owner computes its own inside `train_expert`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Olmo2ForCausalLM

from stages import params as P
from stages.io import atomic_dir, read_jsonl

EMBEDDING_FILE = "embedding.safetensors"


@torch.no_grad()
def mean_hidden_state(model, tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Mean of what the routers read, the FFN inputs of every layer, over the documents' tokens.

    Returned as e / |e|^2, so that a router row set to it gives logit 1 on the domain's mean
    input: the residual stream's norm is in the tens, and a unit-norm row would start the router
    saturated (softmax of logits around 40) with a z-loss that swamps the language-model loss.
    """
    if not texts:
        raise ValueError("no documents to embed")
    total = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    count = 0
    captured: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
             for layer in model.model.layers]
    model.eval()
    docs = [ids[:seq_len] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if ids]
    try:
        for start in range(0, len(docs), 16):  # batched, padding masked out of the mean
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
                total += hidden[mask].double().sum(0)
                count += int(mask.sum())
    finally:
        for h in hooks:
            h.remove()
    mean = (total / max(count, 1)).float()
    return mean / mean.pow(2).sum().clamp_min(1e-12)


def domain_embedding(corpus_train: Path, anchor_dir: Path, n_docs: int, seq_len: int) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(anchor_dir)
    model = Olmo2ForCausalLM.from_pretrained(anchor_dir)
    texts = [row["text"] for _, row in zip(range(n_docs), read_jsonl(corpus_train))]
    return mean_hidden_state(model, tokenizer, texts, seq_len)


def save_embedding(vector: torch.Tensor, out_dir: Path) -> None:
    with atomic_dir(out_dir) as tmp:
        save_file({"embedding": vector.contiguous()}, str(tmp / EMBEDDING_FILE))


def load_embedding(path: Path) -> torch.Tensor:
    return load_file(str(path / EMBEDDING_FILE))["embedding"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--anchor", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    expert = P.load(args.params).expert
    vector = domain_embedding(args.corpus, args.anchor, expert.router_init_docs, expert.train.seq_len)
    save_embedding(vector, args.out)
    print(f"public domain embedding: {vector.numel()} dimensions -> {args.out}")


if __name__ == "__main__":
    main()
