"""Owners on their own machines: owner workspaces, a real Prefect server, one worker process per owner.

The multi-process test runs the smoke pipeline through three owner workers (separate processes,
each with its own workspace that the coordinator process is never given), kills one owner's
worker mid-run, and checks that the coordinator reports that owner, merges the others, and that
after the worker is back a re-run runs only the missing owner's stages.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT, SHARED_CACHE, kill_tree

from flows.owner import OwnerError, OwnerWorkspace, init_owner
from flows.workspace_dvc import side_dvc_yaml

OWNERS = ["code", "math", "news"]


def test_owner_and_coordinator_stages_split_the_dag():
    owner = side_dvc_yaml("owner", PROJECT / "dvc.yaml")["stages"]
    assert set(owner) == {"prepare_owner", "train_expert", "train_dp_baseline", "build_index", "synthesize",
                          "evaluate_owner", "trace_page", "audit"}
    assert all("foreach" in s for s in owner.values())
    coordinator = side_dvc_yaml("coordinator", PROJECT / "dvc.yaml")["stages"]
    assert "merge_experts" in coordinator and "train_unrestricted" not in coordinator
    deps = [str(d) for s in coordinator.values() for d in s.get("deps", [])]
    assert deps and not [d for d in deps if d.startswith("owners")]


def test_owner_init_makes_a_one_owner_workspace_with_a_key(tmp_path):
    ws = init_owner("news", tmp_path / "news", preset="smoke")
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    assert list(params["owners"]) == ["news"] and ws.owner == "news"
    assert (ws.keys / "signing_key.pem").stat().st_mode & 0o077 == 0
    key = (ws.keys / "signing_key.pem").read_bytes()
    init_owner("news", ws.root, preset="smoke")  # again: the key is kept
    assert (ws.keys / "signing_key.pem").read_bytes() == key
    with pytest.raises(OwnerError, match="already the workspace of owner 'news'"):
        init_owner("code", ws.root)
    with pytest.raises(OwnerError, match="no owner 'clinic'"):
        init_owner("clinic", tmp_path / "clinic")
    with pytest.raises(OwnerError, match="is not an owner workspace"):
        _ = OwnerWorkspace(tmp_path).owner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _consort(*args: str, env: dict, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=cwd, start_new_session=True,
                            stdout=kw.get("stdout", subprocess.PIPE), stderr=subprocess.STDOUT, text=True)


def _flow_runs(url: str, owner: str) -> list[dict]:
    import httpx

    resp = httpx.post(f"{url}/flow_runs/filter", json={"deployments": {"name": {"any_": [owner]}}}, timeout=10)
    return resp.json()


@pytest.mark.slow
def test_owners_on_separate_workers_kill_one_and_resume(tmp_path):
    from flows.remote import start_prefect_server

    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["owners"] = {o: raw["owners"][o] for o in OWNERS}
    raw["presets"]["smoke"]["owners"] = {o: raw["presets"]["smoke"]["owners"][o] for o in OWNERS}
    # The math owner's expert trains long enough to be killed in the middle of it (without DP, so
    # that it leaves checkpoints to resume from).
    raw["presets"]["smoke"]["owners"]["math"]["train"] = {"steps": 400}
    raw["owners"]["math"].pop("dp", None)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    server, url = start_prefect_server(tmp_path / "prefect-server", _free_port())
    env = dict(os.environ, PREFECT_API_URL=url, CONSORT_CACHE=str(SHARED_CACHE), PYTHONUNBUFFERED="1")
    coord, store = tmp_path / "coordinator", tmp_path / "store"
    workers: dict[str, subprocess.Popen] = {}
    logs = {o: (tmp_path / f"{o}-worker.log") for o in OWNERS}

    # The store is one folder; the coordinator and the math owner reach it as a DVC remote of their
    # workspaces (`dvc remote add shared FOLDER`), the other owners as the folder itself.
    store_of = {o: "dvc:shared" if o == "math" else str(store) for o in OWNERS}

    def add_remote(workspace: Path) -> None:
        subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "shared", str(store)], cwd=workspace, check=True,
                       capture_output=True)

    def start_worker(owner: str) -> None:
        workers[owner] = _consort("owner", "worker", store_of[owner], "--workspace", str(tmp_path / owner), env=env,
                                  cwd=tmp_path, stdout=logs[owner].open("a"))

    try:
        for o in OWNERS:
            init = subprocess.run([sys.executable, "-m", "flows.cli", "owner", "init", o, "--workspace",
                                   str(tmp_path / o), "--preset", "smoke", "--params", str(params)],
                                  env=env, capture_output=True, text=True, check=True)
            key = init.stdout.split("`consort enrol")[1].split(": ", 1)[1].strip()
            subprocess.run([sys.executable, "-m", "flows.cli", "enrol", o, key, "--workspace", str(coord)], env=env,
                           check=True, capture_output=True)
            if store_of[o] != str(store):
                add_remote(tmp_path / o)
            start_worker(o)
        add_remote(coord)  # a DVC repository since the first `consort enrol`
        run = _consort("coordinate", "--workspace", str(coord), "--store", "dvc:shared", "--preset", "smoke",
                       "--params", str(params), "--allow-missing", "--lost-after", "15", env=env, cwd=tmp_path)
        # Kill the math owner's worker (and the flow run it started) while its expert trains.
        deadline = time.monotonic() + 600
        while not (tmp_path / "math" / "owners" / "math" / "checkpoint.pt").exists():
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read() if run.poll() is not None else ""
            time.sleep(0.5)
        kill_tree(workers["math"])  # the owner's machine goes away: its worker and the run it started
        out, _ = run.communicate(timeout=900)
        assert run.returncode == 0, out[-4000:]
        assert "owner math FAILED: the worker of owner math stopped answering" in out, out[-3000:]
        assert "merged owners: code, news" in out
        merged = json.loads((coord / "models" / "merged" / "consort_merged.json").read_text())
        assert [e["owner"] for e in merged["experts"]] == ["public", "code", "news"]
        states = {r["state_type"] for r in _flow_runs(url, "math")}
        assert "CRASHED" in states, states
        # The coordinator's workspace never held an owner's folder; the store holds packages and numbers only.
        assert not (coord / "owners").exists()
        assert not any("corpus" in p.parts for p in store.rglob("*") if "experts" in p.parts or "results" in p.parts)

        start_worker("math")
        again = _consort("coordinate", "--workspace", str(coord), "--store", "dvc:shared", "--preset", "smoke",
                         "--params", str(params), "--lost-after", "15", env=env, cwd=tmp_path)
        out, _ = again.communicate(timeout=900)
        assert again.returncode == 0, out[-4000:]
        assert "merged owners: code, math, news" in out and "FAILED" not in out
        for o in ("code", "news"):
            record = json.loads((store / "runs" / o / "train.json").read_text())
            assert not any(s["ran"] for s in record["stages"]), record  # done before: nothing re-ran
        record = json.loads((store / "runs" / "math" / "train.json").read_text())
        assert {s["stage"] for s in record["stages"] if s["ran"]} >= {"train_expert@math", "build_index@math"}
        assert (coord / "reports" / "report.html").exists()
        evaluations = {p.stem for p in (coord / "evaluations").glob("*.json")}
        assert evaluations == {"public", *OWNERS}
    finally:
        for proc in [*workers.values(), server]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*workers.values(), server]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
