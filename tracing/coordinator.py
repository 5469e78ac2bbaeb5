"""The coordinator's side of tracing: start the owners' services for the demo, fan a request out, assemble.

Each owner's service is a separate process holding that owner's index; the coordinator knows only
each service's address and its client token (`services.json` in the workspace's tracing/ folder,
written by `consort serve`). An owner whose service does not answer is reported as unavailable;
the others still answer.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from stages import params as P
from tracing.attribution import merge_for_display

REGISTRY = Path("tracing") / "services.json"


def registry_path(workspace: Path) -> Path:
    return Path(workspace) / REGISTRY


def load_registry(workspace: Path) -> dict[str, dict]:
    path = registry_path(workspace)
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def start_services(workspace: Path, owners: list[str] | None = None, wait_s: float = 120.0,
                   base_port: int | None = None) -> dict[str, subprocess.Popen]:
    """Start each owner's service (a process per owner, 127.0.0.1) and record them for the coordinator.

    Owner i (in params order) listens on base_port + i; base_port defaults to `trace.base_port`.
    """
    from tracing.service import OwnerService

    workspace = Path(workspace).resolve()
    params = P.load(workspace / "params.yaml")
    owners = owners or list(params.owners)
    missing = [o for o in owners if not (workspace / "owners" / o / "index").exists()]
    if missing:
        raise FileNotFoundError(f"no index for {', '.join(missing)} in {workspace}: run `consort run` first "
                                "(the build_index stages write owners/<name>/index)")
    procs, registry = {}, {}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for i, owner in enumerate(params.owners):
        if owner not in owners:
            continue
        port = (params.trace.base_port if base_port is None else base_port) + i
        if not _port_free(port):
            stop_services(procs)
            raise RuntimeError(f"port {port} on 127.0.0.1 (owner {owner}) is in use: is `consort serve` already "
                               "running? Stop it, or choose other ports (--base-port, or trace.base_port)")
        service = OwnerService.from_workspace(workspace, owner)
        # The owner hands the coordinator its token; in the demo that is this file.
        registry[owner] = {"url": f"http://127.0.0.1:{port}", "token": service.client_tokens()["coordinator"]
                           if "coordinator" in service.policy.clients else None}
        service.state_dir.mkdir(parents=True, exist_ok=True)
        log = (service.state_dir / "service.log").open("a")
        procs[owner] = subprocess.Popen([sys.executable, "-m", "tracing.service", owner, "--workspace", str(workspace),
                                         "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
    path = registry_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(registry, indent=2))
    deadline = time.monotonic() + wait_s
    pending = dict(registry)
    while pending and time.monotonic() < deadline:
        for owner in list(pending):
            if procs[owner].poll() is not None:
                stop_services(procs)
                raise RuntimeError(f"trace service of {owner} exited at start; see "
                                   f"{workspace / 'owners' / owner / 'trace' / 'service.log'}")
            if _listening(pending[owner]["url"]):
                del pending[owner]
        time.sleep(0.2)
    if pending:
        stop_services(procs)
        raise TimeoutError(f"trace services of {', '.join(pending)} did not start within {wait_s:.0f} s")
    return procs


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(url: str) -> bool:
    try:
        # No endpoint but POST /trace exists: an unauthenticated POST answering 401 means "up".
        return httpx.post(f"{url}/trace", timeout=1.0).status_code == 401
    except httpx.HTTPError:
        return False


def stop_services(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def ask_owner(owner: str, entry: dict, prompt: str, output: str, timeout: float) -> dict:
    try:
        resp = httpx.post(f"{entry['url']}/trace", json={"prompt": prompt, "output": output}, timeout=timeout,
                          headers={"Authorization": f"Bearer {entry.get('token') or ''}"})
    except httpx.HTTPError as err:
        return {"status": "unavailable", "error": f"{type(err).__name__}: {err}".strip()}
    if resp.status_code != 200:
        try:
            detail = resp.json().get("error", resp.text)
        except ValueError:
            detail = resp.text
        return {"status": "error", "http_status": resp.status_code, "error": detail}
    return {"status": "ok", **resp.json()}


def trace_everywhere(registry: dict[str, dict], prompt: str, output: str, timeout: float = 30.0) -> dict:
    """Every owner's answer for (prompt, output), and the spans of all owners merged for display."""
    with ThreadPoolExecutor(max_workers=max(1, len(registry))) as pool:
        futures = {o: pool.submit(ask_owner, o, e, prompt, output, timeout) for o, e in registry.items()}
        answers = {o: f.result() for o, f in futures.items()}
    spans = [{**sp, "owner": o} for o, a in answers.items() if a["status"] == "ok" for sp in a["spans"]]
    top = max((d["score"] for sp in spans for d in sp["documents"]), default=0.0)
    for sp in spans:  # shade by relevance: the span's best document score against the best overall
        sp["relevance"] = round(max((d["score"] for d in sp["documents"]), default=0.0) / top, 3) if top > 0 else 0.0
    return {"prompt": prompt, "output": output, "owners": answers, "segments": merge_for_display(spans)}


def format_trace(result: dict) -> str:
    """A terminal rendering: the output, then each span with its owner and documents."""
    out = result["output"]
    lines = [out, ""]
    for owner, a in result["owners"].items():
        if a["status"] != "ok":
            lines.append(f"[{owner}] {a['status']}: {a.get('error', '')}")
    for seg in result["segments"]:
        for sp in seg["spans"]:
            lines.append(f"[{sp['owner']}] {out[sp['start']:sp['end']]!r} (count {sp['count']}, "
                         f"relevance {sp['relevance']:.2f})")
            for d in sp["documents"][:3]:
                extra = f"  {d['snippet']!r}" if "snippet" in d else ""
                lines.append(f"    doc {d['id']}  bm25 {d['score']:.2f}{extra}")
    answered = [o for o, a in result["owners"].items() if a["status"] == "ok"]
    if not result["segments"] and answered:
        # Only the owners that answered were searched: say so, never "any owner's data".
        lines.append(f"no span of the output was found in the data of {', '.join(answered)}")
    return "\n".join(lines)
