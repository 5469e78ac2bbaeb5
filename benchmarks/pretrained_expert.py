"""Expert training on the pretrained anchor (SmolLM2-135M by default): bf16 against fp32, and the
share of the bf16 GEMM peak the step reaches, all measured side by side in one process.

    .venv/bin/python benchmarks/pretrained_expert.py [--anchor workspace/models/anchor] [--steps 3]
        [--batch 4] [--seq 256] [--device cpu|cuda]

The anchor folder is the one the pipeline wrote (models/anchor of a workspace after `make run`).
FLOPs counted are the ones the step really does: the forward through every matmul (the dense
layers, both experts of each block, the router rows and the head) and attention; the input
gradients through all of them; weight gradients for the trained tensors only (the owner's
expert and router row). Goals (issue): bf16 >= 1.5x fp32 tokens/s; bf16 >= 70 % of the peak.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.model.moe import upcycle  # noqa: E402
from stages.train.loop import lm_losses  # noqa: E402


def step_flops(model, tokens: int, seq: int) -> float:
    c = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attention = 2 * seq * c.hidden_size * c.num_hidden_layers  # q.k and attention.v over the causal half, per token
    forward = 2 * linear * tokens + attention * tokens
    return forward + forward + 2 * trained * tokens  # forward, input gradients, trained weights' gradients


def tokens_per_s(model, batch: torch.Tensor, steps: int, precision: str, device: str) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    for i in range(steps + 1):
        if i == 1:  # the first step allocates optimizer state
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            ce, _ = lm_losses(model(input_ids=batch[:, :-1]).logits, batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        ce.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch.shape[0] * (batch.shape[1] - 1) / (time.perf_counter() - t)


def gemm_peak(device: str, n: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchor", type=Path, default=Path("workspace/models/anchor"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if not (args.anchor / "config.json").exists():
        raise SystemExit(f"{args.anchor}: no anchor there; run `make run` first or pass --anchor DIR")
    from transformers import AutoModelForCausalLM

    anchor = AutoModelForCausalLM.from_pretrained(args.anchor)
    h = anchor.config.hidden_size
    expert = upcycle(anchor, torch.randn(h) / h ** 0.5, torch.randn(h) / h ** 0.5).to(args.device)
    del anchor
    batch = torch.randint(0, expert.config.vocab_size, (args.batch, args.seq + 1), device=args.device)
    best = {"fp32": 0.0, "bf16": 0.0}
    peak = 0.0
    for _ in range(args.repeats):  # alternated, so both see the same machine
        for precision in best:
            best[precision] = max(best[precision], tokens_per_s(expert, batch, args.steps, precision, args.device))
        peak = max(peak, gemm_peak(args.device))
    flops_per_token = step_flops(expert, args.batch * args.seq, args.seq) / (args.batch * args.seq)
    achieved = best["bf16"] * flops_per_token
    print(f"{args.anchor} on {args.device} ({torch.get_num_threads()} threads), batch {args.batch} x {args.seq}")
    print(f"expert step, fp32: {best['fp32']:7.0f} tokens/s")
    print(f"expert step, bf16: {best['bf16']:7.0f} tokens/s   ratio {best['bf16'] / best['fp32']:.2f}x (goal >= 1.5x)")
    print(f"step FLOPs per token {flops_per_token / 1e9:.2f} GFLOP: bf16 step {achieved / 1e9:.0f} GFLOP/s, "
          f"bf16 GEMM peak {peak / 1e9:.0f} GFLOP/s: {achieved / peak * 100:.0f} % (goal >= 70 %)")


if __name__ == "__main__":
    main()
