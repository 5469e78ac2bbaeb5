"""An owner's commands on its own machine: create its workspace, run and publish its phases, serve
its trace service, and the worker that runs its phases when the coordinator asks."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from flows.commands_local import cmd_serve
from flows.prefect_env import need_prefect_server, prefect_environment
from stages.artifacts import PUBLIC_KEY


def _owner_errors():
    from flows.owner import OwnerError
    from flows.store import StoreError
    from stages.package import PackageRefused
    from stages.params import ParamsError

    return OwnerError, StoreError, ParamsError, PackageRefused, FileNotFoundError


def _owner_workspace(workspace: Path, store: str | None):
    """(the owner's workspace, its store or None), the workspace's Prefect state inside it."""
    from flows.owner import OwnerWorkspace
    from flows.store import Store

    root = workspace.resolve()
    ws = OwnerWorkspace(root)
    _ = ws.owner  # an error naming the fix if this is no owner workspace
    prefect_environment(root)
    return ws, Store.open(store, root) if store else None


def _phases(phase: str) -> list[str]:
    from stages import registry

    return list(registry.OWNER_PHASES) if phase == "all" else [phase]


def owner_init(name: str, workspace: Path, preset: str, params: Path | None) -> int:
    """Create the owner's workspace: its params section, its stages, a DVC repo and its key pair."""
    from flows.owner import init_owner

    try:
        ws = init_owner(name, workspace.resolve(), preset, params)
    except _owner_errors() as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    print(f"owner workspace for {name}: {ws.root}")
    print(f"  its data: owners.{name}.data.sources in {ws.root / 'params.yaml'} (the demo's source; "
          "point it at your own documents: {kind: folder, path: ...})")
    print(f"  your public key (send it to the coordinator, who runs `consort enrol {name} KEY`): "
          f"{ws.keys / PUBLIC_KEY}")
    return 0


def owner_run(workspace: Path, store: str | None, phase: str) -> int:
    """Run the owner's phases (DVC skips what is up to date), fetching from and publishing to a store if given."""
    from flows.console import stage_line
    from flows.owner import fetch_public, publish, run_phase
    from flows.repository import use_project_python

    try:
        ws, shared = _owner_workspace(workspace, store)
        use_project_python()
        os.chdir(ws.root)
        for name in _phases(phase):
            if shared:
                fetch_public(ws, shared, name)
            for s in run_phase(ws, name):
                print(stage_line(s))
            if shared:
                print(f"published to {shared}: {', '.join(publish(ws, shared, name))}")
    except _owner_errors() as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    return 0


def owner_publish(workspace: Path, store: str, phase: str) -> int:
    """Copy what the owner's phases produced to the store (the package's signature checked first)."""
    from flows.owner import publish

    try:
        ws, shared = _owner_workspace(workspace, store)
        for name in _phases(phase):
            print(f"published to {shared}: {', '.join(publish(ws, shared, name)) or '(nothing yet)'}")
    except _owner_errors() as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    return 0


def owner_forget(ids: list[str], workspace: Path, reason: str | None) -> int:
    """The owner's erasure request: the ids go to owners.<name>.data.exclude in its workspace's params.yaml,
    and the request (date, ids, reason) to its own .consort/takedowns.jsonl, which never leaves it."""
    import json
    import time

    from flows.params_file import forget_documents

    try:
        ws, _ = _owner_workspace(workspace, None)
        added = forget_documents(ws.owner, ids, ws.root / "params.yaml")
    except _owner_errors() as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    log = ws.root / ".consort" / "takedowns.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ids": added,
                             "reason": reason or ""}) + "\n")
    print(f"{ws.owner}: {len(added)} document id(s) to take down" + ("" if added else " (all were listed already)")
          + f"; `consort owner run --workspace {workspace}` rebuilds the corpus, index and expert without them, "
          "and `consort owner publish` sends the new package (its manifest says how many, never which)")
    return 0


def owner_serve(workspace: Path, base_port: int | None, host: str, tls_cert: Path | None, tls_key: Path | None,
                allow_insecure_remote: bool) -> int:
    """The owner's own trace service: on 127.0.0.1, or on another address over TLS."""
    try:
        ws, _ = _owner_workspace(workspace, None)
    except _owner_errors() as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    return cmd_serve(workspace, ws.owner, base_port, host, tls_cert, tls_key, allow_insecure_remote)


def owner_worker(workspace: Path, store: str) -> int:
    """A Prefect worker on the owner's pool that runs its phases when the coordinator asks."""
    if not need_prefect_server():
        return 2
    from flows.remote import register_owner, worker_command

    try:
        ws, shared = _owner_workspace(workspace, store)
    except _owner_errors() as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    register_owner(ws.owner)
    cmd, env = worker_command(ws, shared)
    print(f"worker of {ws.owner} on pool consort-{ws.owner}, workspace {ws.root}, store {shared} "
          "(Ctrl-C or SIGTERM stops it)", flush=True)
    import psutil

    from flows.processes import stop_on_sigterm

    # Prefect's worker survives SIGTERM and takes the next job: a supervisor's stop (systemd,
    # `docker stop`) must end it and the run it started, so it runs under this process, not in its place.
    stop_on_sigterm()
    worker = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return worker.wait()
    except KeyboardInterrupt:
        print(f"stopping the worker of {ws.owner} and any run it started", file=sys.stderr, flush=True)
        return 0
    finally:
        if worker.poll() is None:
            procs = [*psutil.Process(worker.pid).children(recursive=True), psutil.Process(worker.pid)]
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.terminate()
            for proc in psutil.wait_procs(procs, timeout=15)[1]:
                proc.kill()
