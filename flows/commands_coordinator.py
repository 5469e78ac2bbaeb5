"""The coordinator's commands (owners on separate machines): its Prefect server and MLflow UI, owner
keys, and the pipeline with each owner's stages on that owner's worker."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from flows.prefect_env import need_prefect_server, prefect_environment


def cmd_server(workspace: Path, port: int, mlflow_port: int) -> int:
    """The coordinator's Prefect server and MLflow UI on 127.0.0.1, until Ctrl-C."""
    from flows.layout import Workspace
    from flows.processes import stop_on_sigterm, supervise
    from flows.remote import start_prefect_server

    stop_on_sigterm()
    ws = Workspace(workspace.resolve())
    ws.root.mkdir(parents=True, exist_ok=True)
    try:
        prefect, url = start_prefect_server(ws.root / ".prefect-server", port)
    except (RuntimeError, TimeoutError) as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    mlflow = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", ws.tracking_uri,
                               "--default-artifact-root", ws.artifacts.as_uri(), "--host", "127.0.0.1",
                               "--port", str(mlflow_port), "--workers", "1"], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Prefect server: export PREFECT_API_URL={url}", flush=True)
    print(f"MLflow UI: http://127.0.0.1:{mlflow_port}  (Ctrl-C stops both)", flush=True)
    log = ws.root / ".prefect-server" / "server.log"
    return supervise({"Prefect server": prefect, "MLflow UI": mlflow}, f"consort: the {{names}} stopped; see {log}",
                     watched=("Prefect server",))


def cmd_enrol(owner: str, key: Path, workspace: Path) -> int:
    from stages.package import PackageRefused, enrol_owner_key

    if not key.exists():
        print(f"consort: {key}: no such key file (the owner's `consort owner init` printed its path)", file=sys.stderr)
        return 2
    from flows.repository import init_dvc_repo

    root = workspace.resolve()
    try:
        target = enrol_owner_key(key, root / "keyring", owner)
    except PackageRefused as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    init_dvc_repo(root)  # from here on `dvc remote add` works in it (a store can be a DVC remote)
    print(f"{owner}: key enrolled in {target}")
    return 0


def cmd_coordinate(workspace: Path, store: str, preset: str, params: Path | None, allow_missing: bool,
                   lost_after: float, owner_timeout: float) -> int:
    """The pipeline with every owner's stages on that owner's worker (owners on separate machines)."""
    from flows.repository import use_project_python
    from flows.workspace import prepare_workspace
    from stages.params import ParamsError

    if not need_prefect_server():
        return 2
    root = workspace.resolve()
    try:
        ws = prepare_workspace(root, preset, params, owners_remote=True)
    except ParamsError as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    prefect_environment(root)
    owners = list(ws.params().owners)
    from stages.package import enrolled_key

    unenrolled = [o for o in owners if not enrolled_key(ws.root / "keyring", o).exists()]
    if unenrolled:
        print(f"consort: no key enrolled for owner(s) {', '.join(unenrolled)} in {ws.root / 'keyring'}: "
              "run `consort enrol OWNER KEY.pub` with the key each owner's `consort owner init` printed",
              file=sys.stderr)
        return 2
    from flows.store import Store, StoreError

    try:
        shared = Store.open(store, ws.root)
    except StoreError as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    use_project_python()
    os.chdir(ws.root)
    from flows.remote import coordinate, stream_stages

    t0 = time.perf_counter()
    print(f"consort: coordinating the {preset!r} pipeline in {ws.root}; owners {', '.join(owners)} run on "
          f"their own workers; store {shared}")
    try:
        summary = coordinate(str(ws.root), shared.spec, preset, allow_missing, lost_after,
                             owner_timeout)
    except (RuntimeError, ValueError) as err:
        print(f"\nconsort: {err}", file=sys.stderr)
        return 1
    print("\nstages:\n" + stream_stages(summary))
    for owner, error in summary["failed"].items():
        print(f"\nowner {owner} FAILED: {error}")
    print(f"\npipeline finished in {time.perf_counter() - t0:.0f} s; merged owners: {', '.join(summary['merged_owners'])}")
    print(f"merged model: {ws.merged_model}")
    table = ws.reports / "eval_table.md"
    if table.exists():
        print("\n" + table.read_text())
    return 0
