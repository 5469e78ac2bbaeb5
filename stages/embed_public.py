"""Stage embed_public: the public domain embedding that initialises the public router row
(stages/model/router_rows.py says how, by `expert.router_init`)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import params as P
from stages.io import read_jsonl
from stages.model.router_rows import router_row, save_embedding
from stages.runtime import start_stage


def embed_public(corpus_train: Path, anchor_dir: Path, n_docs: int, seq_len: int, method: str) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(anchor_dir)
    model = AutoModelForCausalLM.from_pretrained(anchor_dir)
    texts = [row["text"] for _, row in zip(range(n_docs), read_jsonl(corpus_train))]
    return router_row(model, tokenizer, texts, seq_len, method)


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    for name, what in (("--corpus", "the public training corpus (JSON lines)"), ("--anchor", "the anchor's folder"),
                       ("--out", "where the embedding goes")):
        ap.add_argument(name, type=Path, required=True, help=what)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    expert = P.load(args.params).expert
    vector = embed_public(args.corpus, args.anchor, expert.router_init_docs, expert.train.seq_len,
                          expert.router_init)
    save_embedding(vector, args.out)
    print(f"public domain embedding: {vector.numel()} dimensions -> {args.out}")


if __name__ == "__main__":
    main()
