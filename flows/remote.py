"""Prefect across machines: each owner's stages run on that owner's own worker, the coordinator waits.

- `consort server` starts a Prefect server (and the MLflow UI) on 127.0.0.1 for the coordinator.
- Each owner runs `consort owner worker`: a Prefect `process` worker on the owner's own work pool
  (`consort-<owner>`), serving the deployment `consort-owner/<owner>` of `owner_flow`. The worker
  is told the owner's workspace and store by the owner; the coordinator never learns them.
- `consort coordinate` runs the coordinator's stages in its own workspace (which has no owners/
  folder), publishes the public models to the store, starts each owner's phase with
  `run_deployment`, watches the run and the owner's worker heartbeat, collects what the owners
  published, merges, and reports. An owner whose run fails or whose worker stops answering is
  reported as failed; with `--allow-missing` the others are merged without it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger

from flows import stage_server
from flows.console import stage_line
from flows.owner import WORKSPACE_VARIABLE, OwnerWorkspace, check_phase, fetch_public, pool_name, run_phase
from flows.owner import publish as owner_publish
from flows.store import Store
from stages import registry
from stages.artifacts import MANIFEST, PRESENT_OWNERS
from stages.io import write_json
from stages.runtime import LOGS_VARIABLE, log_file

STORE_VARIABLE = "CONSORT_STORE"
DEPLOYMENT_FLOW = "consort-owner"
WORKER_HEARTBEAT_S = 5  # our workers beat this often, so a dead one is noticed in seconds, not minutes
WORKER_QUERY_S = 2  # and ask for work this often: Prefect's 10 s added up to 10 s to each owner phase


# --- the owner's side ---------------------------------------------------------------------------

@flow(name=DEPLOYMENT_FLOW, persist_result=True)
def owner_flow(phase: str) -> dict:
    """One phase of an owner's stages on the owner's worker; returns stage names and flags only.

    Its result is persisted where the worker keeps results: the owner's workspace.
    """
    check_phase(phase)
    ws = OwnerWorkspace(Path(os.environ[WORKSPACE_VARIABLE]))
    store = Store.open(os.environ[STORE_VARIABLE], ws.root)
    fetch_public(ws, store, phase)
    stages = run_phase(ws, phase)
    published = owner_publish(ws, store, phase)
    summary = {"owner": ws.owner, "phase": phase, "stages": stages, "published": published}
    store.write_json(f"runs/{ws.owner}/{phase}.json", summary)  # what ran, for the coordinator to print
    get_run_logger().info(f"{ws.owner} {phase}: {sum(s['ran'] for s in stages)} of {len(stages)} stages ran")
    return summary


def register_owner(owner: str) -> None:
    """The owner's work pool (process type) and its deployment of `owner_flow`, created if missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool_name(owner), type="process"))
        except ObjectAlreadyExists:
            pass
    # A module path, not a file: the worker imports the flow from the installed project.
    owner_flow.to_deployment(name=owner, work_pool_name=pool_name(owner),
                             entrypoint_type=EntrypointType.MODULE_PATH).apply()


def worker_command(ws: OwnerWorkspace, store: Store) -> tuple[list[str], dict]:
    """The command and environment of the owner's Prefect worker."""
    env = dict(os.environ, **{
        WORKSPACE_VARIABLE: str(ws.root), STORE_VARIABLE: store.spec,
        # Results and Prefect's local state stay in the owner's workspace.
        "PREFECT_LOCAL_STORAGE_PATH": str(ws.root / ".prefect" / "results"),
        "PREFECT_HOME": str(ws.root / ".prefect"),
        "PREFECT_WORKER_HEARTBEAT_SECONDS": str(WORKER_HEARTBEAT_S),
        "PREFECT_WORKER_QUERY_SECONDS": str(WORKER_QUERY_S),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # DVC runs stage commands through the shell: `python` must be this environment's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool_name(ws.owner), "--type", "process",
           "--name", f"{ws.owner}-worker"]
    return cmd, env


# --- the coordinator's side ---------------------------------------------------------------------

def _worker_alive(client, owner: str, grace_s: float) -> bool:
    workers = client.read_workers_for_work_pool(pool_name(owner))
    now = datetime.now(UTC)
    return any(w.last_heartbeat_time and (now - w.last_heartbeat_time).total_seconds() < grace_s for w in workers)


def watch_owner(owner: str, phase: str, lost_after_s: float, timeout_s: float) -> dict:
    """Start the owner's phase on its worker and wait: {"owner", "ok", "error"?}."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    try:
        run = run_deployment(f"{DEPLOYMENT_FLOW}/{owner}", parameters={"phase": phase}, timeout=0)
    except ObjectNotFound:
        return {"owner": owner, "ok": False, "error": f"no deployment {DEPLOYMENT_FLOW}/{owner}: has owner {owner} "
                                                       "started `consort owner worker`?"}
    deadline, last_seen = time.monotonic() + timeout_s, time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run.id).state
            if state and state.is_final():
                if state.is_completed():
                    return {"owner": owner, "ok": True, "flow_run": str(run.id)}
                return {"owner": owner, "ok": False, "flow_run": str(run.id),
                        "error": f"its {phase} run ended {state.name}: {state.message or ''}".strip()}
            if _worker_alive(client, owner, lost_after_s):
                last_seen = time.monotonic()
            elif time.monotonic() - last_seen > lost_after_s:
                reason = f"the worker of owner {owner} stopped answering (no heartbeat for {lost_after_s:.0f} s)"
                client.set_flow_run_state(run.id, Crashed(message=reason), force=True)
                return {"owner": owner, "ok": False, "flow_run": str(run.id), "error": reason}
            if time.monotonic() > deadline:
                return {"owner": owner, "ok": False, "flow_run": str(run.id),
                        "error": f"its {phase} run did not finish within {timeout_s:.0f} s"}
            time.sleep(1.0)


def dispatch(owners: list[str], phase: str, lost_after_s: float, timeout_s: float) -> dict[str, dict]:
    with ThreadPoolExecutor(max_workers=max(1, len(owners))) as pool:
        futures = {o: pool.submit(watch_owner, o, phase, lost_after_s, timeout_s) for o in owners}
        return {o: f.result() for o, f in futures.items()}


def publish_public(root: Path, store: Store, phase: str) -> None:
    for rel in registry.public_inputs(phase):
        store.put(root / rel, rel)


def collect(root: Path, store: Store, owners: list[str], phase: str) -> None:
    """Copy what these owners published into the coordinator's workspace."""
    for owner in owners:
        for store_rel, ws_rel in registry.published_paths(owner, phase).items():
            if store.exists(store_rel):
                store.get(store_rel, root / ws_rel)


def refused_packages(root: Path, owners: list[str]) -> dict[str, str]:
    """The owners whose collected package the merge would refuse, with the reason and the fix: asked
    before the merge, so one bad package is that owner's failure, not the whole merge's."""
    from stages.merge_experts import MergeRefused, check_package

    refused = {}
    for owner in owners:
        try:
            check_package(owner, root / "published" / owner / "expert", root / "keyring", root / "models" / "anchor")
        except MergeRefused as err:
            refused[owner] = (f"its package was refused: {err}. Owner {owner} publishes it again with "
                              f"`consort owner publish STORE --workspace ITS_WORKSPACE` (or `consort owner run`)")
    return refused


def run_coordinator_stages(root: Path, stages: tuple[str, ...], lineage, params: dict) -> list[dict]:
    """Run the coordinator's own stages in order (DVC skips those up to date), each recorded in MLflow."""
    from flows.pipeline import failure_cause, reproduce_stage

    out = []
    for stage in stages:
        try:
            outcome, seconds = reproduce_stage(root, stage)
        except Exception as err:  # the stage's own message, not DVC's wrapper and its traceback
            raise RuntimeError(f"stage {stage} failed: {failure_cause(root, stage, err)} "
                               f"(its log: {root / '.consort' / 'logs' / stage}.log)") from None
        lineage.record_stage(stage, outcome != "cached", seconds, params)
        out.append({"stage": stage, "ran": outcome != "cached", "outcome": outcome, "seconds": seconds})
    return out


@flow(name="consort-coordinator", log_prints=True)
def coordinate(workspace: str, store: str, preset: str = "default", allow_missing: bool = False,
               lost_after_s: float = 20.0, owner_timeout_s: float = 3600.0) -> dict:
    """The whole pipeline with every owner's stages on that owner's worker."""
    from prefect.runtime import flow_run

    from flows.layout import Workspace
    from flows.tracking import Lineage, record_remote_expert

    root = Path(workspace)
    shared = Store.open(store, root)
    params = Workspace(root).params()
    os.environ[LOGS_VARIABLE] = "1"  # each stage's output to its log (stages/runtime.py), not the console
    owners, logged = list(params.owners), params.model_dump(mode="json")
    lineage = Lineage(Workspace(root), preset, str(flow_run.id) if flow_run.id else None)
    summary: dict = {"stages": [], "failed": {}}
    # Its stages fork from one pre-imported interpreter (flows/stage_server.py), the whole flow long.
    with stage_server.running(root, log_file(root, "stage_server")):
        try:
            summary["stages"] += run_coordinator_stages(root, registry.in_phase("before_owners", "coordinator"),
                                                        lineage, logged)
            publish_public(root, shared, "train")
            for phase, after in (("train", "after_training"), ("evaluate", "after_evaluation")):
                results = dispatch(owners, phase, lost_after_s, owner_timeout_s)
                failed = {o: r["error"] for o, r in results.items() if not r["ok"]}
                collect(root, shared, [o for o in owners if o not in failed], phase)
                if phase == "train":
                    failed |= refused_packages(root, [o for o in owners if o not in failed])
                summary["failed"].update(failed)
                owners = [o for o in owners if o not in failed]
                if failed and not (allow_missing and owners):
                    reasons = "".join(f"\n  {o}: {err}" for o, err in failed.items())
                    raise RuntimeError(f"owner(s) {', '.join(failed)} failed in the {phase} phase:{reasons}\n"
                                       "Run `consort coordinate` again once they are fixed (DVC skips what is done)"
                                       + ("" if allow_missing else ", or add --allow-missing to merge the others "
                                          "without them"))
                if phase == "train":
                    _write_present_owners(root, owners)
                    summary["merged_owners"] = list(owners)
                summary[f"{phase}_runs"] = {o: shared.read_json(f"runs/{o}/{phase}.json") or {} for o in owners}
                if phase == "train":
                    for o in owners:
                        manifest = json.loads((root / "published" / o / "expert" / MANIFEST).read_text())
                        record_remote_expert(lineage, o, manifest, results[o].get("flow_run"))
                summary["stages"] += run_coordinator_stages(root, registry.in_phase(after, "coordinator"), lineage,
                                                            logged)
                if phase == "train":
                    publish_public(root, shared, "evaluate")
        except BaseException:
            lineage.finish(False)
            raise
    eval_path = root / "metrics" / "eval.json"
    lineage.finish(True, json.loads(eval_path.read_text()) if eval_path.exists() else None, Workspace(root).reports)
    return summary


def _write_present_owners(root: Path, owners: list[str]) -> None:
    """The owners whose packages the merge takes: the ones that delivered."""

    write_json(root / "published" / PRESENT_OWNERS, {"owners": owners})


# --- servers ------------------------------------------------------------------------------------

def start_prefect_server(home: Path, port: int, wait_s: float = 180.0) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on 127.0.0.1, its state in `home`; returns (process, API URL) once healthy."""
    import httpx

    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_UI_ENABLED="false")
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "server.log").open("a")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited at start; see {home / 'server.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"the Prefect server did not answer on {url} within {wait_s:.0f} s; see {home / 'server.log'}")


def stream_stages(summary: dict) -> str:
    lines = [stage_line(s) for s in summary["stages"]]
    for phase in registry.OWNER_PHASES:
        for owner, rec in summary.get(f"{phase}_runs", {}).items():
            lines += [stage_line(s, f"  (on {owner}'s worker)") for s in rec.get("stages", [])]
    return "\n".join(lines)

