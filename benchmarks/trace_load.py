"""Trace services under load: one owner's service driven by concurrent clients, and the coordinator's
fan-out to every owner, over at least 10M indexed tokens.

    .venv/bin/python benchmarks/trace_load.py --workspace workspace [--clients 32] [--seconds 60]
        [--owners 5] [--min-tokens 10000000]

The corpus (benchmarks/trace.py: the workspace's training text topped up with the standard
library's `.py` files) is split into --owners shards, one infini-gram index and one trace service
process each, on 127.0.0.1. Outputs to trace are 256-token windows of the owners' held-out text.

1. One owner: --clients concurrent clients post for --seconds; requests/s, p50/p95/p99, errors
   (goal: 0) and the service's memory (its process and the engine's) before and after.
2. Every owner from the coordinator: `trace_everywhere` (the fan-out `consort trace` uses),
   one request after another; goal p95 < 250 ms.
Bounded: loopback only, every process it starts is stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.io import read_jsonl  # noqa: E402
from tracing.index import bow_token_ids, write_index  # noqa: E402


def _trace_benchmark():
    """benchmarks/trace.py, loaded by path (its module name would be the standard library's `trace`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trace_benchmark", Path(__file__).with_name("trace.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(index_dir: str, tokenizer_dir: str, state_dir: str, policy, settings, port: int) -> None:
    """One owner's service over `index_dir`, as tracing.service runs it (in its own process)."""
    import uvicorn

    from tracing.service import EngineProcess, OwnerService, create_app

    service = OwnerService(Path(index_dir).name, Path(index_dir), Path(tokenizer_dir), Path(state_dir), policy, settings)
    engine = EngineProcess(service)
    try:
        uvicorn.run(create_app(service, engine), host="127.0.0.1", port=port, log_level="error", limit_concurrency=64)
    finally:
        engine.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb(pid: int) -> float:
    """Resident memory of a process and its children (the service and its engine worker)."""
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def wait_up(entry: dict, deadline_s: float = 120) -> None:
    from tracing.coordinator import is_listening

    deadline = time.monotonic() + deadline_s
    while not is_listening(entry):
        if time.monotonic() > deadline:
            raise SystemExit(f"the service at {entry['url']} did not start within {deadline_s:.0f} s")
        time.sleep(0.2)


async def drive(url: str, token: str, outputs: list[str], clients: int, seconds: float) -> tuple[list[float], int, int]:
    """`clients` concurrent clients posting outputs for `seconds`: (latencies in ms, errors, requests)."""
    import httpx

    times: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds

    async def client(k: int, session: httpx.AsyncClient) -> None:
        nonlocal errors
        rng = random.Random(k)
        while time.monotonic() < stop:
            t = time.perf_counter()
            try:
                r = await session.post(f"{url}/trace", json={"output": rng.choice(outputs)},
                                       headers={"Authorization": f"Bearer {token}"})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            times.append((time.perf_counter() - t) * 1000)
            errors += not ok

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as session:
        await asyncio.gather(*(client(k, session) for k in range(clients)))
    return times, errors, len(times)


def pct(ms: list[float]) -> str:
    return "   ".join(f"p{q} {np.percentile(ms, q):7.1f} ms" for q in (50, 95, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path("workspace"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--owners", type=int, default=5)
    ap.add_argument("--min-tokens", type=int, default=10_000_000)
    ap.add_argument("--fanout-queries", type=int, default=100)
    ap.add_argument("--output-tokens", type=int, default=256)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from tracing.coordinator import trace_everywhere
    from tracing.service import OwnerService

    bench = _trace_benchmark()
    ws = args.workspace.resolve()
    tokenizer = AutoTokenizer.from_pretrained(ws / "models" / "tokenizer")
    base = bench.first_owner_service(ws)
    policy = base.policy.model_copy(update={"requests_per_minute": 10**7})
    rng = random.Random(0)
    held_out = [ids for f in sorted(ws.glob("owners/*/corpus/val.jsonl")) for r in read_jsonl(f)
                if len(ids := tokenizer(r["text"], add_special_tokens=False)["input_ids"]) > args.output_tokens + 1]
    outputs = []
    for _ in range(200):
        ids = rng.choice(held_out)
        start = rng.randrange(0, len(ids) - args.output_tokens)
        outputs.append(tokenizer.decode(ids[start:start + args.output_tokens]))

    ctx = multiprocessing.get_context("spawn")
    procs = []
    with tempfile.TemporaryDirectory(prefix="consort-load-") as tmp:
        docs = list(bench.corpus_documents(ws, args.min_tokens, tokenizer))
        shards = [docs[k::args.owners] for k in range(args.owners)]
        registry, total = {}, 0
        for k, shard in enumerate(shards):
            index_dir = Path(tmp) / f"owner{k}"
            stats = write_index(iter(shard), len(tokenizer), bow_token_ids(tokenizer), index_dir,
                                tokenizer.eos_token_id)
            total += stats.tokens
            port = free_port()
            state = Path(tmp) / f"state{k}"
            state.mkdir()
            # The tokens are made here, before the service would make its own.
            token = OwnerService(index_dir.name, index_dir, base.tokenizer_dir, state, policy,
                                 base.settings).client_tokens()["coordinator"]
            proc = ctx.Process(target=serve, args=(str(index_dir), str(base.tokenizer_dir), str(state), policy,
                                                   base.settings, port))
            proc.start()
            procs.append(proc)
            registry[f"owner{k}"] = {"url": f"http://127.0.0.1:{port}", "token": token}
        try:
            for entry in registry.values():
                wait_up(entry)
            print(f"{args.owners} owners' indexes, {total:,} tokens in all ({total // args.owners:,} each)")
            first = registry["owner0"]
            import httpx

            httpx.post(f"{first['url']}/trace", json={"output": outputs[0]}, timeout=120,
                       headers={"Authorization": f"Bearer {first['token']}"})  # starts the engine
            before = memory_mb(procs[0].pid)
            times, errors, n = asyncio.run(drive(first["url"], first["token"], outputs, args.clients, args.seconds))
            after = memory_mb(procs[0].pid)
            print(f"one owner, {args.clients} clients for {args.seconds:.0f} s: {n / args.seconds:.1f} requests/s, "
                  f"{pct(times)}, errors {errors} of {n} (goal 0)")
            print(f"  service memory (process and engine): {before:.0f} MB before, {after:.0f} MB after")
            for entry in registry.values():  # every engine started before the fan-out is timed
                httpx.post(f"{entry['url']}/trace", json={"output": outputs[0]}, timeout=120,
                           headers={"Authorization": f"Bearer {entry['token']}"})
            fan, failed = [], 0
            for out in outputs[:args.fanout_queries]:
                t = time.perf_counter()
                result = trace_everywhere(registry, "", out)
                fan.append((time.perf_counter() - t) * 1000)
                failed += sum(a["status"] != "ok" for a in result["owners"].values())
            print(f"coordinator fan-out to {args.owners} owners, {len(fan)} outputs of {args.output_tokens} tokens: "
                  f"{pct(fan)}, owner answers failed {failed} (goal p95 < 250 ms)")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()


if __name__ == "__main__":
    main()
