"""Tracing speed: index build tokens/s on a corpus of at least 10M tokens (100M for issue 34), its disk and
peak memory, and trace latency for 256-token outputs.

    .venv/bin/python benchmarks/trace.py --workspace workspace [--min-tokens 10000000] [--queries 200]

The corpus is every owner's and the public training text of a workspace (after `make run`), topped
up with the `.py` files of the standard library, then of the installed packages, until it holds
--min-tokens tokens (as int32 arrays: 100M tokens in Python lists would take ~4 GB). Outputs to
trace are 256-token windows of the owners' held-out text (they share spans with the corpus, as model
outputs do). Latency is measured twice: the attribution call inside the owner's process, and a full
`POST /trace` to the owner's service over 127.0.0.1. Goals: p95 under 100 ms at 10M tokens, under
150 ms over HTTP at 100M (issue 34); build at least 1M tokens/s at 10M, 2M at 100M.
"""
from __future__ import annotations

import argparse
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.io import read_jsonl  # noqa: E402
from tracing.attribution import attribute, delimiter_ids  # noqa: E402
from tracing.index import bow_token_ids, open_engine, write_index  # noqa: E402


def corpus_documents(ws: Path, min_tokens: int, tokenizer):
    """(id, token ids) of the workspace's training text, then stdlib files, until min_tokens."""
    total = 0
    files = sorted(ws.glob("owners/*/corpus/train.jsonl")) + [ws / "public" / "corpus" / "train.jsonl"]
    for f in files:
        for row in read_jsonl(f):
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
            total += len(ids)
            yield row["id"], np.asarray(ids, dtype=np.int32)
    # Then distinct text from packages: the standard library's sources, then the installed packages'
    # (about 390 MB of .py in this venv): a corpus repeated is not what an owner indexes, and made
    # infini-gram's own suffix sort crawl (2026-12-07: 100M tokens of an 8x repeat still merging at 8 min).
    for kind in ("stdlib", "purelib"):
        for path in sorted(Path(sysconfig.get_paths()[kind]).rglob("*.py")):
            if total >= min_tokens:
                return
            ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
            total += len(ids)
            yield f"{kind}:{path.relative_to(sysconfig.get_paths()[kind])}", np.asarray(ids, dtype=np.int32)
    if total < min_tokens:
        raise SystemExit(f"only {total:,} tokens available, fewer than --min-tokens {min_tokens:,}")


def peak_rss_gib() -> float:
    """Peak resident memory so far of this process, GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def percentiles(ms: list[float]) -> str:
    return f"p50 {np.percentile(ms, 50):6.1f} ms   p95 {np.percentile(ms, 95):6.1f} ms   max {max(ms):6.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path("workspace"))
    ap.add_argument("--min-tokens", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--output-tokens", type=int, default=256)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    ws = args.workspace.resolve()
    tokenizer = AutoTokenizer.from_pretrained(ws / "models" / "tokenizer")
    with tempfile.TemporaryDirectory(prefix="consort-bench-") as tmp:
        index_dir = Path(tmp) / "idx"
        t0 = time.perf_counter()
        docs = list(corpus_documents(ws, args.min_tokens, tokenizer))
        t_tok = time.perf_counter() - t0
        rss_before = peak_rss_gib()
        stats = write_index(iter(docs), len(tokenizer), bow_token_ids(tokenizer), index_dir, tokenizer.eos_token_id)
        build = stats.seconds_write + stats.seconds_sort
        disk = sum(f.stat().st_size for f in index_dir.rglob("*") if f.is_file())
        print(f"corpus: {stats.documents:,} documents, {stats.tokens:,} tokens (tokenizing took {t_tok:.1f} s)")
        print(f"index build: {build:.1f} s = {stats.tokens / build:,.0f} tokens/s "
              f"(write {stats.seconds_write:.1f} s, suffix sort {stats.seconds_sort:.1f} s)   goal >= 1,000,000 "
              f"tokens/s at 10M, 2,000,000 at 100M")
        print(f"index on disk: {disk / 2**30:.2f} GiB ({disk / stats.tokens:.1f} bytes per token); peak RSS "
              f"{peak_rss_gib():.2f} GiB ({rss_before:.2f} GiB before the build, the corpus held as int32; the "
              f"suffix sort runs in this process)")

        rng = random.Random(0)
        held_out = [tokenizer(r["text"], add_special_tokens=False)["input_ids"]
                    for f in sorted(ws.glob("owners/*/corpus/val.jsonl")) for r in read_jsonl(f)]
        held_out = [ids for ids in held_out if len(ids) > args.output_tokens + 1]
        outputs = []
        for _ in range(args.queries):
            ids = rng.choice(held_out)
            start = rng.randrange(0, len(ids) - args.output_tokens)
            outputs.append(tokenizer.decode(ids[start:start + args.output_tokens]))
        engine = open_engine(index_dir)
        delims = delimiter_ids(tokenizer)
        # The first owner's settings, as its service uses them (params.yaml's trace and its policy).
        settings = first_owner_service(ws).settings
        attribute(engine, tokenizer, "", outputs[0], settings, delims)  # warm the page cache
        in_process, spans = [], 0
        for out in outputs:
            t = time.perf_counter()
            spans += len(attribute(engine, tokenizer, "", out, settings, delims))
            in_process.append((time.perf_counter() - t) * 1000)
        print(f"trace, in the owner's process ({args.queries} outputs of {args.output_tokens} tokens, "
              f"{spans / len(outputs):.1f} spans each): {percentiles(in_process)}   goal p95 < 100 ms")
        over_http = http_latency(index_dir, ws, outputs)
        print(f"trace over HTTP (POST /trace to the owner's service on 127.0.0.1): {percentiles(over_http)}")
        print(f"ratio p50 HTTP / in-process: {np.percentile(over_http, 50) / np.percentile(in_process, 50):.2f}x")


def first_owner_service(ws: Path):
    from stages import params as P
    from tracing.service import OwnerService

    return OwnerService.from_workspace(ws, next(iter(P.load(ws / "params.yaml").owners)))


def http_latency(index_dir: Path, ws: Path, outputs: list[str]) -> list[float]:
    import threading

    import httpx
    import uvicorn

    from tracing.service import OwnerService, create_app

    base = first_owner_service(ws)
    with tempfile.TemporaryDirectory(prefix="consort-bench-state-") as state:
        service = OwnerService("bench", index_dir, base.tokenizer_dir, Path(state),
                               base.policy.model_copy(update={"requests_per_minute": 10**6}), base.settings)
        server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        headers = {"Authorization": f"Bearer {service.client_tokens()['coordinator']}"}
        times = []
        with httpx.Client(timeout=60) as client:
            client.post(f"http://127.0.0.1:{port}/trace", json={"output": outputs[0]}, headers=headers)  # starts the engine
            for out in outputs:
                t = time.perf_counter()
                r = client.post(f"http://127.0.0.1:{port}/trace", json={"output": out}, headers=headers)
                times.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text
        server.should_exit = True
        thread.join(timeout=10)
        engine = server.config.app.state.engine["engine"]
        if engine:
            engine.close()
    return times


if __name__ == "__main__":
    main()
