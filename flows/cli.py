"""The `consort` command: each subcommand is a typed function of its options (`cmd_*`, `owner_*`),
mapped onto the pipeline flow and the tools around it.

Subcommands import what they use inside their function: measured here, importing
flows.pipeline (Prefect) takes 2.7 s, flows.tracking (MLflow) 4.7 s and stages.model.experts
(torch, transformers) 6.8 s, against 0.2 s for `consort --help` or a refused argument.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from flows.console import VERBOSITY_VARIABLE, verbosity
from stages.artifacts import MERGED_INFO, PUBLIC_KEY

DEFAULT_WORKSPACE = Path("workspace")
# --params of the commands that run the merged model: opt-outs are the workspace's (flows/workspace.opted_out).
BUILT_FROM = "the params file the workspace was built from (another is refused; default: the workspace's record)"


def _prefect_environment(ws_root: Path) -> None:
    """Settings Prefect reads at import: keep its state in the workspace, start-up tolerant, offline."""
    os.environ.setdefault("PREFECT_HOME", str(ws_root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The ephemeral server, stopped as the command exits, cancels its event recorder mid-flush
    # and logs that as an ERROR with tracebacks (~150 lines after a run with nothing to do); the
    # flow's own failures reach the console through the client, not the server's log.
    os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(_prefect_logging_config(ws_root / ".prefect")))
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The same shutdown also interrupts the server's database pool mid-rollback; SQLAlchemy logs that
# through the root logger (which PREFECT_LOGGING_SERVER_LEVEL does not reach) as an ERROR with a
# traceback. Only the server's aiosqlite pool uses this class: MLflow's stores use synchronous pools.
QUIET_LOGGERS = ("sqlalchemy.pool.impl.AsyncAdaptedQueuePool",)
# A failed flow or task logs its exception with a traceback; consort prints the cause itself, last,
# so the console shows the traceback only with -v.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def _prefect_logging_config(home: Path) -> Path:
    """Prefect's own logging.yml with QUIET_LOGGERS at CRITICAL, written where every Prefect process reads it."""
    import importlib.util

    import yaml

    from stages.io import write_text

    package = Path(importlib.util.find_spec("prefect").submodule_search_locations[0])
    config = yaml.safe_load((package / "logging" / "logging.yml").read_text())
    for name in QUIET_LOGGERS:
        config["loggers"][name] = {"level": "CRITICAL"}
    for name in () if verbosity() > 0 else RUN_LOGGERS:  # still sent to the Prefect API (its UI), not the console
        config["loggers"][name] = {**config["loggers"][name], "propagate": False}
    path = home / "logging.yml"
    write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def cmd_run(workspace: Path, preset: str, params: Path | None, force: list[str]) -> int:
    from flows.workspace import commit_baseline, prepare_workspace, use_project_python
    from stages.params import ParamsError

    root = workspace.resolve()
    try:
        ws = prepare_workspace(root, preset, params)
    except ParamsError as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    _prefect_environment(root)  # after the params are known good: bad ones leave no workspace behind
    use_project_python()
    os.chdir(ws.root)  # DVC resolves stage paths against the working directory
    from flows.pipeline import pipeline

    t0 = time.perf_counter()
    print(f"consort: running the {preset!r} pipeline in {ws.root}")
    try:
        results = pipeline(str(ws.root), preset, force=force)
    except (RuntimeError, ValueError) as err:
        print(f"\nconsort: {err}", file=sys.stderr)
        return 1
    # Each stage that ran or was restored had its line as it ended; the rest are counted here.
    counts = Counter(r["outcome"] for r in results)
    print(f"\npipeline finished in {time.perf_counter() - t0:.0f} s: {counts['ran']} stages ran, "
          f"{counts['restored']} restored from DVC's run cache, {counts['cached']} up to date"
          + ("; nothing was out of date, so MLflow holds no new run (the runs that made these outputs are there)"
             if counts["cached"] == len(results) else ""))
    try:
        commit = commit_baseline(ws.root, f"consort run --preset {preset}: {counts['ran']} stages ran, "
                                          f"{counts['restored']} restored, {counts['cached']} up to date")
    except RuntimeError as err:  # the run's outputs are all there; only `dvc exp` lacks its baseline
        print(f"consort: {err}; commit dvc.yaml, dvc.lock and params.yaml by hand for `dvc exp`", file=sys.stderr)
        commit = None
    if commit:
        print(f"workspace Git commit {commit[:8]}: the baseline `dvc exp run` and `dvc exp show` start from")
    print(f"\nmerged model: {ws.merged_model}")
    table = ws.root / "reports" / "eval_table.md"
    if table.exists() and verbosity() >= 0:
        print("\nheld-out loss per domain (nats/token; bpb = bits per byte):\n")
        print(table.read_text())
        print(f"report (tables, opt-out heat map, loss curves): {table.parent / 'report.html'}\n")
    print(f"lineage: `consort ui --workspace {workspace}` opens the MLflow UI "
          f"(store {ws.tracking_uri})")
    return 0


def cmd_ui(workspace: Path, params: Path | None, port: int, page_port: int) -> int:
    from flows.workspace import Workspace, opted_out
    from stages.params import ParamsError

    ws = Workspace(workspace.resolve())
    if not (ws.root / "mlflow.db").exists():
        print(f"consort: no MLflow store in {ws.root}; run `consort run` first", file=sys.stderr)
        return 2
    try:
        opted_out(ws.root, params)  # the page reads the workspace's opt-outs: a --params of another file is refused
    except ParamsError as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    import signal

    from tracing.coordinator import stop_services

    # `kill` (SIGTERM) must stop both servers, as Ctrl-C does: each runs in a process group of its
    # own (mlflow starts workers of its own), and both groups are ended on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    procs = {}
    try:
        procs["trace page"] = subprocess.Popen(
            [sys.executable, "-m", "tracing.page", "--workspace", str(ws.root), "--port", str(page_port)],
            start_new_session=True)
        print(f"MLflow UI for {ws.root}: http://127.0.0.1:{port}", flush=True)
        print(f"trace page: http://127.0.0.1:{page_port}  (needs `consort serve --workspace {workspace}`)"
              "  (Ctrl-C stops both)", flush=True)
        procs["MLflow UI"] = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", ws.tracking_uri,
             "--default-artifact-root", ws.artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], start_new_session=True)
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        dead = [name for name, p in procs.items() if p.poll() is not None]
        print(f"consort: the {' and the '.join(dead)} stopped (is its port taken?)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_services(procs)


def cmd_experts(action: str, owner: str | None, workspace: Path, params: Path | None) -> int:
    from flows.workspace import Workspace, opted_out, set_workspace_expert_enabled
    from stages.io import read_json
    from stages.params import ParamsError

    try:
        if action in ("enable", "disable"):
            changed = set_workspace_expert_enabled(workspace.resolve(), owner, action == "enable", params)
            state = "enabled" if action == "enable" else "disabled"
            print(f"{owner}: {state}" + (f" in {', '.join(map(str, changed))}; `consort generate`, `export` and "
                                         "`trace` follow it now, and the next run re-evaluates what depends on the "
                                         "merged model" if changed else " already"))
            return 0
        disabled = opted_out(workspace.resolve(), params)
    except ParamsError as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    ws = Workspace(workspace.resolve())
    info_path = ws.merged_model / MERGED_INFO
    if not info_path.exists():
        print(f"consort: no merged model in {workspace} ({info_path} is missing); run `consort run` first",
              file=sys.stderr)
        return 2
    info = read_json(info_path)
    print(f"experts of {info_path.parent} (anchor {info['anchor_hash'][:12]}, top-{info['top_k']}):")
    print(f"  {'#':>2}  {'owner':<14} {'state':<9} {'data digest':<14} anchor hash")
    for e in info["experts"]:
        state = "always" if e["index"] == 0 else "disabled" if e["owner"] in disabled else "enabled"
        print(f"  {e['index']:>2}  {e['owner']:<14} {state:<9} {e.get('data_digest', '-')[:12]:<14} "
              f"{e.get('anchor_hash', info['anchor_hash'])[:12]}")
    safety = read_json(ws.safety_results) if ws.safety_results.exists() else {}
    if safety.get("enabled"):
        print(f"refusal of {safety['configurations']['anchor']['refusal']['n']} harmful prompts "
              f"(flagged: more than {safety['flag_points']:.0f} points below the anchor's):")
        for name, c in safety["configurations"].items():
            r = c["refusal"]
            print(f"  {name:<20} {r['rate']:>4.0%} [{r['low']:.0%}, {r['high']:.0%}]  over-refusal "
                  f"{c['over_refusal']['rate']:>4.0%}" + (f"  FLAGGED ({c['points_below_anchor']:.0f} points below)"
                                                          if c["flagged"] else ""))
    return 0


def cmd_prune(workspace: Path, yes: bool) -> int:
    """Remove for good what a workspace holds of owners no longer in params.yaml."""
    from flows.workspace import removed_owner_paths
    from stages import params as P

    ws_root = workspace.resolve()
    if not (ws_root / "params.yaml").exists():
        print(f"consort: {ws_root} is no workspace (no params.yaml); run `consort run` first", file=sys.stderr)
        return 2
    stale = removed_owner_paths(ws_root, list(P.load(ws_root / "params.yaml").owners))
    if not stale:
        print(f"nothing to remove: every owner in {ws_root} is in its params.yaml")
        return 0
    for owner, paths in stale.items():
        print(f"{owner}: " + ", ".join(str(p.relative_to(ws_root)) for p in paths))
    if not yes:
        print("consort: these hold the removed owners' private data, keys and results; "
              "run again with --yes to delete them", file=sys.stderr)
        return 1
    for paths in stale.values():
        for path in paths:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"removed {', '.join(stale)}")
    return 0


def cmd_generate(prompt: str, experts: str | None, max_new_tokens: int, temperature: float, seed: int,
                 workspace: Path, params: Path | None) -> int:
    text = _generate(prompt, experts, max_new_tokens, temperature, seed, workspace, params)
    if text is None:
        return 2
    print(prompt + text)
    return 0


def cmd_export(out: Path, experts: str | None, workspace: Path, params: Path | None) -> int:
    """The shipped merged model with only the enabled experts, as a stock checkpoint with a model card."""
    from flows.workspace import Workspace, opted_out
    from stages.params import ParamsError

    ws = Workspace(workspace.resolve())
    if not ws.merged_model.exists():
        print(f"consort: no merged model in {ws.root}; run `consort run` first", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from stages.export import export_model

    try:
        disabled = opted_out(ws.root, params)
        summary, _ = export_model(ws.merged_model, ws.root / "models" / "anchor", ws.root / "published",
                               ws.root / "reports" / "eval_table.md", experts, disabled, out.resolve())
    except (ParamsError, ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    print(f"exported {ws.merged_model.name} to {out}: public + {', '.join(e['owner'] for e in summary['experts'])}"
          + (f" (left out: {', '.join(summary['left_out'])})" if summary["left_out"] else "")
          + f"; top-{summary['top_k']}, loads with AutoModelForCausalLM.from_pretrained")
    return 0


def _port(text: str) -> int:
    """A TCP port for argparse: the error names the value and the range."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1024 <= port <= 65000:
        raise argparse.ArgumentTypeError(f"{port} is outside 1024-65000 (ports below 1024 need root)")
    return port


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(workspace: Path, owners: str | None, base_port: int, host: str = "127.0.0.1", tls_cert: Path | None = None,
              tls_key: Path | None = None, allow_insecure_remote: bool = False) -> int:
    import signal

    from tracing.coordinator import start_services, stop_services
    from tracing.service import Listen

    # `kill` or a supervisor's SIGTERM must stop the owners' services too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        procs = start_services(workspace.resolve(), owners.split(",") if owners else None,
                               base_port=base_port, listen=Listen(host, 0, tls_cert, tls_key),
                               allow_insecure=allow_insecure_remote)
    except (FileNotFoundError, RuntimeError, TimeoutError, ValueError) as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    from tracing.coordinator import load_registry

    for owner, entry in load_registry(workspace.resolve()).items():
        if owner in procs:
            print(f"  {owner:<12} {entry['url']}/trace")
    print("trace services running (Ctrl-C stops them)", flush=True)
    try:
        while all(p.poll() is None for p in procs.values()):
            time.sleep(1)
        dead = [o for o, p in procs.items() if p.poll() is not None]
        print(f"consort: trace service of {', '.join(dead)} stopped", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_services(procs)


def cmd_trace(workspace: Path, text: str | None, as_json: bool, prompt: str | None, experts: str | None,
              max_new_tokens: int, temperature: float, seed: int, params: Path | None) -> int:
    import json

    from flows.workspace import Workspace, opted_out
    from stages.artifacts import merged_owners
    from stages.params import ParamsError
    from tracing.coordinator import format_trace, load_registry, trace_everywhere

    ws = Workspace(workspace.resolve())
    registry = load_registry(ws.root)
    if not registry:
        print(f"consort: no trace services recorded in {ws.root}; start them with `consort serve --workspace "
              f"{workspace}`, or record an owner's own with `consort remote-owner add`", file=sys.stderr)
        return 2
    if text is None:
        text = _generate(prompt or "", experts, max_new_tokens, temperature, seed, workspace, params)
        if text is None:
            return 2
    # The owners whose data is in the model that runs: merged (a coordinator may have merged
    # without one that failed) and not opted out.
    try:
        owners = [o for o in merged_owners(ws.merged_model) if o not in opted_out(ws.root, params)]
    except (FileNotFoundError, ParamsError) as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    result = trace_everywhere({o: e for o, e in registry.items() if o in owners}, prompt or "", text)
    for owner in owners:
        if owner not in registry:  # added after `consort serve` started
            result["owners"][owner] = {"status": "unavailable", "error": "no trace service recorded for it"}
    print(json.dumps(result, indent=2) if as_json else format_trace(result))
    down = {o: a for o, a in result["owners"].items() if a["status"] != "ok"}
    for owner, answer in down.items():
        entry = registry.get(owner, {})
        if answer.get("http_status") in (401, 403):
            fix = (f"the owner did not accept the recorded client token: record the one it issued with "
                   f"`consort remote-owner add {owner} {entry.get('url', 'URL')} --token TOKEN`")
        elif entry.get("remote"):
            fix = (f"its service at {entry['url']} did not answer as expected: ask owner {owner} to run "
                   f"`consort owner serve` (and check the URL and --ca with `consort remote-owner list`)")
        else:
            fix = f"start it with `consort serve --workspace {workspace}` (restart it after adding an owner)"
        print(f"consort: {owner} not searched: {fix}", file=sys.stderr)
    return 1 if down else 0


def _generate(prompt: str, experts: str | None, max_new_tokens: int, temperature: float, seed: int, workspace: Path,
              params: Path | None) -> str | None:
    """The merged model's continuation of `prompt` with the experts asked for (or those enabled) (None on a bad input)."""
    from flows.workspace import Workspace, opted_out

    ws = Workspace(workspace.resolve())
    if not ws.merged_model.exists():
        print(f"consort: no merged model in {ws.root}; run `consort run` first", file=sys.stderr)
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from stages.model.experts import continue_text, load_merged, merged_owners, resolve_experts

    try:
        disabled = opted_out(ws.root, params)
        chosen = resolve_experts(experts, merged_owners(ws.merged_model), disabled)
    except ValueError as err:
        print(f"consort: {err}", file=sys.stderr)
        return None
    tokenizer = AutoTokenizer.from_pretrained(ws.merged_model)
    model = load_merged(ws.merged_model, chosen)
    print(f"[experts: public, {', '.join(chosen) or '(none)'}]", file=sys.stderr)
    return continue_text(model, tokenizer, prompt, max_new_tokens, temperature, seed)


def _need_prefect_server() -> str | None:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        print("consort: PREFECT_API_URL is not set: start `consort server` and export the URL it prints",
              file=sys.stderr)
    return url


def cmd_server(workspace: Path, port: int, mlflow_port: int) -> int:
    """The coordinator's Prefect server and MLflow UI on 127.0.0.1, until Ctrl-C."""
    import signal

    from flows.remote import start_prefect_server
    from flows.workspace import Workspace

    signal.signal(signal.SIGTERM, _interrupt)
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
    try:
        while prefect.poll() is None:
            time.sleep(1)
        print(f"consort: the Prefect server stopped; see {ws.root / '.prefect-server' / 'server.log'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in (prefect, mlflow):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


def cmd_enrol(owner: str, key: Path, workspace: Path) -> int:
    from stages.package import PackageRefused, enrol_owner_key

    if not key.exists():
        print(f"consort: {key}: no such key file (the owner's `consort owner init` printed its path)", file=sys.stderr)
        return 2
    from flows.workspace import init_dvc_repo

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
    from flows.workspace import prepare_workspace, use_project_python
    from stages.params import ParamsError

    if not _need_prefect_server():
        return 2
    root = workspace.resolve()
    try:
        ws = prepare_workspace(root, preset, params, owners_remote=True)
    except ParamsError as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    _prefect_environment(root)
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
    table = ws.root / "reports" / "eval_table.md"
    if table.exists():
        print("\n" + table.read_text())
    return 0


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
    _prefect_environment(root)
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
    from flows.workspace import use_project_python

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


def owner_serve(workspace: Path, base_port: int | None, host: str, tls_cert: Path | None, tls_key: Path | None,
                allow_insecure_remote: bool) -> int:
    """The owner's own trace service: on 127.0.0.1, or on another address over TLS."""
    try:
        ws, _ = _owner_workspace(workspace, None)
    except _owner_errors() as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    return cmd_serve(workspace, ws.owner, base_port, host, tls_cert, tls_key, allow_insecure_remote)


def cmd_remote_owner(action: str, owner: str | None, url: str | None, token: str | None, ca: Path | None,
                     workspace: Path) -> int:
    """The coordinator's record of owners whose trace services run on their own machines."""
    from tracing.coordinator import add_remote_owner, load_registry, write_registry

    ws_root = workspace.resolve()
    try:
        if action == "add":
            if not owner or not url:
                raise ValueError("consort remote-owner add needs an owner name and its service's URL")
            entry = add_remote_owner(ws_root, owner, url, token, ca)
            print(f"{owner}: {entry['url']}" + (f", expecting the certificate {entry['ca']}" if entry["ca"] else ""))
        elif action == "remove":
            registry = load_registry(ws_root)
            if owner not in registry or not registry[owner].get("remote"):
                raise ValueError(f"no remote owner {owner!r} is recorded in {ws_root}")
            del registry[owner]
            write_registry(ws_root, registry)
            print(f"{owner}: removed")
        else:
            for name, entry in load_registry(ws_root).items():
                where = "remote" if entry.get("remote") else "local (consort serve)"
                print(f"  {name:<12} {entry['url']:<32} {where}" + (f"  expects {entry['ca']}" if entry.get("ca") else ""))
    except (ValueError, FileNotFoundError) as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    return 0


def owner_worker(workspace: Path, store: str) -> int:
    """A Prefect worker on the owner's pool that runs its phases when the coordinator asks."""
    if not _need_prefect_server():
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
    import signal

    import psutil

    # Prefect's worker survives SIGTERM and takes the next job: a supervisor's stop (systemd,
    # `docker stop`) must end it and the run it started, so it runs under this process, not in its place.
    signal.signal(signal.SIGTERM, _interrupt)
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


def _add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", default=None, help="owners whose experts run, e.g. code,math (default: enabled)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    p.add_argument("--params", type=Path, default=None,
                   help=BUILT_FROM)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own_version = version("consort")
    except PackageNotFoundError:  # run from a checkout that was never installed
        own_version = "unknown (not installed: run `make install`)"
    ap = argparse.ArgumentParser(prog="consort", description=__doc__)
    ap.add_argument("--version", action="version", version=f"consort {own_version}")
    level = ap.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_true",
                       help="also show each finished stage's last log lines, and Prefect's info messages")
    level.add_argument("-q", "--quiet", action="store_true", help="only failures and the run's summary")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline (only what changed runs again)")
    run.add_argument("--preset", default="default", help="a preset of params.yaml: default, smoke, ...")
    run.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE, help="where data, models and runs go")
    run.add_argument("--params", type=Path, default=None, help="params file (default: the project's params.yaml)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="run STAGE even if DVC finds it up to date (its inputs changed outside the project); repeatable")
    run.set_defaults(func=cmd_run)
    ui = sub.add_parser("ui", help="start the MLflow UI and the trace page on 127.0.0.1 for a workspace")
    ui.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    ui.add_argument("--port", type=int, default=5000, help="MLflow UI port")
    ui.add_argument("--page-port", type=int, default=8700, help="trace page port")
    ui.add_argument("--params", type=Path, default=None,
                    help=BUILT_FROM)
    ui.set_defaults(func=cmd_ui)
    ex = sub.add_parser("experts", help="list the merged model's experts, or opt an owner's expert in or out")
    ex.add_argument("action", nargs="?", choices=["list", "enable", "disable"], default="list")
    ex.add_argument("owner", nargs="?", help="the owner to enable or disable")
    ex.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    ex.add_argument("--params", type=Path, default=None, help="params file to edit (default: the one the workspace "
                    "was built from, and the workspace's own; without a workspace, the project's)")
    ex.set_defaults(func=cmd_experts)
    pr = sub.add_parser("prune", help="delete what the workspace holds of owners removed from params.yaml")
    pr.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    pr.add_argument("--yes", action="store_true", help="delete (without it, only list)")
    pr.set_defaults(func=cmd_prune)
    gen = sub.add_parser("generate", help="continue a prompt with the merged model")
    gen.add_argument("--prompt", required=True)
    _add_generation_arguments(gen)
    gen.set_defaults(func=cmd_generate)
    exp = sub.add_parser("export", help="write the merged model with only the enabled experts, for other tools")
    exp.add_argument("out", type=Path, help="the folder to write (an earlier export there is replaced)")
    exp.add_argument("--experts", default=None, help="only these owners' experts, e.g. code,news (default: the enabled)")
    exp.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    exp.add_argument("--params", type=Path, default=None,
                     help=BUILT_FROM)
    exp.set_defaults(func=cmd_export)
    serve = sub.add_parser("serve", help="start every owner's trace service (the demo's owners; 127.0.0.1 by default)")
    serve.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    serve.add_argument("--owners", default=None, help="only these owners, e.g. code,news (default: all)")
    serve.add_argument("--base-port", type=_port, default=None,
                       help="owner i listens on HOST:(BASE_PORT + i) (default: trace.base_port in params.yaml)")
    serve.set_defaults(func=cmd_serve)
    remote = sub.add_parser("remote-owner", help="record the trace service of an owner on its own machine")
    remote.add_argument("action", choices=["add", "remove", "list"])
    remote.add_argument("owner", nargs="?", help="the owner's name")
    remote.add_argument("url", nargs="?", help="its service, https://HOST:PORT")
    remote.add_argument("--token", default=None, help="the client token the owner gave the coordinator")
    remote.add_argument("--ca", type=Path, default=None,
                        help="the certificate to expect (self-signed, or its CA; default: the system's CAs)")
    remote.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    remote.set_defaults(func=cmd_remote_owner)
    tr = sub.add_parser("trace", help="trace an output back to the owners' documents (needs `consort serve`)")
    what = tr.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="generate from this prompt with the merged model, then trace the output")
    what.add_argument("--text", help="trace this text as it is")
    tr.add_argument("--json", dest="as_json", action="store_true", help="machine-readable output")
    _add_generation_arguments(tr)
    tr.set_defaults(func=cmd_trace)
    srv = sub.add_parser("server", help="the coordinator's Prefect server and MLflow UI on 127.0.0.1")
    srv.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE, help="the coordinator's workspace")
    srv.add_argument("--port", type=int, default=4200, help="Prefect API port")
    srv.add_argument("--mlflow-port", type=int, default=5000)
    srv.set_defaults(func=cmd_server)
    en = sub.add_parser("enrol", help="add an owner's public key to the coordinator's keyring")
    en.add_argument("owner")
    en.add_argument("key", type=Path, help="the owner's signing_key.pub")
    en.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE, help="the coordinator's workspace")
    en.set_defaults(func=cmd_enrol)
    co = sub.add_parser("coordinate", help="run the pipeline with each owner's stages on that owner's worker")
    co.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE, help="the coordinator's workspace")
    co.add_argument("--store", required=True, help="what the coordinator and the owners share: a folder, or "
                    "dvc:NAME for the DVC remote NAME of the workspace (dvc remote add NAME URL)")
    co.add_argument("--preset", default="default")
    co.add_argument("--params", type=Path, default=None)
    co.add_argument("--allow-missing", action="store_true", help="merge the owners that delivered if some fail")
    co.add_argument("--lost-after", type=float, default=20.0, help="seconds without a worker heartbeat = owner lost")
    co.add_argument("--owner-timeout", type=float, default=3600.0, help="seconds an owner's phase may take")
    co.set_defaults(func=cmd_coordinate)
    ow = sub.add_parser("owner", help="an owner's commands on its own machine: init, run, publish, serve, worker")
    owner_sub = ow.add_subparsers(dest="owner_command", required=True)
    oi = owner_sub.add_parser("init", help="create the owner's workspace, its stages and its key pair")
    oi.add_argument("name", help="the owner's name: a key of owners: in the params file")
    oi.add_argument("--preset", default="default")
    oi.add_argument("--params", type=Path, default=None, help="the params file the owner's section comes from")
    oi.set_defaults(func=owner_init)
    orun = owner_sub.add_parser("run", help="run the owner's stages (both phases, or --phase)")
    orun.add_argument("--store", default=None, help="fetch the public inputs from it and publish to it")
    orun.set_defaults(func=owner_run)
    opub = owner_sub.add_parser("publish", help="copy the signed expert and the numbers to the store")
    opub.add_argument("store", help="the shared store: a folder or dvc:NAME")
    opub.set_defaults(func=owner_publish)
    oserve = owner_sub.add_parser("serve", help="the owner's trace service (127.0.0.1, or another address over TLS)")
    oserve.add_argument("--base-port", type=_port, default=None, help="listen on BASE_PORT + the owner's index "
                        "(default: trace.base_port in params.yaml)")
    oserve.set_defaults(func=owner_serve)
    owork = owner_sub.add_parser("worker", help="a Prefect worker that runs the owner's phases for the coordinator")
    owork.add_argument("store", help="the shared store: a folder or dvc:NAME")
    owork.set_defaults(func=owner_worker)
    for sp in (serve, oserve):
        sp.add_argument("--host", default="127.0.0.1", help="the address to listen on (other than loopback: TLS only)")
        sp.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate the services present")
        sp.add_argument("--tls-key", type=Path, default=None, help="PEM private key of that certificate")
        sp.add_argument("--allow-insecure-remote", action="store_true",
                        help="listen on a non-loopback address without TLS (a trusted network only)")
    for sp in (oi, orun, opub, oserve, owork):
        sp.add_argument("--workspace", type=Path, required=True, help="the owner's workspace")
    for sp in (orun, opub):
        sp.add_argument("--phase", choices=["train", "evaluate", "all"], default="all")
    for parser in sub.choices.values():  # every option's help ends with its default, unless it says it already
        for action in parser._actions:
            shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
            if action.option_strings and shown and "default" not in (action.help or ""):
                action.help = f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    # transformers draws a "Loading weights" bar for every model it loads: a bar for a step that
    # takes a second says nothing (read at its import, so set before any command imports it).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ[VERBOSITY_VARIABLE] = "1" if args.verbose else "-1" if args.quiet else "0"
    if args.verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    if getattr(args, "action", None) in ("enable", "disable") and not args.owner:
        ap.error(f"consort experts {args.action} needs an owner name")
    # Each subcommand is a typed function of its options (litgpt's CLI): it gets exactly the
    # options its signature names.
    wanted = inspect.signature(args.func).parameters
    sys.exit(args.func(**{k: v for k, v in vars(args).items() if k in wanted}))


if __name__ == "__main__":
    main()
