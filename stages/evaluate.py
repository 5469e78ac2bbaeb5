"""Stage: held-out loss and bits per byte of the anchor and the merged model on one domain.

For an owner's domain this runs on the owner's side (its val split never leaves it) and
publishes only the numbers; for the public domain it runs at the coordinator.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import params as P
from stages.io import write_json
from stages.training import tokenize_corpus


def token_bytes(tokenizer) -> np.ndarray:
    """Bytes each token stands for: a byte-level BPE token's string has one character per byte."""
    special = set(tokenizer.all_special_ids)
    sizes = np.zeros(len(tokenizer), dtype=np.int64)
    for token, idx in tokenizer.get_vocab().items():
        sizes[idx] = 0 if idx in special else len(token)
    return sizes


@torch.no_grad()
def heldout_loss(model, tokens: np.ndarray, sizes: np.ndarray, e: P.EvaluateParams) -> dict:
    """Mean next-token loss (nats) and bits per byte over non-overlapping windows of the tokens."""
    n_windows = max(1, min(len(tokens) - 1, e.max_tokens) // e.seq_len)
    window = min(e.seq_len, len(tokens) - 1)
    rows = np.stack([tokens[i * window:i * window + window + 1] for i in range(n_windows)])
    nll, n_tokens, n_bytes = 0.0, 0, 0
    model.eval()
    for start in range(0, len(rows), e.batch_size):
        batch = torch.from_numpy(rows[start:start + e.batch_size].astype(np.int64))
        logits = model(input_ids=batch[:, :-1]).logits.float()
        targets = batch[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                 reduction="sum").item()
        n_tokens += targets.numel()
        n_bytes += int(sizes[targets.numpy()].sum())
    return {"loss": nll / n_tokens, "bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "tokens": n_tokens}


def evaluate_domain(domain: str, val: Path, models: dict[str, Path], e: P.EvaluateParams) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(next(iter(models.values())))
    tokens = tokenize_corpus(tokenizer, val)
    sizes = token_bytes(tokenizer)
    result = {"domain": domain}
    for name, path in models.items():
        result[name] = heldout_loss(AutoModelForCausalLM.from_pretrained(path), tokens, sizes, e)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("domain")
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--anchor", type=Path, required=True)
    ap.add_argument("--merged", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    e = P.load(args.params).evaluate
    result = evaluate_domain(args.domain, args.val, {"anchor": args.anchor, "merged": args.merged}, e)
    write_json(args.out, result)
    print(f"evaluate {args.domain}: anchor {result['anchor']['loss']:.3f}, merged {result['merged']['loss']:.3f}")


if __name__ == "__main__":
    main()
