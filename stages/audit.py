"""Stage (owner side): what the model gives away of the owner's data, as numbers only (DESIGN.md section 8).

Run by each owner on its own machine, for three models: the merged model with the owner's expert,
the same with it opted out, and the anchor alone. It publishes rates and scores, never text:

- extraction on training documents and, as the baseline, held-out ones: (a) greedy, exact match
  of the next `suffix_tokens` after a `prefix_tokens` prefix (Carlini et al. 2023); (b) FlexOlmo's
  protocol: `samples` samples at top-k 50 / top-p 0.95 / T=1, extracted when any reaches
  normalised Levenshtein similarity >= 0.9 to the true continuation;
- planted canaries (data.canaries): how many come back greedily after their prefix, and their
  exposure, log2(candidates) - log2(rank of the true secret among random ones of its shape);
- membership inference on training vs held-out documents: AUC and TPR at 1 % FPR for the loss,
  the zlib ratio, Min-K% (20 %) and the loss relative to the anchor's (the public reference).

Rates carry Wilson 95 % intervals. With the expert opted out, every number should fall back to
the anchor's: the owner's data then reaches the model through nothing.
"""
from __future__ import annotations

import argparse
import math
import random
import zlib
from pathlib import Path

import numpy as np

from stages import params as P
from stages.artifacts import CANARIES, TAKEN_DOWN
from stages.data.canaries import random_secret
from stages.evidence import RESAMPLES, percentile_interval
from stages.io import read_json, read_jsonl, write_json
from stages.runtime import start_stage
from stages.stats import wilson

# torch, transformers and the models are imported where they are used: off (the default), the
# stage only writes its stub and should not spend seconds importing them.


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counting half (Mann-Whitney)."""
    both = np.concatenate([members, others])
    values, counts = np.unique(both, return_counts=True)
    below = np.cumsum(counts) - counts  # how many scores lie under each distinct value
    ranks = (below + (counts + 1) / 2)[np.searchsorted(values, both)]  # ties share their average rank
    return float((ranks[:len(members)].sum() - len(members) * (len(members) + 1) / 2) / (len(members) * len(others)))


def auc_interval(members: np.ndarray, others: np.ndarray, seed: int = 0) -> dict:
    """The AUC with its 95 % bootstrap interval, members and others each resampled (stages/evidence.py)."""
    rng = np.random.default_rng(seed)
    replicates = np.array([auc(rng.choice(members, len(members)), rng.choice(others, len(others)))
                           for _ in range(RESAMPLES)])
    return percentile_interval(auc(members, others), replicates).model_dump()


def tpr_at_fpr(members: np.ndarray, others: np.ndarray, fpr: float = 0.01) -> float:
    threshold = np.quantile(others, 1 - fpr)
    return float((members > threshold).mean())


def mia_scores(nll: list[np.ndarray], anchor_nll: list[np.ndarray], texts: list[str]) -> dict[str, np.ndarray]:
    """Membership scores, higher = more likely a training document."""
    mean = np.array([n.mean() for n in nll])
    k = [np.sort(n)[-max(1, len(n) // 5):].mean() for n in nll]  # the 20 % least likely tokens
    zlib_bits = np.array([len(zlib.compress(t.encode())) * 8 for t in texts])
    return {"loss": -mean, "zlib": -np.array([n.sum() for n in nll]) / zlib_bits, "min_k": -np.array(k),
            "anchor_ratio": -(mean / np.array([n.mean() for n in anchor_nll]))}


def extraction(model, docs: list[list[int]], a: P.AuditParams, seed: int) -> tuple[int, int]:
    """(greedy exact matches, sampled near matches) over documents of prefix + suffix tokens."""
    import torch
    from rapidfuzz.distance import Levenshtein

    from stages.model.decode import decode

    prefix = torch.tensor([d[:a.prefix_tokens] for d in docs])  # same-length prefixes: no padding
    truth = [d[a.prefix_tokens:a.prefix_tokens + a.suffix_tokens] for d in docs]
    greedy = decode(model, prefix, a.suffix_tokens)[:, a.prefix_tokens:].tolist()
    exact = sum(g == t for g, t in zip(greedy, truth))
    sampled = decode(model, prefix.repeat_interleave(a.samples, 0), a.suffix_tokens, temperature=1.0, top_k=50,
                     top_p=0.95, generator=torch.Generator().manual_seed(seed))[:, a.prefix_tokens:].tolist()
    near = 0
    for i, t in enumerate(truth):
        tries = sampled[i * a.samples:(i + 1) * a.samples]
        near += any(Levenshtein.normalized_similarity(s, t) >= 0.9 for s in tries)
    return exact, near


def canary_audit(model, tokenizer, canaries: list[dict], candidates: int, seed: int) -> list[dict]:
    """Per canary: whether greedy decoding after its prefix writes the secret, and its exposure."""
    import torch

    from stages.model.decode import decode

    rng = random.Random(seed)
    out = []
    for c in canaries:
        prefix = tokenizer(c["prefix"], add_special_tokens=False)["input_ids"]
        secret_ids = tokenizer(" " + c["secret"] + ".", add_special_tokens=False)["input_ids"]
        gen = decode(model, torch.tensor([prefix]), len(secret_ids) + 4)
        extracted = c["secret"] in tokenizer.decode(gen[0, len(prefix):])
        texts = [c["secret"]] + [random_secret(rng) for _ in range(candidates - 1)]
        losses = []
        for start in range(0, len(texts), 128):
            enc = [prefix + tokenizer(" " + t + ".", add_special_tokens=False)["input_ids"]
                   for t in texts[start:start + 128]]
            width = max(map(len, enc))
            ids = torch.tensor([e + [0] * (width - len(e)) for e in enc], device=model.device)
            logits = model(input_ids=ids[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            mask = torch.zeros_like(nll)
            for i, e in enumerate(enc):
                mask[i, len(prefix) - 1:len(e) - 1] = 1
            losses += (nll * mask).sum(1).tolist()
        rank = 1 + sum(v < losses[0] for v in losses[1:])
        out.append({"repeats": c["repeats"], "extracted": bool(extracted),
                    "exposure": math.log2(candidates) - math.log2(rank)})
    return out


def audit_owner(owner: str, corpus_dir: Path, anchor_dir: Path, merged_dir: Path, a: P.AuditParams,
                disabled: list[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.device import for_inference
    from stages.model.experts import load_merged, merged_owners, resolve_experts
    from stages.model.scoring import document_nll

    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(anchor_dir)
    owners = merged_owners(merged_dir)
    with_owner = resolve_experts(None, owners, [d for d in disabled if d != owner])
    models = {"merged": load_merged(merged_dir, with_owner),
              "opted_out": load_merged(merged_dir, [o for o in with_owner if o != owner]),
              "anchor": for_inference(AutoModelForCausalLM.from_pretrained(anchor_dir), "auto")}
    length = a.prefix_tokens + a.suffix_tokens

    def docs(split: str, n: int, min_len: int) -> tuple[list[list[int]], list[str]]:
        rows = [r["text"] for r in read_jsonl(corpus_dir / f"{split}.jsonl")]
        random.Random(f"{a.seed}-{split}").shuffle(rows)
        ids, texts = [], []
        for text in rows:
            t = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(t) >= min_len:
                ids.append(t)
                texts.append(text)
            if len(ids) == n:
                break
        return ids, texts

    train_ids, _ = docs("train", a.documents, length)
    val_ids, _ = docs("val", a.documents, length)
    n = min(len(train_ids), len(val_ids))  # the same number of each, so the rates compare
    mia_train, _ = docs("train", a.mia_documents, 16)
    mia_val, _ = docs("val", a.mia_documents, 16)
    m = min(len(mia_train), len(mia_val))
    mia_train = [d[:a.mia_tokens] for d in mia_train[:m]]
    mia_val = [d[:a.mia_tokens] for d in mia_val[:m]]
    mia_texts = [tokenizer.decode(d) for d in mia_train], [tokenizer.decode(d) for d in mia_val]
    canaries_path = corpus_dir / CANARIES
    canaries = read_json(canaries_path) if canaries_path.exists() else []
    anchor_nll = document_nll(models["anchor"], mia_train), document_nll(models["anchor"], mia_val)
    # Documents under an erasure request: scored as members against the held-out ones, an AUC near
    # 0.5 says the model keeps no trace of them (above it, they are still remembered).
    # Their prefixes are also given to the model: the extraction rate of their suffixes should be
    # the held-out one.
    gone_path = corpus_dir / TAKEN_DOWN
    gone_ids = tokenizer([r["text"] for r in read_jsonl(gone_path)], add_special_tokens=False)["input_ids"] \
        if gone_path.exists() else []
    gone = [d[:a.mia_tokens] for d in gone_ids if len(d) >= 16]
    gone_extract = [d[:length] for d in gone_ids if len(d) >= length]
    gone_texts = [tokenizer.decode(d) for d in gone]
    gone_anchor_nll = document_nll(models["anchor"], gone) if gone and m else []
    result = {"owner": owner, "documents": n, "mia_documents": m, "taken_down_documents": len(gone), "models": {}}
    for name, model in models.items():
        entry: dict = {}
        if n:
            for split, ids in (("train", train_ids[:n]), ("held_out", val_ids[:n])):
                exact, near = extraction(model, [d[:length] for d in ids], a, a.seed)
                entry[f"extraction_greedy_{split}"] = wilson(exact, n)
                entry[f"extraction_sampled_{split}"] = wilson(near, n)
        if gone_extract:
            exact, near = extraction(model, gone_extract, a, a.seed)
            entry["extraction_greedy_taken_down"] = wilson(exact, len(gone_extract))
            entry["extraction_sampled_taken_down"] = wilson(near, len(gone_extract))
        if m:
            members = mia_scores(document_nll(model, mia_train), anchor_nll[0], mia_texts[0])
            others = mia_scores(document_nll(model, mia_val), anchor_nll[1], mia_texts[1])
            entry["mia"] = {k: {"auc": auc(members[k], others[k]), "tpr_at_1pct_fpr": tpr_at_fpr(members[k], others[k])}
                            for k in members if not (name == "anchor" and k == "anchor_ratio")}
            entry["mia"]["loss"]["auc_interval"] = auc_interval(members["loss"], others["loss"], a.seed)
            if len(gone_anchor_nll):
                taken = mia_scores(document_nll(model, gone), gone_anchor_nll, gone_texts)
                entry["mia_taken_down"] = {k: {"auc": auc(taken[k], others[k])} for k in taken
                                           if not (name == "anchor" and k == "anchor_ratio")}
                entry["mia_taken_down"]["loss"]["auc_interval"] = auc_interval(taken["loss"], others["loss"], a.seed)
        if canaries:
            found = canary_audit(model, tokenizer, canaries, a.canary_candidates, a.seed)
            entry["canaries"] = {str(r): {"extracted": wilson(sum(f["extracted"] for f in found if f["repeats"] == r),
                                                              sum(f["repeats"] == r for f in found)),
                                          "exposure": float(np.mean([f["exposure"] for f in found if f["repeats"] == r]))}
                                 for r in sorted({f["repeats"] for f in found})}
        result["models"][name] = entry
    return result


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("owner")
    ap.add_argument("--corpus", type=Path, required=True, help="the owner's corpus folder (train/val, canaries)")
    ap.add_argument("--anchor", type=Path, required=True)
    ap.add_argument("--merged", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="the published numbers (JSON)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    params = P.load(args.params)
    if not params.audit.enabled:
        write_json(args.out, {"owner": args.owner, "enabled": False})
        print(f"audit {args.owner}: off (audit.enabled is false)")
        return
    result = audit_owner(args.owner, args.corpus, args.anchor, args.merged, params.audit, params.inference.disabled)
    write_json(args.out, result)
    for name, entry in result["models"].items():
        mia = entry.get("mia", {}).get("loss", {})
        print(f"audit {args.owner} / {name}: greedy extraction train "
              f"{entry.get('extraction_greedy_train', {}).get('rate', float('nan')):.3f}, "
              f"MIA loss AUC {mia.get('auc', float('nan')):.3f}")


if __name__ == "__main__":
    main()
