"""The multi-machine workflow exactly as docs/federated.md ("Running with owners on separate machines")
tells it, with two owners of one's own (a folder of documents, and the demo's news) and a third
that enrols but never starts its worker: `consort server`, `owner init`, `enrol`, `owner worker`,
`coordinate --allow-missing`, TLS trace services on 127.0.0.2 and 127.0.0.3 with `remote-owner add`
and `trace`, an opt-out with `experts disable` and `export`, a package its owner's enrolled key did
not sign refused before the merge, SIGTERM to a worker. Then nothing of an owner's planted secrets
is anywhere on the coordinator's side: its workspace (DVC cache, MLflow store, Prefect's state), the
store, the export.

Every command is the installed CLI in its own process, each side in its own workspace; the
coordinator's process is never given an owner's workspace.
"""
from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import PROJECT, SHARED_CACHE

DELIVER = ("clinic", "news")  # start workers and deliver
GHOST = "ghost"  # enrols, never starts a worker


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def clinic_documents(folder: Path) -> Path:
    """A folder of the owner's own documents: 40 text files (docstrings of the standard library) and a
    file of another kind, which is skipped and named."""
    import collections
    import email.message
    import json as json_module
    import pathlib

    folder.mkdir(parents=True)
    texts = [inspect.getdoc(obj) or "" for module in (collections, pathlib, email.message, json_module)
             for _, obj in inspect.getmembers(module) if inspect.isclass(obj) or inspect.isfunction(obj)]
    texts = [t for t in texts if len(t) > 300]
    for i in range(40):
        (folder / f"note{i:02d}.txt").write_text("\n\n".join(texts[i::40]))
    (folder / "scan.bin").write_bytes(bytes(range(256)))
    return folder


def consortium_params(tmp_path: Path) -> Path:
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    folder = clinic_documents(tmp_path / "clinic-documents")
    raw["owners"] = {
        "clinic": {"data": {"max_chars": 100000, "canaries": {"per_repeat": 1},
                            "sources": [{"kind": "folder", "path": str(folder)}]},
                   "trace": {"disclosure": "snippets", "snippet_chars": 200}},
        "news": raw["owners"]["news"],
        GHOST: {"data": {"max_chars": 10000, "sources": [{"kind": "folder", "path": str(folder)}]}},
    }
    # The demo's extras that are not this path's (each tested on one machine) stay off, to fit `make test`.
    raw["presets"]["smoke"] |= {"safety": {"enabled": False}, "synthesis": {"enabled": False},
                                "router_tuning": {"enabled": False}, "audit": {"enabled": False},
                                "evaluate": {**raw["presets"]["smoke"]["evaluate"], "ablations": False}}
    raw["presets"]["smoke"]["expert"]["curriculum"] = {"stage2_steps": 0}
    path = tmp_path / "consortium.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def self_signed(folder: Path, ip: str) -> tuple[Path, Path]:
    """docs/federated.md's openssl recipe: a self-signed certificate with the service's IP in its SAN."""
    cert, key = folder / "service.pem", folder / "service.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "30", "-subj", f"/CN={ip}",
                    "-addext", f"subjectAltName=IP:{ip}"], check=True, capture_output=True)
    return cert, key


class Machines:
    """The processes of the trial, each a `consort` command; all stopped at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp, self.procs, self.env = tmp_path, [], dict(os.environ, CONSORT_CACHE=str(SHARED_CACHE),
                                                            PYTHONUNBUFFERED="1")

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=self.env, cwd=self.tmp,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"consort {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-4000:]}")
        return proc

    def start(self, name: str, *args: str, ready: str, wait_s: float = 180) -> tuple[subprocess.Popen, str]:
        """A long-running command, once its output shows `ready`: (process, that line)."""
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=self.env, cwd=self.tmp,
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            lines = [ln for ln in log.read_text().splitlines() if ready in ln]
            if lines:
                return proc, lines[0]
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        raise AssertionError(f"{name} did not print {ready!r} within {wait_s} s:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def secrets_found(roots: list[Path], secrets: list[str]) -> dict[str, list[str]]:
    """Which secrets occur in which files below `roots` (every file, hidden ones and databases too)."""
    needles = [s.encode() for s in secrets]
    found: dict[str, list[str]] = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                for secret, needle in zip(secrets, needles):
                    if needle in data:
                        found.setdefault(secret, []).append(str(path))
    return found


def test_the_readme_multi_machine_workflow_with_two_owners_of_ones_own(tmp_path):
    params = consortium_params(tmp_path)
    coord, store, export = tmp_path / "coordinator", tmp_path / "store", tmp_path / "export"
    owner_ws = {o: tmp_path / o for o in (*DELIVER, GHOST)}
    m = Machines(tmp_path)
    try:
        # 1. The coordinator's servers.
        _, line = m.start("server", "server", "--workspace", str(coord), "--port", str(_free_port()),
                          "--mlflow-port", str(_free_port()), ready="export PREFECT_API_URL=")
        m.env["PREFECT_API_URL"] = line.split("export PREFECT_API_URL=")[1].strip()
        # 2.-3. Each owner's workspace and key; the coordinator enrols the public half.
        for owner, ws in owner_ws.items():
            init = m.run("owner", "init", owner, "--workspace", str(ws), "--preset", "smoke", "--params", str(params))
            key = init.stdout.split(f"`consort enrol {owner} KEY`): ")[1].strip()
            m.run("enrol", owner, key, "--workspace", str(coord))
        # 4. Workers of the owners that deliver; the ghost never starts one.
        workers = {o: m.start(f"{o}-worker", "owner", "worker", str(store), "--workspace", str(owner_ws[o]),
                              ready="worker of")[0] for o in DELIVER}
        # 5. The pipeline, the ghost left out.
        t0 = time.monotonic()
        run = m.run("coordinate", "--workspace", str(coord), "--store", str(store), "--preset", "smoke",
                    "--params", str(params), "--allow-missing", timeout=900)
        print(f"coordinate: {time.monotonic() - t0:.0f} s\n{run.stdout}")
        assert f"owner {GHOST} FAILED: no deployment consort-owner/{GHOST}: has owner {GHOST} started " \
               "`consort owner worker`?" in run.stdout, run.stdout[-3000:]
        assert "merged owners: clinic, news" in run.stdout and (coord / "reports" / "report.html").exists()
        assert "Traceback" not in run.stdout + run.stderr, run.stderr[-3000:]
        assert {p.stem for p in (coord / "evaluations").glob("*.json")} == {"public", *DELIVER}
        assert not (coord / "owners").exists()
        # The coordinator's stages and each owner's (here its last phase's) forked from a stage server of their own.
        for ws, stage in ((coord, "stages.merge_experts"), *((owner_ws[o], "stages.audit") for o in DELIVER)):
            assert stage in (ws / ".consort" / "logs" / "stage_server.log").read_text()

        # Tracing: each owner serves over TLS on an address of its own; the coordinator records them.
        urls, certs = {}, {}
        for owner, ip in zip(DELIVER, ("127.0.0.2", "127.0.0.3")):
            certs[owner], key = self_signed(owner_ws[owner], ip)
            _, url_line = m.start(f"{owner}-serve", "owner", "serve", "--workspace", str(owner_ws[owner]), "--host", ip,
                                  "--tls-cert", str(certs[owner]), "--tls-key", str(key),
                                  "--base-port", str(_free_port(ip)), ready="/trace")
            urls[owner] = url_line.split()[-1].removesuffix("/trace")
            token = json.loads((owner_ws[owner] / "owners" / owner / "trace" / "trace_clients.json").read_text())
            no_token = m.run("remote-owner", "add", owner, urls[owner], "--workspace", str(coord), check=False)
            assert no_token.returncode == 2 and "no client token" in no_token.stderr, no_token.stderr
            m.run("remote-owner", "add", owner, urls[owner], "--token", token["coordinator"], "--ca", str(certs[owner]),
                  "--workspace", str(coord))
        passage = (tmp_path / "clinic-documents" / "note03.txt").read_text().split("\n\n")[0][:300]
        traced = m.run("trace", "--text", passage, "--json", "--workspace", str(coord))
        answer = json.loads(traced.stdout)
        assert set(answer["owners"]) == set(DELIVER), answer["owners"]  # the ghost, never merged, is not asked
        assert answer["owners"]["clinic"]["status"] == "ok" and answer["owners"]["clinic"]["spans"], answer
        m.run("remote-owner", "add", "news", urls["news"], "--token", "not-the-token", "--ca", str(certs["news"]),
              "--workspace", str(coord))
        wrong = m.run("trace", "--text", passage, "--workspace", str(coord), check=False)
        assert wrong.returncode == 1 and "consort remote-owner add news" in wrong.stderr, wrong.stderr

        # Opting clinic out: the workspace's command, no --params; export and generate follow it.
        m.run("experts", "disable", "clinic", "--workspace", str(coord))
        assert yaml.safe_load(params.read_text())["inference"]["disabled"] == ["clinic"]
        listing = m.run("experts", "--workspace", str(coord)).stdout
        assert any(ln.split()[1:3] == ["clinic", "disabled"] for ln in listing.splitlines() if ln.strip()[:1].isdigit())
        other = tmp_path / "other.yaml"
        other.write_text(params.read_text())
        refused = m.run("export", str(export), "--workspace", str(coord), "--params", str(other), check=False)
        assert refused.returncode == 2 and f"was built from {params}" in refused.stderr, refused.stderr
        m.run("export", str(export), "--workspace", str(coord))
        shipped = json.loads((export / "consort_export.json").read_text())
        assert [e["owner"] for e in shipped["experts"]] == ["news"] and shipped["left_out"] == ["clinic"]
        card = (export / "README.md").read_text()
        assert "| clinic |" not in card and "| news |" in card, card

        # A package the enrolled key did not sign (the coordinator holds another key for news, as if someone
        # else published in news's name): refused by name before the merge, the merged model kept.
        merged_before = (coord / "models" / "merged" / "consort_merged.json").read_text()
        (coord / "keyring" / "news.pub").unlink()
        m.run("enrol", "news", str(owner_ws[GHOST] / "owners" / GHOST / "keys" / "signing_key.pub"),
              "--workspace", str(coord))
        bad = m.run("coordinate", "--workspace", str(coord), "--store", str(store), "--preset", "smoke",
                    "--params", str(params), timeout=600, check=False)
        assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
        assert "news: its package was refused: expert news: the signature does not verify with news's enrolled key" \
               in bad.stderr and "consort owner publish" in bad.stderr and f"  {GHOST}: no deployment" in bad.stderr
        assert "--allow-missing" in bad.stderr and "Traceback" not in bad.stdout + bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) < 10, bad.stderr
        assert (coord / "models" / "merged" / "consort_merged.json").read_text() == merged_before

        # A supervisor's SIGTERM ends a worker (and what it started).
        os.killpg(workers["news"].pid, signal.SIGTERM)
        assert workers["news"].wait(timeout=30) is not None
    finally:
        m.stop()

    secrets = [c["secret"] for o in DELIVER
               for c in json.loads((owner_ws[o] / "owners" / o / "corpus" / "canaries.json").read_text())]
    assert len(secrets) >= 2 * 3
    assert secrets_found([owner_ws["clinic"] / "owners" / "clinic" / "corpus"], secrets)  # found where they are
    assert not secrets_found([coord, store, export], secrets)
