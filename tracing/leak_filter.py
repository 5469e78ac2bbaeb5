"""The leak filter of an owner's synthetic documents, run on the owner's side against its own index.

A generated sample may copy the owner's training text. Every window of `max_copied` tokens that
occurs verbatim in the owner's index is cut out (the n-gram count of infini-gram, the same index
the trace service uses); what remains falls apart into pieces, and pieces shorter than
`min_piece` tokens are dropped. Planted canaries get a stricter rule, since a canary's secret is
a few tokens: any piece holding two consecutive groups of a secret is dropped whole.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FilterCounts:
    samples: int = 0
    tokens: int = 0
    cut_tokens: int = 0            # inside a copied window
    dropped_short_tokens: int = 0  # in pieces left shorter than min_piece
    dropped_canary_pieces: int = 0
    samples_with_a_cut: int = 0
    pieces_kept: int = 0


def copied_mask(engine, ids: list[int], max_copied: int) -> list[bool]:
    """True at every token inside a window of `max_copied` tokens that the index holds verbatim."""
    copied = [False] * len(ids)
    for start in range(len(ids) - max_copied + 1):
        if engine.count(input_ids=ids[start:start + max_copied])["count"] > 0:
            for i in range(start, start + max_copied):
                copied[i] = True
    return copied


def ngram_overlap(engine, docs: list[list[int]], n: int) -> float | None:
    """The share of the documents' n-token windows that the index holds verbatim (None: no window)."""
    grams = [d[i:i + n] for d in docs for i in range(len(d) - n + 1)]
    if not grams:
        return None
    return sum(engine.count(input_ids=g)["count"] > 0 for g in grams) / len(grams)


def canary_fragments(canaries: list[dict]) -> list[str]:
    """Two consecutive 4-letter groups of every planted secret: a piece holding one is dropped."""
    out = []
    for c in canaries:
        groups = c["secret"].split()
        out += [f"{a} {b}" for a, b in zip(groups, groups[1:])]
    return out


def filter_sample(engine, tokenizer, ids: list[int], max_copied: int, min_piece: int, fragments: list[str],
                  counts: FilterCounts) -> list[str]:
    """The texts of a sample's pieces that survive the filter (counts updated)."""
    copied = copied_mask(engine, ids, max_copied)
    counts.samples += 1
    counts.tokens += len(ids)
    cut = sum(copied)
    counts.cut_tokens += cut
    counts.samples_with_a_cut += bool(cut)
    pieces, run = [], []
    for token, is_copied in zip([*ids, None], [*copied, True]):
        if is_copied:
            if run:
                pieces.append(run)
            run = []
        else:
            run.append(token)
    kept = []
    for piece in pieces:
        if len(piece) < min_piece:
            counts.dropped_short_tokens += len(piece)
            continue
        text = tokenizer.decode(piece)
        if any(f in text for f in fragments):
            counts.dropped_canary_pieces += 1
            continue
        kept.append(text)
    counts.pieces_kept += len(kept)
    return kept
