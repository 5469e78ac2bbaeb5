"""Aurora-M's curriculum for an expert: the documents stage 2 trains on, and the held-out scores
that show, after each stage, what the owner's model gained on its domain and forgot of public text.

Stage 2's subset is the owner's list (`owners.<name>.high_quality`) when it gives one; otherwise
the first `scored_docs` documents less their near-duplicates, kept where the anchor's bits per byte
fall in the middle band: the lowest are boilerplate and repeats (licence headers, tables of
numbers), the highest noise the anchor cannot read.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from stages import params as P
from stages.evidence import relative_interval, resample
from stages.io import read_jsonl
from stages.model.scoring import bits_per_byte, document_nll, token_bytes, token_nll, windows

SHINGLE_WORDS = 5


def shingles(text: str) -> set[int]:
    """The text's word 5-grams, hashed (a document shorter than five words is one shingle)."""
    words = text.split()
    return {zlib.crc32(" ".join(words[i:i + SHINGLE_WORDS]).encode())
            for i in range(max(1, len(words) - SHINGLE_WORDS + 1))}


def near_duplicates(texts: list[str], threshold: float) -> list[bool]:
    """True for each text whose shingles overlap an earlier kept text's by a Jaccard index >= threshold."""
    kept: list[set[int]] = []
    out = []
    for text in texts:
        s = shingles(text)
        duplicate = any(len(s & k) / len(s | k) >= threshold for k in kept)
        out.append(duplicate)
        if not duplicate:
            kept.append(s)
    return out


def select_high_quality(owner: str, corpus_train: Path, given: list[str], selection: P.HighQualitySelection,
                        anchor, tokenizer) -> tuple[list[dict], dict]:
    """Stage 2's documents (rows of train.jsonl) and how they were chosen."""
    rows = list(read_jsonl(corpus_train))
    if given:
        by_id = {r["id"]: r for r in rows}
        unknown = [i for i in given if i not in by_id]
        if unknown:
            raise ValueError(f"owners.{owner}.high_quality names {len(unknown)} document(s) not in {corpus_train} "
                             f"(first: {unknown[0]!r}); list ids of its train.jsonl")
        return [by_id[i] for i in dict.fromkeys(given)], {"method": "owner_list", "documents": len(set(given))}
    pool = rows[:selection.scored_docs]
    duplicate = near_duplicates([r["text"] for r in pool], selection.near_duplicate_jaccard)
    pool = [r for r, d in zip(pool, duplicate) if not d]
    eos = tokenizer.eos_token_id
    docs = [[eos, *ids[:selection.score_tokens]]
            for ids in tokenizer([r["text"] for r in pool], add_special_tokens=False)["input_ids"]]
    bpb = bits_per_byte(document_nll(anchor, docs), docs, token_bytes(tokenizer))
    low, high = np.quantile(bpb, selection.band)
    keep = (bpb >= low) & (bpb <= high)
    chosen = [r for r, k in zip(pool, keep) if k]
    if len(chosen) < 2:
        raise ValueError(f"owner {owner!r}: the curriculum's stage 2 kept {len(chosen)} document(s) of "
                         f"{len(pool)}; widen expert.curriculum.selection.band or raise scored_docs")
    return chosen, {"method": "anchor_bpb_band", "scored": len(duplicate), "near_duplicates": int(sum(duplicate)),
                    "documents": len(chosen), "band_bits_per_byte": [float(low), float(high)],
                    "median_bits_per_byte": float(np.median(bpb))}


class HeldOut:
    """The owner's and the public held-out text (every document's first tokens, evaluate's windows),
    scored after each stage of the curriculum and kept per document, so that recipes compare with
    paired intervals. Per-document numbers stay in this process; what is published is intervals."""

    def __init__(self, tokenizer, owner_val: Path, public_val: Path, tokens: int, seq_len: int, precision: str):
        for path in (owner_val, public_val):
            if not path.exists():
                raise FileNotFoundError(f"{path}: the curriculum scores each stage on this held-out text (the "
                                        "val.jsonl beside the training corpus); add it, or set "
                                        "expert.curriculum.stage2_steps: 0 to train one stage without scores")
        self.texts = {kind: windows(tokenizer, path, tokens, seq_len)
                      for kind, path in (("own", owner_val), ("public", public_val))}
        self.precision = precision
        self.doc_nll: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in self.texts}

    def loss(self, model, name: str) -> dict[str, float]:
        """`model`'s mean held-out loss on each text, its per-document sums kept under `name`."""
        out = {}
        with torch.no_grad():
            for kind, text in self.texts.items():
                nll = text.per_document(token_nll(model, text.rows, 4, self.precision)[0])
                self.doc_nll[kind][name] = nll
                out[f"{kind}_loss"] = float(nll.sum() / text.tokens().sum())
        return out

    def compared(self, pairs: list[tuple[str, str]], seed: int = 0) -> dict[str, dict[str, dict]]:
        """"A vs B": (A - B) / B of the mean loss on each text, with its paired 95 % interval."""
        draws = {kind: resample(text.documents, seed=seed) for kind, text in self.texts.items()}
        return {f"{a} vs {b}": {f"{kind}_loss": relative_interval(self.doc_nll[kind][a], self.doc_nll[kind][b],
                                                                  draws[kind]).model_dump()
                                for kind in self.texts}
                for a, b in pairs}
