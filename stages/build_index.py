"""Stage (owner side): the owner's infini-gram index of its training documents, for tracing.

The index is the owner's raw text in another form, so it stays in the owner's folder; the owner's
trace service (tracing/service.py) is the only thing that reads it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer

from stages.io import read_jsonl
from stages.runtime import start_stage
from tracing.index import IndexStats, bow_token_ids, write_index


def build_index(corpus_train: Path, tokenizer_dir: Path, out_dir: Path) -> IndexStats:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def documents():
        for row in read_jsonl(corpus_train):
            yield row["id"], tokenizer(row["text"], add_special_tokens=False)["input_ids"]

    return write_index(documents(), len(tokenizer), bow_token_ids(tokenizer), out_dir, tokenizer.eos_token_id)


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, required=True, help="the owner's train.jsonl")
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    stats = build_index(args.corpus, args.tokenizer, args.out)
    print(f"index: {stats.documents:,} documents, {stats.tokens:,} tokens, written in {stats.seconds_write:.1f} s, "
          f"suffix-sorted in {stats.seconds_sort:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
