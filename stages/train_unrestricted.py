"""Stage (reference only): the "unrestricted" model, trained on all owners' data in one place.

This is what FlexOlmo is measured against: the same FlexOlmo architecture (public expert plus
one expert per owner, same router initialisation, same top-k), but every expert and router row
learns jointly from a mix of all owners' text, with the tokens of all expert trainings together
(the sum of the owners' steps at the expert batch, the same public share in each batch). Like
the experts, attention, embeddings, norms and head stay the anchor's, so the gap it measures is
the data restriction alone.

It needs the raw data of every owner in one place, which the product never does: it is off by
default (`unrestricted.enabled`; the study preset turns it on), writes only a stub when off, and
nothing else in the pipeline is built from it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stages import params as P
from stages.artifacts import ANCHOR_INFO, MERGED_INFO, REFERENCE_INFO
from stages.io import add_upcycling_arguments, atomic_dir, file_digest, read_json, read_jsonl, write_json
from stages.runtime import start_stage

# torch, transformers and the stage helpers that need them are imported where they are used: off
# (the default), the stage only writes its stub and should not spend seconds importing them.



def joint_train_params(params: P.Params) -> P.TrainParams:
    """expert.train with as many steps as all owners' expert trainings together (stage 2's included),
    times unrestricted.token_fraction."""
    stage2 = params.expert.curriculum.stage2_steps  # either recipe trains them (stages 1 on the stage-1 mix)
    total = sum(params.expert_train(o).steps + stage2 for o in params.owners)
    steps = max(1, round(total * params.unrestricted.token_fraction))
    return params.expert.train.model_copy(update={"steps": steps})


def upcycle_all(anchor, rows: list, top_k: int):
    """The anchor's MoE model whose every expert is a copy of the anchor's FFN, router rows as given."""
    import torch

    from stages.model.moe import assemble, moe_config, moe_extra_state, moe_model, shared_state

    n = len(rows)
    config = moe_config(anchor.config, num_experts=n, top_k=min(top_k, n))
    state = shared_state(anchor.state_dict()) | moe_extra_state(config)
    for i, layer in enumerate(anchor.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{i}.mlp."
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
        state[prefix + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(n, 1, 1)
        state[prefix + "experts.down_proj"] = mlp.down_proj.weight.detach().unsqueeze(0).repeat(n, 1, 1)
        state[prefix + "gate.weight"] = torch.stack([r.view(-1) for r in rows])
    model = assemble(lambda: moe_model(config), state, anchor).train()
    for name, q in model.named_parameters():
        # Experts and router rows learn, as in expert training (Qwen2Moe's empty shared expert does not).
        q.requires_grad_(".mlp." in name and ".shared_expert" not in name)
    return model


def train_unrestricted(owner_corpora: dict[str, Path], public_train: Path, anchor_dir: Path, public_embedding: Path,
                       params: P.Params, out_dir: Path, log_path: Path, checkpoint: Path) -> dict:
    if not params.unrestricted.enabled:
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / REFERENCE_INFO, {"enabled": False})
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")  # a declared output, like the trained run's log
        return {"enabled": False}
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.model.router_rows import load_embedding, router_row
    from stages.train.loop import Checkpointer, lm_losses, sample_batch, tokenize_corpus, train

    expert, t = params.expert, joint_train_params(params)
    owners = list(owner_corpora)
    tokenizer = AutoTokenizer.from_pretrained(anchor_dir)
    anchor = AutoModelForCausalLM.from_pretrained(anchor_dir)
    anchor_hash = read_json(anchor_dir / ANCHOR_INFO)["anchor_hash"]
    rows = [load_embedding(public_embedding)]
    for o in owners:  # each owner's row starts where that owner's expert training starts it
        texts = [row["text"] for _, row in zip(range(expert.router_init_docs), read_jsonl(owner_corpora[o]))]
        rows.append(router_row(anchor, tokenizer, texts, t.seq_len, expert.router_init))
    top_k = params.merge.top_k or len(rows)
    model = upcycle_all(anchor, rows, top_k)
    del anchor
    corpora = [tokenize_corpus(tokenizer, owner_corpora[o]) for o in owners]
    # Each owner's share of the batch rows is its share of the experts' training steps.
    share = np.array([params.expert_train(o).steps for o in owners], dtype=float)
    share /= share.sum()
    n_public = round(t.batch_size * expert.public_mix)
    public_docs = max(50, 4 * n_public * t.steps * t.seq_len // 1000)
    public_tokens = tokenize_corpus(tokenizer, public_train, max_docs=public_docs) if n_public else None

    def make_batch(step: int) -> torch.Tensor:
        picks = np.random.default_rng([t.seed, step, 1]).choice(len(owners), size=t.batch_size - n_public, p=share)
        parts = [sample_batch(corpora[i], int((picks == i).sum()), t.seq_len, t.seed + 2 + i, step)
                 for i in range(len(owners)) if (picks == i).any()]
        if n_public:
            parts.append(sample_batch(public_tokens, n_public, t.seq_len, t.seed + 1, step))
        return torch.cat(parts)

    def step_loss(module, batch):
        out = module(input_ids=batch[:, :-1], output_router_logits=True)
        ce, lm_z = lm_losses(out.logits, batch[:, 1:])
        router_z = torch.stack([torch.logsumexp(r.float(), -1).pow(2).mean() for r in out.router_logits]).mean()
        loss = ce + expert.lm_z_loss * lm_z + expert.router_z_loss * router_z
        return loss, {"loss": ce.item(), "router_z": router_z.item()}

    digests = {o: file_digest(owner_corpora[o]) for o in owners}
    fingerprint = f"unrestricted|{anchor_hash}|{digests}|{t.model_dump_json()}|{expert.model_dump_json()}|{top_k}"
    ckpt = Checkpointer(checkpoint, fingerprint)
    summary = train(model, step_loss, make_batch, t, ckpt, log_path, desc="unrestricted reference",
                    lr_scale=lambda name: expert.router_lr_scale if ".mlp.gate." in name else 1.0)
    summary["enabled"] = True
    info = {"enabled": True, "anchor_hash": anchor_hash, "top_k": model.config.num_experts_per_tok,
            "experts": [{"index": 0, "owner": "public"}] + [
                {"index": i, "owner": o, "data_digest": digests[o]} for i, o in enumerate(owners, start=1)],
            "training": t.model_dump(), "metrics": {k: summary[k] for k in ("final_loss", "tokens_per_s", "tokens_seen")}}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / REFERENCE_INFO, info)
        write_json(tmp / MERGED_INFO, info)  # so the model loads and slices like the merged one
    ckpt.clear()
    return summary


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--owners-root", type=Path, required=True, help="folder of <owner>/corpus/train.jsonl")
    add_upcycling_arguments(ap)
    args = ap.parse_args(argv)
    params = P.load(args.params)
    corpora = {o: args.owners_root / o / "corpus" / "train.jsonl" for o in params.owners}
    missing = [str(p) for p in corpora.values() if not p.exists()] if params.unrestricted.enabled else []
    if missing:
        raise SystemExit(f"unrestricted reference: owner corpora missing: {', '.join(missing)}; run prepare_owner first")
    summary = train_unrestricted(corpora, args.public_corpus, args.anchor, args.public_embedding, params, args.out,
                                 args.train_log, args.checkpoint)
    write_json(args.metrics, summary)
    if summary["enabled"]:
        print(f"unrestricted reference: loss {summary['final_loss']:.3f}, {summary['tokens_per_s']:,.0f} tokens/s")
    else:
        print("unrestricted reference: off (unrestricted.enabled is false)")


if __name__ == "__main__":
    main()
