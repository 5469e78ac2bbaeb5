"""Stage synthesize@<owner> (the owner's side): synthetic proxy documents of the owner's domain.

The owner's own model (the anchor with its published expert: for a DP owner the DP one, so the
guarantee carries over by post-processing) samples documents with top-p, from the start of a
document and from the topic prompts the owner lists (`owners.<name>.topics`). Every sample goes
through the leak filter (tracing/leak_filter.py) against the owner's own index before anything is
written; what survives is published, signed with the owner's key, beside the numbers that say
how close it is to the owner's held-out text (unigram Jensen-Shannon divergence, distinct-2/3,
the anchor's and the owner's model's bits per byte, and how well a nearest-centroid classifier
tells real from synthetic) and how much the filter cut. The documents themselves never leave.
"""
from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import params as P
from stages.artifacts import CANARIES, MANIFEST, SIGNATURE, SYNTHETIC_SAMPLES, SYNTHETIC_STATS, WEIGHTS
from stages.device import for_inference
from stages.io import atomic_dir, file_digest, read_json, read_jsonl, write_json, write_jsonl
from stages.model.decode import decode
from stages.model.router_rows import load_embedding
from stages.package import owner_model, sign_package
from stages.runtime import start_stage, step_bar
from tracing.index import open_engine
from tracing.leak_filter import FilterCounts, canary_fragments, filter_sample, ngram_overlap


def generate_samples(model, tokenizer, topics: list[str], s: P.SynthesisParams, n_samples: int) -> list[list[int]]:
    """Token ids of n_samples sampled documents, each cut at its first end of document."""
    eos = tokenizer.eos_token_id
    starts = [[eos]] + [[eos, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in topics]
    generator = torch.Generator().manual_seed(s.seed)
    out: list[list[int]] = []
    batches = math.ceil(n_samples / s.batch_size)
    for b in step_bar(range(batches), "synthesize", batches):
        prompt = starts[b % len(starts)]
        rows = min(s.batch_size, n_samples - len(out))
        ids = decode(model, torch.tensor([prompt] * rows), s.sample_tokens, temperature=s.temperature, top_p=s.top_p,
                     generator=generator)
        for row in ids[:, 1:].tolist():  # the start-of-document token is not text
            out.append(row[:row.index(eos)] if eos in row else row)
    return out


def unigram_jsd(a: Counter, b: Counter) -> float:
    """Jensen-Shannon divergence (bits, 0 to 1) between two token distributions."""
    vocab = sorted(set(a) | set(b))
    p = np.array([a[t] for t in vocab], dtype=float)
    q = np.array([b[t] for t in vocab], dtype=float)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(x):
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    return (kl(p) + kl(q)) / 2


def distinct(docs: list[list[int]], n: int) -> float:
    """Distinct n-grams / all n-grams (1: no n-gram repeats)."""
    grams = [tuple(d[i:i + n]) for d in docs for i in range(len(d) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


@torch.no_grad()
def bits_per_byte(model, tokenizer, texts: list[str]) -> float:
    nats, n_bytes = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            continue
        batch = torch.tensor([[tokenizer.eos_token_id, *ids]], device=model.device)
        logits = model(input_ids=batch[:, :-1]).logits.float()
        nats += float(torch.nn.functional.cross_entropy(logits[0], batch[0, 1:], reduction="sum"))
        n_bytes += len(text.encode("utf-8"))
    return nats / math.log(2) / max(n_bytes, 1)


def real_vs_synthetic_accuracy(real: list[list[int]], synthetic: list[list[int]]) -> float | None:
    """Leave-one-out accuracy of a nearest-centroid classifier on unigram frequencies (0.5: it cannot tell)."""
    n = min(len(real), len(synthetic))
    if n < 2:
        return None
    docs = real[:n] + synthetic[:n]
    vocab = {t: i for i, t in enumerate(sorted({t for d in docs for t in d}))}
    x = np.zeros((2 * n, len(vocab)))
    for row, d in enumerate(docs):
        for t in d:
            x[row, vocab[t]] += 1
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = np.array([0] * n + [1] * n)
    right = 0
    for i in range(2 * n):
        rest = np.arange(2 * n) != i
        centroids = [x[rest & (labels == k)].mean(0) for k in (0, 1)]
        right += int(np.argmax([x[i] @ c for c in centroids]) == labels[i])
    return right / (2 * n)


def synthesize(owner: str, anchor_dir: Path, public_embedding: Path, package: Path, index_dir: Path, corpus: Path,
               s: P.SynthesisParams, topics: list[str], train_tokens: int, out_dir: Path, signing_key: Path) -> dict:
    if not signing_key.exists():
        raise FileNotFoundError(f"{signing_key}: no signing key for owner {owner!r}; "
                                f"create one with `consort owner init {owner}`")
    tokenizer = AutoTokenizer.from_pretrained(anchor_dir)
    manifest = read_json(package / MANIFEST)
    samples = []
    if s.enabled:  # off, the set is empty and no model is loaded
        anchor = AutoModelForCausalLM.from_pretrained(anchor_dir)
        model = for_inference(owner_model(anchor, load_embedding(public_embedding), load_file(package / WEIGHTS)), "auto")
        budget = max(s.min_tokens, math.ceil(s.token_fraction * train_tokens))
        samples = generate_samples(model, tokenizer, topics, s, math.ceil(budget / s.sample_tokens))

    canaries = read_json(corpus / CANARIES) if (corpus / CANARIES).exists() else []
    counts, texts = FilterCounts(), []
    engine = open_engine(index_dir) if samples else None
    fragments = canary_fragments(canaries)
    for ids in samples:
        texts += filter_sample(engine, tokenizer, ids, s.max_copied_tokens, s.min_piece_tokens, fragments, counts)

    held_out = [row["text"] for _, row in zip(range(64), read_jsonl(corpus / "val.jsonl"))]
    real_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in held_out]
    synthetic_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    fidelity = {}
    if texts:
        fidelity = {
            "unigram_jsd_bits": unigram_jsd(Counter(t for d in synthetic_ids for t in d),
                                            Counter(t for d in real_ids for t in d)),
            "distinct_2": distinct(synthetic_ids, 2), "distinct_3": distinct(synthetic_ids, 3),
            "held_out_distinct_2": distinct(real_ids, 2), "held_out_distinct_3": distinct(real_ids, 3),
            "anchor_bits_per_byte": bits_per_byte(anchor, tokenizer, texts),
            "owner_model_bits_per_byte": bits_per_byte(model, tokenizer, texts),
            "real_vs_synthetic_accuracy": real_vs_synthetic_accuracy(real_ids, synthetic_ids),
        }
    memorisation = {}
    if texts:
        # Windows of max_copied_tokens are cut by construction; half that length is where the filter
        # does not act, and held-out text of the same size (never trained on) is the yardstick.
        n = max(4, s.max_copied_tokens // 2)
        left, held_out_ids = sum(len(d) for d in synthetic_ids), []
        for d in real_ids:
            if left <= 0:
                break
            held_out_ids.append(d[:left])
            left -= len(held_out_ids[-1])
        memorisation = {"ngram_tokens": n, "published": ngram_overlap(engine, synthetic_ids, n),
                        "generated": ngram_overlap(engine, samples, n),
                        "held_out": ngram_overlap(engine, held_out_ids, n)}
    stats = {
        "enabled": s.enabled, "owner": owner, "documents": len(texts),
        "tokens": sum(len(d) for d in synthetic_ids),
        # Which model wrote them: the published package (for a DP owner the DP one, with its epsilon).
        "model": {"package_hash": file_digest(package / SIGNATURE), "dp": manifest.get("dp")},
        "leak_filter": vars(counts) | {"max_copied_tokens": s.max_copied_tokens, "canaries_checked": len(canaries)},
        "fidelity": fidelity,
        # Share of n-token windows found verbatim in the owner's training data: the published set, the
        # samples before the filter, and as much held-out text (extraction-style evidence in numbers).
        "memorisation": memorisation,
    }
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / SYNTHETIC_SAMPLES, ({"id": f"{owner}-synthetic-{i}", "text": t} for i, t in enumerate(texts)))
        write_json(tmp / SYNTHETIC_STATS, stats)
        sign_package(tmp, signing_key, owner)
    return stats


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("owner")
    for name, what in (("--anchor", "the anchor's folder"), ("--public-embedding", "the public router row"),
                       ("--package", "the owner's published expert package"),
                       ("--index", "the owner's infini-gram index (the leak filter's)"),
                       ("--corpus", "the owner's corpus folder (held-out text, canaries)"),
                       ("--out", "where the signed synthetic set goes"), ("--signing-key", "the owner's private key")):
        ap.add_argument(name, type=Path, required=True, help=what)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    params = P.load(args.params)
    if args.owner not in params.owners:
        raise SystemExit(f"unknown owner {args.owner!r}: params.yaml lists {sorted(params.owners)}")
    t = params.expert_train(args.owner)
    stats = synthesize(args.owner, args.anchor, args.public_embedding, args.package, args.index, args.corpus,
                       params.synthesis, params.owners[args.owner].topics, t.steps * t.batch_size * t.seq_len,
                       args.out, args.signing_key)
    f = stats["leak_filter"]
    print(f"synthesize {args.owner}: {stats['documents']} documents, {stats['tokens']} tokens kept; the leak filter "
          f"cut {f['cut_tokens']} of {f['tokens']} tokens ({f['samples_with_a_cut']} of {f['samples']} samples) and "
          f"dropped {f['dropped_canary_pieces']} pieces holding a canary")


if __name__ == "__main__":
    main()
