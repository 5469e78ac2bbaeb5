"""Stage (coordinator, optional): router tuning of the merged model; only router rows change.

Methods (`router_tuning.method` is the one shipped, `router_tuning.compare` the others fitted
beside it, each saved as a candidate router the evaluation scores):
- `none`: the router as merged is shipped; the compared methods are fitted and scored all the same.
- `public_lm`, FlexOlmo's optional last step (DESIGN.md section 3.4): the router rows learn, with
  the LM loss, on a little public text chosen per owner to resemble that owner's domain, about
  1 % of the tokens the owner's expert trained on. The merged model's own router picks it: for
  owner i, the public documents that route most to expert i.
- `synthetic_lm`: the LM loss on the synthetic sets the owners published (signed, leak-filtered
  on their side) plus as much public text, every domain with as many rows, stopped early on a
  held-out part of each set.
- `synthetic_ridge`: a closed-form router (stages/model/router_fit.py) fitted on the same sets.
No owner's own data is read by any of them (the oracle, which does, is stage tune_router_oracle).

Off (`router_tuning.enabled`), the stage writes only its info file and models/merged ships as merged.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from stages import params as P
from stages.artifacts import MERGED_INFO, ROUTER_CANDIDATES, SHIPPED_ROUTER, SYNTHETIC_SAMPLES, TUNING_INFO
from stages.io import atomic_dir, read_jsonl, write_json
from stages.package import enrolled_key, verify_package
from stages.results import UNTUNED
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


def synthetic_proxies(published: Path, keyring: Path, owners: list[str]) -> dict[str, list[str]]:
    """Each owner's published synthetic documents, after checking the owner's signature on the set."""
    texts = {}
    for o in owners:
        folder = published / o / "synthetic"
        if not (folder / SYNTHETIC_SAMPLES).exists():
            raise FileNotFoundError(f"{folder}: owner {o!r} published no synthetic set; router tuning on "
                                    f"synthetic proxies needs every merged owner's (set synthesis.enabled: true)")
        verify_package(folder, o, enrolled_key(keyring, o))
        texts[o] = [row["text"] for row in read_jsonl(folder / SYNTHETIC_SAMPLES)]
        if not texts[o]:
            raise ValueError(f"{folder / SYNTHETIC_SAMPLES}: owner {o!r}'s synthetic set is empty (the leak filter "
                             f"dropped every sample, or synthesis.enabled is false); raise synthesis.min_tokens")
    return texts


def tune_router(merged_dir: Path, public_train: Path, params: P.Params, out_dir: Path, checkpoint: Path,
                published: Path | None = None, keyring: Path | None = None) -> dict:
    rt = params.router_tuning
    if not rt.enabled:
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / TUNING_INFO, {"enabled": False})
        return {"enabled": False}
    # Imported here: off, the stage is on the pipeline's critical path just to write its stub, and
    # torch plus transformers take ~5 s to import.
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.model.experts import merged_owners
    from stages.model.router_fit import balanced_rows, router_state, set_router_state
    from stages.train.router_tuning import fit_ridge_scale, mean_lm_loss, tune_routers_lm

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    owners = merged_owners(merged_dir)
    texts = [row["text"] for _, row in zip(range(rt.candidate_docs), read_jsonl(public_train))]
    methods = [rt.method, *[m for m in rt.compare if m != rt.method]]
    precision, infos = params.expert.train.precision, {}
    held_out = None
    if any(m.startswith("synthetic") for m in methods):
        if published is None or keyring is None:
            raise ValueError("router tuning on synthetic proxies reads the owners' synthetic sets: "
                             "pass the published folder and the keyring")
        synthetic = synthetic_proxies(published, keyring, owners)
        # One split for every method: each is judged on the same held-out rows of every domain.
        train_rows, held_out, per_domain = balanced_rows(tokenizer, {**synthetic, "public": texts}, rt.seq_len,
                                                         rt.held_out_fraction)
        labels = [1 + i for i, o in enumerate(owners) for _ in range(per_domain[o])] + [0] * per_domain["public"]
        infos[UNTUNED] = {"held_out_loss": mean_lm_loss(model, held_out, rt.batch_size, precision)}
    merged_router, candidates = router_state(model), {}
    # The router as merged needs no fitting: the evaluation scores it as router/none in any case.
    for method in (m for m in methods if m != UNTUNED):
        set_router_state(model, merged_router)
        started = time.perf_counter()
        if method == "synthetic_ridge":
            info = fit_ridge_scale(model, train_rows, labels, held_out, rt.ridge_lambda, rt.ridge_scales,
                                   rt.batch_size, precision)
        elif method == "synthetic_lm":
            info = tune_routers_lm(model, train_rows, held_out, rt.lr, rt.max_epochs, rt.patience, rt.batch_size,
                                   params.expert.train.seed, precision)
        else:
            info = tune_on_public_proxies(model, tokenizer, owners, texts, merged_dir, params, out_dir, checkpoint)
        if held_out is not None:
            info |= {"rows_per_domain": per_domain,
                     "held_out_loss": mean_lm_loss(model, held_out, rt.batch_size, precision)}
        info["seconds"] = round(time.perf_counter() - started, 1)
        infos[method], candidates[method] = info, router_state(model)
    set_router_state(model, candidates.get(rt.method, merged_router))
    info = {"enabled": True, "method": rt.method, "methods": infos}
    # The router rows only, an overlay on models/merged (load_model applies it): no second copy of the experts.
    with atomic_dir(out_dir) as tmp:
        save_file(candidates.get(rt.method, merged_router), tmp / SHIPPED_ROUTER)
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(merged_dir / MERGED_INFO, tmp / MERGED_INFO)
        (tmp / ROUTER_CANDIDATES).mkdir()
        for method, state in candidates.items():
            save_file(state, tmp / ROUTER_CANDIDATES / f"{method}.safetensors")
        write_json(tmp / TUNING_INFO, info)
    return info


def tune_on_public_proxies(model, tokenizer, owners: list[str], texts: list[str], merged_dir: Path, params: P.Params,
                           out_dir: Path, checkpoint: Path) -> dict:
    """FlexOlmo's router tuning: the LM loss on the public text the merged router sends to each owner."""
    import torch

    from stages.train.loop import Checkpointer, lm_losses, train

    rt, t = params.router_tuning, params.expert.train
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
    info = {"proxy_docs": {owners[e - 1]: len(c) for e, c in picked.items()},
            "proxy_tokens": int(len(proxy)), "steps": steps, "final_loss": summary["final_loss"],
            "log": [json.loads(line) for line in log_path.read_text().splitlines()]}
    log_path.unlink(missing_ok=True)
    return info


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--merged", type=Path, required=True)
    ap.add_argument("--public-corpus", type=Path, required=True, help="the public train.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--published", type=Path, required=True, help="the owners' published folders (synthetic sets)")
    ap.add_argument("--keyring", type=Path, required=True, help="the owners' enrolled public keys")
    ap.add_argument("--metrics", type=Path, help="where each method's held-out loss and seconds go (JSON, for MLflow)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    info = tune_router(args.merged, args.public_corpus, P.load(args.params), args.out, args.checkpoint,
                       args.published, args.keyring)
    if args.metrics:
        write_json(args.metrics, {m: {k: v for k, v in i.items() if k in ("held_out_loss", "seconds", "scale")}
                                  for m, i in info.get("methods", {}).items()})
    if not info["enabled"]:
        print("router tuning: off (router_tuning.enabled is false)")
    for method, m in info.get("methods", {}).items():
        shipped = " (shipped)" if method == info["method"] else ""
        held_out = f", held-out synthetic loss {m['held_out_loss']:.3f}" if "held_out_loss" in m else ""
        held_out += f", {m['seconds']:.0f} s" if "seconds" in m else ""
        if method == "synthetic_ridge":
            print(f"router tuning {method}{shipped}: closed-form router at scale {m['scale']} (of "
                  f"{list(m['held_out_loss_by_scale'])}){held_out}")
        elif method == "synthetic_lm":
            print(f"router tuning {method}{shipped}: {m['rows_per_domain']} rows per domain, best epoch "
                  f"{m['best_epoch']} of {len(m['log']) - 1}{held_out}")
        elif method == "public_lm":
            print(f"router tuning {method}{shipped}: {m['proxy_tokens']:,} public proxy tokens, {m['steps']} steps, "
                  f"loss {m['final_loss']:.3f}{held_out}")
        else:
            print(f"router as merged{shipped}{held_out}")


if __name__ == "__main__":
    main()
