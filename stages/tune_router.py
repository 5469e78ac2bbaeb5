"""Stage (coordinator, optional): router tuning of the merged model on public proxy text.

FlexOlmo's optional last step (DESIGN.md section 3.4): only the router rows (and biases, if
kept) learn, with the LM loss, on a little public text chosen per owner to resemble that owner's
domain, about 1 % of the tokens the owner's expert trained on. The merged model's own router is
the classifier that picks it: for owner i, the public documents that route most to expert i.
No owner data is read.

Off by default (`router_tuning.enabled`): the study preset measured it (the report's
"merged (router tuned)" column). Off, the stage writes only its info file.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np

from stages import params as P
from stages.artifacts import MERGED_INFO, TUNING_INFO
from stages.io import atomic_dir, read_jsonl, write_json
from stages.runtime import start_stage


def routing_share(model, docs: list[np.ndarray]) -> np.ndarray:
    """(documents, experts): the mean router probability of each expert over a document's tokens and layers."""
    import torch

    out = []
    for ids in docs:
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids).view(1, -1), output_router_logits=True).router_logits
        out.append(torch.stack([torch.softmax(r.float(), -1).mean(0) for r in logits]).mean(0).numpy())
    return np.stack(out)


def pick_proxy(share: np.ndarray, lengths: np.ndarray, budgets: dict[int, int]) -> dict[int, list[int]]:
    """For each expert index, the documents routed most to it, until their tokens reach its budget."""
    picked = {}
    for expert, budget in budgets.items():
        order, total, chosen = np.argsort(-share[:, expert], kind="stable"), 0, []
        for d in order:
            if total >= budget:
                break
            chosen.append(int(d))
            total += int(lengths[d])
        picked[expert] = chosen
    return picked


def tune_router(merged_dir: Path, public_train: Path, params: P.Params, out_dir: Path, checkpoint: Path) -> dict:
    rt = params.router_tuning
    if not rt.enabled:
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / TUNING_INFO, {"enabled": False})
        return {"enabled": False}
    # Imported here: off (the default), the stage is on the pipeline's critical path just to write
    # its stub, and torch plus transformers take ~5 s to import.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.model.experts import merged_owners
    from stages.train.loop import Checkpointer, lm_losses, train

    t = params.expert.train
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    owners = merged_owners(merged_dir)
    texts = [row["text"] for _, row in zip(range(rt.candidate_docs), read_jsonl(public_train))]
    eos = tokenizer.eos_token_id
    docs = [np.array([*ids[:t.seq_len], eos], dtype=np.int64)
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if ids]
    budgets = {1 + i: max(t.seq_len + 1, round(rt.token_fraction * params.expert_train(o).steps * t.batch_size * t.seq_len))
               for i, o in enumerate(owners)}
    picked = pick_proxy(routing_share(model, docs), np.array([len(d) for d in docs]), budgets)
    proxy = np.concatenate([docs[d] for chosen in picked.values() for d in chosen])
    # Every budget is at least one window (seq_len + 1 tokens), so there is always one.
    windows = torch.from_numpy(np.stack([proxy[i * t.seq_len:(i + 1) * t.seq_len + 1]
                                         for i in range((len(proxy) - 1) // t.seq_len)]))
    order = torch.from_numpy(np.random.default_rng(t.seed).permutation(len(windows) * rt.epochs) % len(windows))
    steps = math.ceil(len(order) / t.batch_size)
    tp = t.model_copy(update={"steps": steps, "lr": rt.lr, "warmup_steps": 0, "checkpoint_every": max(steps, 1)})
    for name, q in model.named_parameters():
        q.requires_grad_(".mlp.gate." in name)

    def step_loss(module, batch):
        ce, _ = lm_losses(module(input_ids=batch[:, :-1]).logits, batch[:, 1:])
        return ce, {"loss": ce.item()}

    log_path = out_dir.with_name(out_dir.name + "_log.jsonl")
    summary = train(model, step_loss, lambda step: windows[order[step * t.batch_size:(step + 1) * t.batch_size]], tp,
                    Checkpointer(checkpoint, f"tune|{merged_dir}|{tp.model_dump_json()}|{rt.model_dump_json()}"),
                    log_path, desc="router tuning")
    info = {"enabled": True, "proxy_docs": {owners[e - 1]: len(c) for e, c in picked.items()},
            "proxy_tokens": int(len(proxy)), "steps": steps, "final_loss": summary["final_loss"],
            "log": [json.loads(line) for line in log_path.read_text().splitlines()]}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(merged_dir / MERGED_INFO, tmp / MERGED_INFO)
        write_json(tmp / TUNING_INFO, info)
    log_path.unlink(missing_ok=True)
    return info


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--merged", type=Path, required=True)
    ap.add_argument("--public-corpus", type=Path, required=True, help="the public train.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    info = tune_router(args.merged, args.public_corpus, P.load(args.params), args.out, args.checkpoint)
    if info["enabled"]:
        print(f"router tuning: {info['proxy_tokens']:,} public proxy tokens, {info['steps']} steps, "
              f"loss {info['final_loss']:.3f}; proxy documents per owner {info['proxy_docs']}")
    else:
        print("router tuning: off (router_tuning.enabled is false)")


if __name__ == "__main__":
    main()
