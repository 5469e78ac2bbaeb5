"""Stage (reference only): the oracle router, a diagnostic and never a default.

Router tuning's upper bound: the same LM-loss tuning as `synthetic_lm` (only router rows learn,
every domain with as many rows, stopped early on held-out rows), fed each owner's *real* text
instead of its synthetic set, as many tokens as that set holds. Like the unrestricted reference it
reads every owner's data, so it runs only with `unrestricted.enabled` (the study and smoke
presets); off, it writes a stub. It reads the owners' training split: their held-out split is what
the evaluation scores the router on.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stages import params as P
from stages.artifacts import ORACLE_ROUTER, SYNTHETIC_STATS, TUNING_INFO
from stages.io import atomic_dir, read_json, read_jsonl, write_json
from stages.runtime import start_stage


def real_text(jsonl: Path, tokenizer, budget: int) -> list[str]:
    """A corpus's documents, in order, until they hold `budget` tokens."""
    texts, total = [], 0
    for row in read_jsonl(jsonl):
        if total >= budget:
            break
        texts.append(row["text"])
        total += len(tokenizer(row["text"], add_special_tokens=False)["input_ids"])
    return texts


def tune_router_oracle(merged_dir: Path, owners_root: Path, public_train: Path, published: Path, params: P.Params,
                       out_dir: Path) -> dict:
    if not params.unrestricted.enabled:
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / TUNING_INFO, {"enabled": False})
        return {"enabled": False}
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.model.experts import merged_owners
    from stages.model.router_fit import balanced_rows, router_state
    from stages.train.router_tuning import tune_routers_lm

    rt = params.router_tuning
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    owners = merged_owners(merged_dir)
    budgets = {}
    for o in owners:
        stats = published / o / "synthetic" / SYNTHETIC_STATS
        # Without a synthetic set to match, the budget synthesis would have had.
        budgets[o] = read_json(stats)["tokens"] if stats.exists() else params.synthesis.min_tokens
    texts = {o: real_text(owners_root / o / "corpus" / "train.jsonl", tokenizer, budgets[o]) for o in owners}
    texts["public"] = real_text(public_train, tokenizer, round(sum(budgets.values()) / len(owners)))
    train_rows, held_out, per_domain = balanced_rows(tokenizer, texts, rt.seq_len, rt.held_out_fraction)
    info = tune_routers_lm(model, train_rows, held_out, rt.lr, rt.max_epochs, rt.patience, rt.batch_size,
                           params.expert.train.seed, params.expert.train.precision)
    info = {"enabled": True, "method": "oracle", "rows_per_domain": per_domain, "tokens": budgets, **info}
    with atomic_dir(out_dir) as tmp:
        save_file(router_state(model), tmp / ORACLE_ROUTER)
        write_json(tmp / TUNING_INFO, info)
    return info


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--merged", type=Path, required=True)
    ap.add_argument("--owners-root", type=Path, required=True, help="owners/: every owner's corpus")
    ap.add_argument("--public-corpus", type=Path, required=True, help="the public train.jsonl")
    ap.add_argument("--published", type=Path, required=True, help="the owners' synthetic sets: their sizes")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    info = tune_router_oracle(args.merged, args.owners_root, args.public_corpus, args.published,
                              P.load(args.params), args.out)
    if info["enabled"]:
        print(f"oracle router: {info['rows_per_domain']} rows per domain of real text, best epoch "
              f"{info['best_epoch']}, held-out loss {info['log'][0]['held_out_loss']:.3f} -> {info['held_out_loss']:.3f}")
    else:
        print("oracle router: off (unrestricted.enabled is false)")


if __name__ == "__main__":
    main()
