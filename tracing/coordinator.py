"""The coordinator's side of tracing: start the owners' services for the demo, fan a request out, assemble.

Each owner's service is a separate process holding that owner's index; the coordinator knows only
each service's address, its client token and the certificate to expect (`services.json` in the
workspace's tracing/ folder, written by `consort serve` for the demo's owners and by `consort
remote-owner add` for an owner on its own machine). An owner whose service does not answer is
reported as unavailable; the others still answer.
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
from dataclasses import replace
from pathlib import Path

import httpx

from stages import params as P
from tracing.attribution import merge_for_display
from tracing.service import Listen, is_loopback

REGISTRY = Path("tracing") / "services.json"


def registry_path(workspace: Path) -> Path:
    return Path(workspace) / REGISTRY


def load_registry(workspace: Path) -> dict[str, dict]:
    path = registry_path(workspace)
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def write_registry(workspace: Path, registry: dict[str, dict]) -> None:
    path = registry_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(registry, indent=2))
    os.replace(tmp, path)


def add_remote_owner(workspace: Path, owner: str, url: str, token: str | None, ca: Path | None) -> dict:
    """Record the service of an owner on its own machine: its URL, the client token the owner gave
    the coordinator, and the certificate to expect (a self-signed one, or its CA; None: the system's
    CAs). `consort serve` keeps these entries when it records the local ones."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
        raise ValueError(f"{url!r}: give the owner's service as https://HOST:PORT")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(f"{url}: an owner on another machine is reached over https only (its token and the "
                         "traced text would cross the network readable)")
    if ca is not None and not Path(ca).is_file():
        raise FileNotFoundError(f"{ca}: no such certificate file (the owner's service certificate or its CA)")
    if not token or not token.strip() or any(c.isspace() for c in token):
        raise ValueError(f"owner {owner}: --token {token!r} is no client token: give the one the owner's service "
                         "issued (in its owners/<name>/trace/trace_clients.json)")
    entry = {"url": url.rstrip("/"), "token": token, "ca": str(Path(ca).resolve()) if ca else None, "remote": True}
    registry = load_registry(workspace)
    registry[owner] = entry
    write_registry(workspace, registry)
    return entry


def _verify(entry: dict):
    """What httpx checks the service's certificate against: the expected one, else the system's CAs."""
    import ssl

    return ssl.create_default_context(cafile=entry["ca"]) if entry.get("ca") else True


def start_services(workspace: Path, owners: list[str] | None = None, wait_s: float = 120.0,
                   base_port: int | None = None, listen: Listen | None = None,
                   allow_insecure: bool = False) -> dict[str, subprocess.Popen]:
    """Start each owner's service (a process per owner) and record them for the coordinator.

    Owner i (in params order) listens on base_port + i; base_port defaults to `trace.base_port`.
    `listen` gives the address (default 127.0.0.1) and the TLS certificate and key; the record
    then expects that certificate.
    """
    from tracing.service import OwnerService, check_listen

    listen = listen or Listen()
    check_listen(listen, allow_insecure)

    workspace = Path(workspace).resolve()
    params = P.load(workspace / "params.yaml")
    owners = owners or list(params.owners)
    missing = [o for o in owners if not (workspace / "owners" / o / "index").exists()]
    if missing:
        raise FileNotFoundError(f"no index for {', '.join(missing)} in {workspace}: run `consort run` first "
                                "(the build_index stages write owners/<name>/index)")
    procs = {}
    registry = {o: e for o, e in load_registry(workspace).items() if e.get("remote")}
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for i, owner in enumerate(params.owners):
        if owner not in owners:
            continue
        port = (params.trace.base_port if base_port is None else base_port) + i
        if not _port_free(listen.host, port):
            stop_services(procs)
            raise RuntimeError(f"port {port} on {listen.host} (owner {owner}) is in use: is `consort serve` already "
                               "running? Stop it, or choose other ports (--base-port, or trace.base_port)")
        service = OwnerService.from_workspace(workspace, owner)
        here = replace(listen, port=port)
        # The owner hands the coordinator its token; in the demo that is this file.
        registry[owner] = {"url": here.url, "token": service.client_tokens()["coordinator"]
                           if "coordinator" in service.policy.clients else None,
                           "ca": str(Path(listen.tls_cert).resolve()) if listen.tls_cert else None}
        service.state_dir.mkdir(parents=True, exist_ok=True)
        log = (service.state_dir / "service.log").open("a")
        tls = ["--tls-cert", str(listen.tls_cert), "--tls-key", str(listen.tls_key)] if listen.tls_cert else []
        procs[owner] = subprocess.Popen([sys.executable, "-m", "tracing.service", owner, "--workspace", str(workspace),
                                         "--host", listen.host, "--port", str(port), *tls,
                                         *(["--allow-insecure-remote"] if allow_insecure else [])],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    write_registry(workspace, registry)
    deadline = time.monotonic() + wait_s
    pending = {o: registry[o] for o in procs}
    while pending and time.monotonic() < deadline:
        for owner in list(pending):
            if procs[owner].poll() is not None:
                stop_services(procs)
                raise RuntimeError(f"trace service of {owner} exited at start; see "
                                   f"{workspace / 'owners' / owner / 'trace' / 'service.log'}")
            if is_listening(pending[owner]):
                del pending[owner]
        time.sleep(0.2)
    if pending:
        stop_services(procs)
        raise TimeoutError(f"trace services of {', '.join(pending)} did not start within {wait_s:.0f} s")
    return procs


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def is_listening(entry: dict) -> bool:
    try:
        # No endpoint but POST /trace exists: an unauthenticated POST answering 401 means "up".
        return httpx.post(f"{entry['url']}/trace", timeout=1.0, verify=_verify(entry)).status_code == 401
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
                          headers={"Authorization": f"Bearer {entry.get('token') or ''}"}, verify=_verify(entry))
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
