"""Pipeline time per stage, no-op re-run time (with and without a Prefect server already running), peak memory.

    .venv/bin/python benchmarks/pipeline.py --workspace /tmp/bench-ws [--preset smoke]

Runs `consort run` on the workspace (a full run if it is new), then again with nothing changed,
first with Prefect's ephemeral server (started by the run itself), then against a Prefect server
started beforehand (PREFECT_API_URL), as a user with `prefect server start` running would. The
no-op runs are measured back to back in this one process. Goal (issue): a no-op re-run under 10 s
when a server is already running.

    .venv/bin/python benchmarks/pipeline.py --workspace /tmp/bench-ws --stage-server

instead runs the preset twice from nothing, side by side in this process: stages forked from the stage
server (flows/stage_server.py), then each stage in an interpreter of its own (CONSORT_STAGE_SERVER=off),
and prints both wall times and their ratio. Goal: the smoke run at least 1.5x faster with the server.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROJECT = Path(__file__).resolve().parents[1]


def consort_run(ws: Path, preset: str, env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", preset, "--workspace", str(ws)],
                          cwd=PROJECT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"consort run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t, proc.stdout


def compare_stage_server(root: Path, preset: str, env: dict) -> None:
    seconds = {}
    for label, setting in (("forked from the stage server", "on"), ("an interpreter per stage", "off")):
        ws = root / f"stage-server-{setting}"
        if ws.exists():
            raise SystemExit(f"{ws} exists: give --workspace a folder without it (both runs start from nothing)")
        seconds[label], _ = consort_run(ws, preset, dict(env, CONSORT_STAGE_SERVER=setting))
        print(f"{preset} run, stages {label}: {seconds[label]:.1f} s wall", flush=True)
    on, off = seconds.values()
    print(f"ratio: {off / on:.2f}x faster with the stage server   goal >= 1.5x")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--stage-server", action="store_true", help="full runs with and without the stage server")
    args = ap.parse_args()
    ws = args.workspace.resolve()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.stage_server:
        compare_stage_server(ws, args.preset, env)
        return
    first, out = consort_run(ws, args.preset, env)
    print(f"first run: {first:.1f} s wall; stages:")
    for line in out.splitlines():
        if re.match(r"\s+(ran|cached)\s", line):
            print("  " + line.strip())
    peak_first = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    noop, out = consort_run(ws, args.preset, env)
    assert "(0 of " in out, out[-2000:]
    print(f"no-op re-run, ephemeral Prefect server: {noop:.1f} s wall")

    port = free_port()
    server_env = dict(env, PREFECT_HOME=str(ws / ".prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the Prefect server did not start")
            time.sleep(0.5)
        with_server, out = consort_run(ws, args.preset, dict(env, PREFECT_API_URL=url))
        assert "(0 of " in out, out[-2000:]
        print(f"no-op re-run, Prefect server already running: {with_server:.1f} s wall   goal < 10 s   "
              f"ratio to ephemeral {with_server / noop:.2f}x")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    print(f"peak memory of one process (max RSS of the children): first run {peak_first:,.0f} MiB")


if __name__ == "__main__":
    main()
