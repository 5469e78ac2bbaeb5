"""Expert training speed against dense anchor training, same width, batch and sequence length.

    .venv/bin/python benchmarks/expert_training.py [--hidden 384] [--steps 6] [--repeats 3]

A random-weight anchor of the default shape (4 layers, vocabulary 8192, batch 8 x 256): one
full training step of the dense anchor (every weight learns) against one step of an owner's
2-expert block (`stages.model.moe.upcycle`: attention, embeddings, norms, head and the public expert
frozen, both experts computed densely), measured alternately in one process, best of --repeats.
Goal (issue): the expert step at least as fast as the dense step (ratio >= 1.0).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.model.moe import upcycle  # noqa: E402
from stages.train.loop import lm_losses  # noqa: E402


def tokens_per_s(model, batch: torch.Tensor, steps: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    for i in range(steps + 1):
        if i == 1:  # the first step allocates optimizer state
            t = time.perf_counter()
        ce, _ = lm_losses(model(input_ids=batch[:, :-1]).logits, batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        ce.backward()
        opt.step()
    return steps * batch.shape[0] * (batch.shape[1] - 1) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    config = Olmo2Config(vocab_size=8192, hidden_size=args.hidden, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=1, bos_token_id=0, eos_token_id=0)
    anchor = Olmo2ForCausalLM(config)
    h = args.hidden
    expert = upcycle(anchor, torch.randn(h) / h ** 0.5, torch.randn(h) / h ** 0.5)
    batch = torch.randint(0, 8192, (8, 257))
    best = {"dense anchor": 0.0, "expert": 0.0}
    for _ in range(args.repeats):
        best["dense anchor"] = max(best["dense anchor"], tokens_per_s(anchor, batch, args.steps))
        best["expert"] = max(best["expert"], tokens_per_s(expert, batch, args.steps))
    print(f"hidden {h}, batch 8 x 256, {torch.get_num_threads()} threads")
    print(f"dense anchor training: {best['dense anchor']:7.0f} tokens/s")
    print(f"expert training:       {best['expert']:7.0f} tokens/s   ratio {best['expert'] / best['dense anchor']:.2f}x "
          "(goal >= 1.0x)")
    print(f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
