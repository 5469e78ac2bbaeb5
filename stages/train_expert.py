"""Stage (owner side): train one owner's expert against the frozen anchor, FlexOlmo style.

Runs on the owner's machine over the owner's private corpus and writes the expert package the
owner publishes: a 2-expert `FlexOlmoForCausalLM` ([public FFN, owner FFN], router rows
[r_pub; r_owner]) and a manifest. No text and no private path goes into the package.
"""
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import params as P
from stages.artifacts import ANCHOR_INFO, MANIFEST, MANIFEST_VERSION, WEIGHTS
from stages.io import atomic_dir, file_digest, parse_expert_cli, read_json, read_jsonl, write_json
from stages.model.moe import blocks, project_bias, upcycle
from stages.model.router_rows import load_embedding, router_row
from stages.package import expert_tensors, sign_package
from stages.runtime import start_stage
from stages.train.curriculum import HeldOut, select_high_quality
from stages.train.distributed import finish, is_main, local_rows, world
from stages.train.dp import DPConfigError, check_dp, dp_router_row, train_dp
from stages.train.loop import (
    Checkpointer,
    lm_losses,
    sample_batch,
    tokenize_corpus,
    tokenize_texts,
    train,
)


def train_expert(owner: str, corpus_train: Path, public_train: Path, anchor_dir: Path, public_embedding: Path,
                 expert: P.ExpertParams, train_params: P.TrainParams, out_dir: Path, log_path: Path,
                 checkpoint: Path, signing_key: Path, dp: P.DPParams | None = None,
                 high_quality: list[str] = ()) -> dict:
    """Train, then sign and publish, the owner's expert; with expert.curriculum.stage2_steps, Aurora-M's
    two stages (stages/train/curriculum.py): the owner's held-out text (`val.jsonl` beside the corpus)
    and the public one are scored after each, and the recipe not published is trained for comparison."""
    if dp is not None:
        check_dp(dp, owner)  # before any work: an invalid accounting is refused outright
        if world()[1] > 1:
            raise DPConfigError(f"owners.{owner}.dp: DP-SGD runs in one process (its per-document clipping and "
                                "noise are not split across processes); launch the stage without torchrun")
    if not signing_key.exists():
        raise FileNotFoundError(f"{signing_key}: no signing key for owner {owner!r}; "
                                f"create one with `consort owner init {owner}`")
    tokenizer = AutoTokenizer.from_pretrained(anchor_dir)
    anchor = AutoModelForCausalLM.from_pretrained(anchor_dir)
    anchor_hash = read_json(anchor_dir / ANCHOR_INFO)["anchor_hash"]
    identity = {"anchor_hash": anchor_hash, "tokenizer_hash": file_digest(anchor_dir / "tokenizer.json"),
                "signing_key": signing_key}
    r_pub = load_embedding(public_embedding)
    init_texts = [row["text"] for _, row in zip(range(expert.router_init_docs), read_jsonl(corpus_train))]
    if dp is not None:
        return _train_expert_dp(owner, corpus_train, public_train, anchor, tokenizer, identity, r_pub, init_texts,
                                expert, train_params, dp, out_dir, log_path)
    cur = expert.curriculum
    if cur.stage2_steps:
        # The subset is chosen and the anchor's held-out losses taken before the anchor is upcycled.
        held_out = HeldOut(tokenizer, corpus_train.with_name("val.jsonl"), public_train.with_name("val.jsonl"),
                           cur.eval_tokens, train_params.seq_len, train_params.precision)
        subset, selection = select_high_quality(owner, corpus_train, list(high_quality), cur.selection, anchor,
                                                tokenizer)
        curriculum = {"anchor": held_out.loss(anchor, "anchor"), "selection": selection}
    r_owner = router_row(anchor, tokenizer, init_texts, train_params.seq_len, expert.router_init)
    model = upcycle(anchor, r_pub, r_owner)
    del anchor
    tokens = tokenize_corpus(tokenizer, corpus_train)
    # Public rows in each batch give the router a contrast (see step_loss); the LM loss is taken on
    # the owner's rows only, so the expert spends its capacity on the owner's domain.
    t = train_params
    n_public = round(t.batch_size * expert.public_mix)
    # Only a slice of the public corpus is ever sampled: tokenize about four times the tokens the
    # public rows use (documents are ~doc_chars = 4,000 characters, roughly 1,000 tokens each).
    public_docs = max(50, 4 * n_public * t.steps * t.seq_len // 1000)
    public_tokens = tokenize_corpus(tokenizer, public_train, max_docs=public_docs) if n_public else None

    # Under torchrun each process takes its share of the owner rows and of the public rows.
    own_rows = local_rows(t.batch_size - n_public, f"owners.{owner}: the owner rows of expert.train.batch_size")
    public_rows = local_rows(n_public, "the public rows of expert.train.batch_size (expert.public_mix)")

    n_own = own_rows.stop - own_rows.start
    if n_own % t.grad_accumulation:
        raise ValueError(f"owners.{owner}: {n_own} owner rows per step do not split evenly into "
                         f"{t.grad_accumulation} micro-batches (train.grad_accumulation); choose a batch_size "
                         f"and public_mix whose owner rows divide by it")
    # The first rows of a batch are the owner's text, the rest public text; the labels travel with
    # the rows, so a micro-batch knows which of its rows are the owner's.
    is_owner = torch.arange(n_own + public_rows.stop - public_rows.start) < n_own

    def batches(own_tokens: np.ndarray, seed: int):
        def make_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            own = sample_batch(own_tokens, t.batch_size - n_public, t.seq_len, seed, step)[own_rows]
            if not n_public:
                return own, is_owner
            public = sample_batch(public_tokens, n_public, t.seq_len, seed + 1, step)[public_rows]
            return torch.cat([own, public]), is_owner
        return make_batch

    def step_loss(module, rows_and_labels):
        batch, is_owner = rows_and_labels
        logits = module(input_ids=batch[:, :-1]).logits
        ce, lm_z = lm_losses(logits[is_owner], batch[is_owner, 1:])
        router_logits = [b.last_router_logits.float() for b in blocks(module)]
        router_z = torch.stack([torch.logsumexp(r, -1).pow(2).mean() for r in router_logits]).mean()
        loss = ce + expert.lm_z_loss * lm_z + expert.router_z_loss * router_z
        numbers = {"loss": ce.item(), "router_z": router_z.item()}
        if n_public:
            # The router row as a domain classifier: owner text to the owner's expert, public text
            # to the public one. Merged with other owners' rows trained the same way, each expert
            # then fires on its own domain and all stay quiet on public text.
            target = is_owner.long().view(-1, 1).expand(-1, batch.size(1) - 1).reshape(-1)
            contrast = torch.stack([torch.nn.functional.cross_entropy(r.reshape(-1, 2), target)
                                    for r in router_logits]).mean()
            loss = loss + expert.router_contrast * contrast
            numbers["router_contrast"] = contrast.item()
        return loss, numbers

    data_digest = file_digest(corpus_train)
    fingerprint = f"expert|{owner}|{anchor_hash}|{data_digest}|{train_params.model_dump_json()}|{expert.model_dump_json()}"
    ckpt = Checkpointer(checkpoint, fingerprint)

    def train_stage(p: P.TrainParams, make_batch, stage_ckpt: Checkpointer, stage_log: Path, desc: str) -> dict:
        return train(model, step_loss, make_batch, p, stage_ckpt, stage_log, desc=desc,
                     lr_scale=lambda name: expert.router_lr_scale if ("routers" in name or "owner_bias" in name) else 1.0,
                     after_step=project_bias)

    summary = train_stage(train_params, batches(tokens, t.seed), ckpt, log_path, f"expert {owner}")
    extra = {}
    if cur.stage2_steps:
        curriculum["stage_1"] = held_out.loss(model, "stage_1") | {"steps": t.steps}
        # Both recipes go on from the same stage-1 weights for as many steps with the same schedule;
        # only the owner rows differ: the whole corpus (one stage) or the subset (two stages).
        stage2 = t.model_copy(update={"steps": cur.stage2_steps, "lr": cur.stage2_lr, "min_lr_ratio":
                                      cur.stage2_min_lr_ratio, "warmup_steps": cur.stage2_warmup_steps})
        own_rows_of = {"one_stage": tokens, "two_stage": tokenize_texts(tokenizer, [r["text"] for r in subset])}
        shipped = "two_stage" if cur.stages == 2 else "one_stage"
        recipes = [r for r in own_rows_of if r != shipped and cur.compare] + [shipped]  # the shipped one last
        stage_1 = {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}
        for recipe in recipes:
            with torch.no_grad():
                for n, q in model.named_parameters():
                    if n in stage_1:
                        q.copy_(stage_1[n])
            recipe_log = log_path.with_name(f"{log_path.stem}.{recipe}.jsonl")
            done = train_stage(stage2, batches(own_rows_of[recipe], t.seed + 7919),
                               Checkpointer(checkpoint.with_name(f"{checkpoint.name}.{recipe}"),
                                            f"{fingerprint}|{recipe}|{cur.model_dump_json()}|{list(high_quality)}"),
                               recipe_log, f"expert {owner} {recipe.replace('_', '-')}")
            log = []
            if is_main():  # the only process that writes the log; another's unlink would race its read
                log = [json.loads(line) for line in recipe_log.read_text().splitlines()]
                recipe_log.unlink()
            curriculum[recipe] = held_out.loss(model, recipe) | {"steps": t.steps + cur.stage2_steps,
                                                         "final_loss": done["final_loss"], "log": log}
        curriculum["shipped"] = shipped
        curriculum["compared"] = held_out.compared([(n, "anchor") for n in ("stage_1", *recipes)]
                                                   + ([("two_stage", "one_stage")] if len(recipes) == 2 else []))
        if is_main():  # the published curve runs on through the shipped recipe's steps
            with log_path.open("a") as fh:
                fh.writelines(json.dumps(row | {"step": row["step"] + t.steps, "stage": 2}) + "\n"
                              for row in curriculum[shipped]["log"])
        for k in ("steps", "tokens_seen", "train_seconds"):
            summary[k] += done[k]
        summary["final_loss"] = done["final_loss"]
        summary["curriculum"] = curriculum
        extra["curriculum"] = {"stages": cur.stages, "stage2_steps": cur.stage2_steps, "stage2_lr": cur.stage2_lr,
                               "selection": curriculum["selection"]}
    summary["corpus_tokens"] = int(len(tokens))
    summary["router_bias"] = [b.owner_bias.item() for b in blocks(model)]

    if is_main():
        publish(model, owner, identity, data_digest, expert, train_params, summary, out_dir, **extra,
                **takedown_of(corpus_train))
        ckpt.clear()
        for recipe in ("one_stage", "two_stage"):
            checkpoint.with_name(f"{checkpoint.name}.{recipe}").unlink(missing_ok=True)
    return summary


def takedown_of(corpus_train: Path) -> dict:
    """The corpus's erasure record (stage prepare_owner: counts and a digest of the ids), for the manifest,
    with the day the expert was retrained without them."""
    stats = corpus_train.parent / "stats.json"
    record = read_json(stats).get("takedown") if stats.exists() else None
    return {"takedown": record | {"applied": datetime.now(UTC).date().isoformat()}} if record else {}


def publish(model, owner: str, identity: dict, data_digest: str, expert: P.ExpertParams, train_params: P.TrainParams,
            summary: dict, out_dir: Path, **extra) -> None:
    """Write the signed expert package: the owner's FFN, router row and bias, and the manifest (no text, no path).

    `identity` holds the anchor and tokenizer hashes the expert was trained against and the
    owner's signing key.
    """
    manifest = {
        "schema_version": MANIFEST_VERSION,
        "owner": owner,
        "anchor_hash": identity["anchor_hash"],
        "tokenizer_hash": identity["tokenizer_hash"],
        "data_digest": data_digest,
        "router_init": expert.router_init,
        "public_mix": expert.public_mix,
        "router_contrast": expert.router_contrast,
        "architecture": {"num_layers": len(blocks(model)), "hidden_size": model.config.hidden_size,
                         "intermediate_size": model.config.intermediate_size},
        "training": train_params.model_dump(),
        "metrics": {k: summary[k] for k in ("final_loss", "tokens_per_s", "tokens_seen", "steps", "train_seconds")},
        **extra,
    }
    with atomic_dir(out_dir) as tmp:
        save_file(expert_tensors(model), tmp / WEIGHTS)
        write_json(tmp / MANIFEST, manifest)
        sign_package(tmp, identity["signing_key"], owner)


def _train_expert_dp(owner: str, corpus_train: Path, public_train: Path, anchor, tokenizer, identity: dict,
                     r_pub: torch.Tensor, init_texts: list[str], expert: P.ExpertParams, t: P.TrainParams,
                     dp: P.DPParams, out_dir: Path, log_path: Path) -> dict:
    """The DP variant (stages/train/dp.py): DP router-row mean, Poisson-sampled documents, DP-SGD.

    One stage only: a second would spend more of the owner's privacy budget, and choosing its subset
    by the anchor's score reads the documents outside the DP mechanism."""
    public_texts = [row["text"] for _, row in zip(range(expert.router_init_docs), read_jsonl(public_train))]
    r_owner, init = dp_router_row(anchor, tokenizer, init_texts, public_texts, t.seq_len, dp.init_noise_multiplier,
                                  torch.Generator().manual_seed(t.seed + 31))
    model = upcycle(anchor, r_pub, r_owner)
    del anchor
    for b in blocks(model):
        b.owner_bias.requires_grad_(False)  # a bare scalar has no per-document gradient: b stays 0
    eos = tokenizer.eos_token_id
    docs = [np.array([*ids, eos], dtype=np.int64) for ids in
            tokenizer([row["text"] for row in read_jsonl(corpus_train)], add_special_tokens=False)["input_ids"]]
    summary = train_dp(model, docs, t, dp, log_path, desc=f"expert {owner} (DP)", init_noise=dp.init_noise_multiplier,
                       lr_scale=lambda name: expert.router_lr_scale if "routers" in name else 1.0)
    summary["corpus_tokens"] = int(sum(len(d) for d in docs))
    summary["dp"]["router_init"] = init
    publish(model, owner, identity, file_digest(corpus_train), expert, t, summary, out_dir,
            dp=summary["dp"], **takedown_of(corpus_train))
    return summary


def main(argv: list[str] | None = None) -> None:
    start_stage()
    args, params = parse_expert_cli(__doc__, argv)
    summary = train_expert(args.owner, args.corpus, args.public_corpus, args.anchor, args.public_embedding, params.expert,
                           params.expert_train(args.owner), args.out, args.train_log, args.checkpoint, args.signing_key,
                           params.owners[args.owner].dp, params.owners[args.owner].high_quality)
    if not is_main():
        return finish()
    write_json(args.metrics, summary)
    finish()
    print(f"expert {args.owner}: loss {summary['final_loss']:.3f}, {summary['tokens_per_s']:,.0f} tokens/s"
          + (f", DP epsilon {summary['dp']['epsilon']:.2f} at delta {summary['dp']['delta']:g} "
             f"({summary['dp']['accountant']} accountant)" if "dp" in summary else ""))


if __name__ == "__main__":
    main()
