"""The `consort` command: subcommands map onto the pipeline flow and the tools around it."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_WORKSPACE = Path("workspace")


def _prefect_environment(ws_root: Path) -> None:
    """Settings Prefect reads at import: keep its state in the workspace, start-up tolerant, offline."""
    os.environ.setdefault("PREFECT_HOME", str(ws_root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_run(args: argparse.Namespace) -> int:
    from stages.params import ParamsError

    from flows.workspace import prepare_workspace, use_project_python

    root = args.workspace.resolve()
    _prefect_environment(root)
    try:
        ws = prepare_workspace(root, args.preset, args.params)
    except ParamsError as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    use_project_python()
    os.chdir(ws.root)  # DVC resolves stage paths against the working directory
    from flows.pipeline import pipeline

    t0 = time.perf_counter()
    print(f"consort: running the {args.preset!r} pipeline in {ws.root}")
    try:
        results = pipeline(str(ws.root), args.preset, force=args.force)
    except (RuntimeError, ValueError) as err:
        print(f"\nconsort: {err}", file=sys.stderr)
        return 1
    print("\nstages:")
    for r in results:
        print(f"  {'ran   ' if r['ran'] else 'cached'} {r['stage']:<28} {r['seconds']:7.1f} s")
    print(f"\npipeline finished in {time.perf_counter() - t0:.0f} s "
          f"({sum(r['ran'] for r in results)} of {len(results)} stages ran)")
    print(f"\nmerged model: {ws.merged_model}")
    table = ws.root / "reports" / "eval_table.md"
    if table.exists():
        print("\nheld-out loss per domain (nats/token; bpb = bits per byte):\n")
        print(table.read_text())
    print(f"lineage: `consort ui --workspace {args.workspace}` opens the MLflow UI "
          f"(store {ws.tracking_uri})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from flows.workspace import Workspace

    ws = Workspace(args.workspace.resolve())
    if not (ws.root / "mlflow.db").exists():
        print(f"consort: no MLflow store in {ws.root}; run `consort run` first", file=sys.stderr)
        return 2
    url = f"http://127.0.0.1:{args.port}"
    print(f"MLflow UI for {ws.root}: {url}  (Ctrl-C stops it)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", ws.tracking_uri,
           "--default-artifact-root", ws.artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(args.port),
           "--workers", "1"]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="consort", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline (only what changed runs again)")
    run.add_argument("--preset", default="default", help="a preset of params.yaml: default, smoke, ...")
    run.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE, help="where data, models and runs go")
    run.add_argument("--params", type=Path, default=None, help="params file (default: the project's params.yaml)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="run STAGE even if DVC finds it up to date (after a code change); repeatable")
    run.set_defaults(func=cmd_run)
    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for a workspace")
    ui.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
