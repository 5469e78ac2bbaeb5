"""Past one machine's memory (issue 34): the streamed merge and an owner's expert step at real shapes.

    .venv/bin/python benchmarks/scale.py --root /tmp/bench-scale [--shape tinyllama] [--experts 4]
    .venv/bin/python benchmarks/scale.py --root /tmp/bench-scale --expert-step [--steps 2]

Random weights of real shapes, no download: an anchor of the shape (TinyLlama-1.1B: hidden 2048,
FFN 5632, 22 layers; smollm2: SmolLM2-135M) and `--experts` signed expert packages are written
under --root once, tensor by tensor. Each merge then runs in a process of its own, which reports
its wall seconds and its peak RSS:

- streamed: stage merge_experts as it is (tensor by tensor, 2 GiB shards);
- in memory: the merge as it was until 2026-12-07 (the anchor model, every package and the merged
  state at once, then `save_pretrained`), for the ratio the issue asks at the SmolLM2 size
  (--in-memory; at the 1.1B shape it needs about three times the checkpoint).

It prints the checkpoint's size beside them, and the same arithmetic for a 7B anchor with 7 owners'
experts, labelled as a projection. Needs about 2.5x the merged checkpoint's size in free disk.

--expert-step trains an owner's expert on the anchor of the shape (fp32 master weights, activation
checkpointing, a batch of 8 x 256 tokens in micro-batches of 1) for --steps steps in a process of
its own: peak RSS, tokens/s, and the achieved GFLOP/s beside the 2-thread GEMM peak measured in the
same process (matmul of 4096 x 4096, fp32 and bf16).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from stages.artifacts import ANCHOR_INFO, MANIFEST, MANIFEST_VERSION, WEIGHTS  # noqa: E402
from stages.io import file_digest, write_json  # noqa: E402
from stages.model.tensor_files import ShardWriter  # noqa: E402

SHAPES = {  # (hidden, FFN, layers, heads, KV heads, vocab)
    "tinyllama": (2048, 5632, 22, 32, 4, 32000),
    "smollm2": (576, 1536, 30, 9, 3, 49152),
    "olmo2-7b": (4096, 11008, 32, 32, 32, 100352),
    "tiny": (64, 128, 2, 4, 2, 300),  # a check of this script in seconds
}


def fixtures(root: Path, shape: str, experts: int) -> tuple[Path, dict[str, Path]]:
    """The anchor folder and the signed packages, written once per shape and count."""
    from transformers import LlamaConfig

    from stages import params as P
    from stages.model.router_rows import save_embedding
    from stages.package import create_owner_key, enrol_owner_key, sign_package
    from stages.train_tokenizer import train_tokenizer

    hidden, ffn, layers, heads, kv, vocab = SHAPES[shape]
    base = root / f"{shape}-{experts}"
    anchor, packages = base / "anchor", {f"owner{k}": base / "published" / f"owner{k}" for k in range(experts)}
    if (base / "done").exists():
        return anchor, packages
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    anchor.mkdir(parents=True, exist_ok=True)
    corpus = base / "text.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i} of the benchmark text"}) + "\n" for i in range(200)))
    tokenizer = train_tokenizer(corpus, P.TokenizerParams(vocab_size=300, max_chars=10**6), base / "tok")
    tokenizer.save_pretrained(anchor)
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
                architectures=["LlamaForCausalLM"]).save_pretrained(anchor)
    out, head = ShardWriter(anchor), hidden // heads
    out.add("model.embed_tokens.weight", rand(vocab, hidden))
    out.add("lm_head.weight", rand(vocab, hidden))
    out.add("model.norm.weight", torch.ones(hidden))
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape_ in (("self_attn.q_proj", (heads * head, hidden)), ("self_attn.k_proj", (kv * head, hidden)),
                             ("self_attn.v_proj", (kv * head, hidden)), ("self_attn.o_proj", (hidden, heads * head)),
                             ("mlp.gate_proj", (ffn, hidden)), ("mlp.up_proj", (ffn, hidden)),
                             ("mlp.down_proj", (hidden, ffn))):
            out.add(p + name + ".weight", rand(*shape_))
        out.add(p + "input_layernorm.weight", torch.ones(hidden))
        out.add(p + "post_attention_layernorm.weight", torch.ones(hidden))
    out.close()
    write_json(anchor / ANCHOR_INFO, {"anchor_hash": f"benchmark-{shape}"})
    save_embedding(rand(hidden), base / "public_embedding")
    from safetensors.torch import save_file

    for owner, package in packages.items():
        package.mkdir(parents=True, exist_ok=True)
        save_file({f"layers.{i}.{n}": t for i in range(layers) for n, t in (
            ("gate_up_proj", rand(2 * ffn, hidden)), ("down_proj", rand(hidden, ffn)), ("router", rand(hidden)),
            ("bias", torch.tensor(0.0)))}, package / WEIGHTS)
        write_json(package / MANIFEST, {"schema_version": MANIFEST_VERSION, "owner": owner, "data_digest": "bench",
                                        "anchor_hash": f"benchmark-{shape}",
                                        "tokenizer_hash": file_digest(anchor / "tokenizer.json")})
        enrol_owner_key(create_owner_key(base / "keys" / owner), base / "keyring", owner)
        sign_package(package, base / "keys" / owner / "signing_key.pem", owner)
    (base / "done").touch()
    return anchor, packages


def in_memory_merge(anchor_dir: Path, packages: dict[str, Path], out: Path) -> None:
    """The merge as it was until 2026-12-07: everything in memory, then save_pretrained."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from stages.model.moe import assemble, moe_config, moe_extra_state, moe_model, shared_state
    from stages.model.router_rows import load_embedding

    anchor = AutoModelForCausalLM.from_pretrained(anchor_dir)
    state = anchor.state_dict()
    tensors = [load_file(p / WEIGHTS) for p in packages.values()]
    r_pub = load_embedding(anchor_dir.parent / "public_embedding")
    config = moe_config(anchor.config, num_experts=1 + len(packages), top_k=1 + len(packages))
    merged = shared_state(state) | moe_extra_state(config)
    for i in range(anchor.config.num_hidden_layers):
        d, lay = f"model.layers.{i}.mlp.", f"layers.{i}."
        public = torch.cat([state[d + "gate_proj.weight"], state[d + "up_proj.weight"]])
        merged[d + "experts.gate_up_proj"] = torch.stack([public] + [t[lay + "gate_up_proj"] for t in tensors])
        merged[d + "experts.down_proj"] = torch.stack(
            [state[d + "down_proj.weight"]] + [t[lay + "down_proj"] for t in tensors])
        merged[d + "gate.weight"] = torch.stack([r_pub.view(-1)] + [t[lay + "router"] for t in tensors])
    assemble(lambda: moe_model(config), merged, anchor).save_pretrained(out)


def child(kind: str, anchor_dir: Path, packages: dict[str, Path], out: Path) -> None:
    import shutil

    from stages import params as P
    from stages.merge_experts import merge_experts

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    if kind == "streamed":
        merge_experts(anchor_dir, anchor_dir.parent / "public_embedding", packages, P.MergeParams(), out,
                      anchor_dir.parent / "keyring")
    else:
        in_memory_merge(anchor_dir, packages, out)
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "bytes": size}))


def gemm_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def expert_step(anchor_dir: Path, steps: int) -> None:
    """One owner's expert trained on the anchor (the stage's recipe on random tokens); prints JSON."""
    from transformers import AutoModelForCausalLM

    from stages import params as P
    from stages.device import native_bf16
    from stages.model.moe import upcycle
    from stages.train.loop import lm_losses, sample_batch, train

    anchor = AutoModelForCausalLM.from_pretrained(anchor_dir)
    h = anchor.config.hidden_size
    model = upcycle(anchor, torch.randn(h) * 0.02, torch.randn(h) * 0.02)
    del anchor
    tokens = torch.randint(3, anchor_dir_vocab(anchor_dir), (200_000,)).numpy()
    p = P.TrainParams(steps=steps, batch_size=8, seq_len=256, lr=1e-4, min_lr_ratio=0.1, warmup_steps=1,
                      weight_decay=0.1, grad_clip=1.0, log_every=1,
                      checkpoint_every=10**6, activation_checkpointing=True, grad_accumulation=8, precision="fp32")

    def step_loss(module, rows):
        ce, _ = lm_losses(module(input_ids=rows[:, :-1]).logits, rows[:, 1:])
        return ce, {"loss": ce.item()}

    log = anchor_dir.parent / "expert_step_log.jsonl"
    summary = train(model, step_loss, lambda step: sample_batch(tokens, 8, 256, 0, step), p, None, log, "expert step")
    active = sum(t.numel() for n, t in model.named_parameters() if ".mlp." not in n or ".experts.1." in n
                 or ".experts.0." in n)
    trained = sum(t.numel() for t in model.parameters() if t.requires_grad)
    # Forward 2 flops per weight and token, backward 2 for the activations' gradients, 2 more where
    # the weight is trained; checkpointing runs the forward once more.
    flops_per_token = 2 * active + 2 * active + 2 * trained + 2 * active
    print(json.dumps({"tokens_per_s": summary["tokens_per_s"], "gflops": summary["tokens_per_s"] * flops_per_token / 1e9,
                      "peak_fp32": gemm_peak(torch.float32),
                      # emulated bf16 (no AVX-512 BF16 or AMX) runs 4-50x slower than fp32: not measured there
                      "peak_bf16": gemm_peak(torch.bfloat16) if native_bf16() else None,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "trained_params": trained, "active_params": active}))


def anchor_dir_vocab(anchor_dir: Path) -> int:
    return json.loads((anchor_dir / "config.json").read_text())["vocab_size"]


def measured(kind: str, anchor_dir: Path, packages: dict[str, Path], out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--anchor", str(anchor_dir), "--out", str(out),
                           *[f"{o}={p}" for o, p in packages.items()]], capture_output=True, text=True, cwd=PROJECT)
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def projection(shape: str, experts: int, shard_bytes: float = 2 * 1024**3) -> str:
    hidden, ffn, layers, heads, kv, vocab = SHAPES[shape]
    shared = 2 * vocab * hidden + layers * (2 * hidden * hidden + 2 * hidden * hidden * kv // heads)
    expert = layers * 3 * hidden * ffn
    expert_layer_bytes = 4 * 3 * hidden * ffn
    total = 4 * (shared + (1 + experts) * expert)
    return (f"projection, {shape} with {experts} owners' experts (fp32): checkpoint {total / 1e9:.0f} GB; "
            f"in memory ~{3 * total / 1e9:.0f} GB; streamed ~{(shard_bytes + 2 * expert_layer_bytes) / 1e9:.1f} GB "
            f"plus the interpreter (a 2 GiB shard being filled, one expert's FFN of one layer read and copied)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path)
    ap.add_argument("--shape", choices=SHAPES, default="tinyllama")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--in-memory", action="store_true", help="also the in-memory merge (needs ~3x the checkpoint)")
    ap.add_argument("--expert-step", action="store_true", help="an owner's expert step on the anchor of the shape")
    ap.add_argument("--steps", type=int, default=2, help="--expert-step: optimizer steps (the first is not timed)")
    ap.add_argument("--child", choices=["streamed", "in_memory", "expert_step"], help=argparse.SUPPRESS)
    ap.add_argument("--anchor", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("packages", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "expert_step":
        return expert_step(args.anchor, args.steps)
    if args.child:
        return child(args.child, args.anchor, {p.split("=")[0]: Path(p.split("=", 1)[1]) for p in args.packages},
                     args.out)
    if not args.root:
        ap.error("--root is required")
    # The expert step needs the anchor only: no packages (at the 1.1B shape they are 13 GB to write).
    anchor_dir, packages = fixtures(args.root.resolve(), args.shape, 0 if args.expert_step else args.experts)
    if args.expert_step:
        proc = subprocess.run([sys.executable, __file__, "--child", "expert_step", "--anchor", str(anchor_dir),
                               "--steps", str(args.steps)], capture_output=True, text=True, cwd=PROJECT)
        if proc.returncode:
            raise SystemExit(f"expert step failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        bf16 = f"{r['peak_bf16']:.0f}" if r["peak_bf16"] else "not native here"
        print(f"{args.shape} expert step (fp32, activation checkpointing, 8 x 256 tokens in 8 micro-batches): "
              f"{r['tokens_per_s']:.1f} tokens/s, {r['gflops']:.0f} GFLOP/s = {r['gflops'] / r['peak_fp32']:.0%} of the "
              f"fp32 GEMM peak measured beside it ({r['peak_fp32']:.0f}; bf16 {bf16}), "
              f"peak RSS {r['peak_rss'] / 1e9:.1f} GB; {r['trained_params'] / 1e9:.2f}B trained of "
              f"{r['active_params'] / 1e9:.2f}B active parameters")
        return None
    kinds = ["streamed", "in_memory"] if args.in_memory else ["streamed"]
    results = {kind: measured(kind, anchor_dir, packages, anchor_dir.parent / f"merged-{kind}") for kind in kinds}
    for kind, r in results.items():
        print(f"{args.shape} + {args.experts} experts, {kind}: {r['seconds']:.1f} s, peak RSS "
              f"{r['peak_rss'] / 1e9:.2f} GB, checkpoint {r['bytes'] / 1e9:.2f} GB")
    if len(results) == 2:
        print(f"streamed / in memory: {results['streamed']['seconds'] / results['in_memory']['seconds']:.2f}x time, "
              f"{results['streamed']['peak_rss'] / results['in_memory']['peak_rss']:.2f}x peak RSS")
    print(projection("olmo2-7b", 7))


if __name__ == "__main__":
    main()
