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
    from flows.workspace import prepare_workspace, use_project_python
    from stages.params import ParamsError

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
        print(f"report (tables, opt-out heat map, loss curves): {table.parent / 'report.html'}\n")
    print(f"lineage: `consort ui --workspace {args.workspace}` opens the MLflow UI "
          f"(store {ws.tracking_uri})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from flows.workspace import PROJECT_ROOT, Workspace

    ws = Workspace(args.workspace.resolve())
    if not (ws.root / "mlflow.db").exists():
        print(f"consort: no MLflow store in {ws.root}; run `consort run` first", file=sys.stderr)
        return 2
    # The trace page reads opt-outs from the project's params, as `consort generate` does.
    page = subprocess.Popen([sys.executable, "-m", "tracing.page", "--workspace", str(ws.root),
                             "--port", str(args.page_port), "--params", str(args.params or PROJECT_ROOT / "params.yaml"),
                             "--preset", args.preset])
    print(f"MLflow UI for {ws.root}: http://127.0.0.1:{args.port}", flush=True)
    print(f"trace page: http://127.0.0.1:{args.page_port}  (needs `consort serve --workspace {args.workspace}`)"
          "  (Ctrl-C stops both)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", ws.tracking_uri,
           "--default-artifact-root", ws.artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(args.port),
           "--workers", "1"]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
    finally:
        page.terminate()
        page.wait(timeout=10)


def cmd_experts(args: argparse.Namespace) -> int:
    from flows.workspace import Workspace, read_project_params, set_expert_enabled
    from stages.experts import MERGED_INFO
    from stages.io import read_json
    from stages.params import ParamsError, resolve

    try:
        if args.action in ("enable", "disable"):
            changed = set_expert_enabled(args.owner, args.action == "enable", args.params)
            state = "enabled" if args.action == "enable" else "disabled"
            print(f"{args.owner}: {state}" + ("" if changed else " already") +
                  ("; `consort run` re-runs what depends on the merged model" if changed else ""))
            return 0
        disabled = resolve(read_project_params(args.params), args.preset)["inference"]["disabled"]
    except ParamsError as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    info_path = Workspace(args.workspace.resolve()).merged_model / MERGED_INFO
    if not info_path.exists():
        print(f"consort: no merged model in {args.workspace} ({info_path} is missing); run `consort run` first",
              file=sys.stderr)
        return 2
    info = read_json(info_path)
    print(f"experts of {info_path.parent} (anchor {info['anchor_hash'][:12]}, top-{info['top_k']}):")
    print(f"  {'#':>2}  {'owner':<14} {'state':<9} {'data digest':<14} anchor hash")
    for e in info["experts"]:
        state = "always" if e["index"] == 0 else "disabled" if e["owner"] in disabled else "enabled"
        print(f"  {e['index']:>2}  {e['owner']:<14} {state:<9} {e.get('data_digest', '-')[:12]:<14} "
              f"{e.get('anchor_hash', info['anchor_hash'])[:12]}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    text = _generate(args)
    if text is None:
        return 2
    print(args.prompt + text)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from tracing.coordinator import start_services, stop_services

    # `kill` or a supervisor's SIGTERM must stop the owners' services too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        procs = start_services(args.workspace.resolve(), args.owners.split(",") if args.owners else None)
    except (FileNotFoundError, RuntimeError, TimeoutError, ValueError) as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    from tracing.coordinator import load_registry

    for owner, entry in load_registry(args.workspace.resolve()).items():
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


def cmd_trace(args: argparse.Namespace) -> int:
    import json

    from tracing.coordinator import format_trace, load_registry, trace_everywhere

    ws_root = args.workspace.resolve()
    registry = load_registry(ws_root)
    if not registry:
        print(f"consort: no trace services recorded in {ws_root}; start them with `consort serve --workspace "
              f"{args.workspace}`", file=sys.stderr)
        return 2
    prompt, text = args.prompt or "", args.text
    if text is None:
        text = _generate(args)
        if text is None:
            return 2
    result = trace_everywhere(registry, prompt, text)
    print(json.dumps(result, indent=2) if args.json else format_trace(result))
    return 0


def _generate(args: argparse.Namespace) -> str | None:
    """The merged model's continuation of args.prompt with the experts args allow (None on a bad input)."""
    from flows.workspace import Workspace, read_project_params

    ws = Workspace(args.workspace.resolve())
    if not ws.merged_model.exists():
        print(f"consort: no merged model in {ws.root}; run `consort run` first", file=sys.stderr)
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from stages.experts import continue_text, load_merged, merged_owners, resolve_experts
    from stages.params import resolve

    try:
        disabled = resolve(read_project_params(args.params), args.preset)["inference"]["disabled"]
        experts = resolve_experts(args.experts, merged_owners(ws.merged_model), disabled)
    except ValueError as err:
        print(f"consort: {err}", file=sys.stderr)
        return None
    tokenizer = AutoTokenizer.from_pretrained(ws.merged_model)
    model = load_merged(ws.merged_model, experts)
    print(f"[experts: public, {', '.join(experts) or '(none)'}]", file=sys.stderr)
    return continue_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed)


def _add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", default=None, help="owners whose experts run, e.g. code,math (default: enabled)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    p.add_argument("--params", type=Path, default=None, help="params file with the opt-outs (default: the project's)")
    p.add_argument("--preset", default="default")


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
    ui = sub.add_parser("ui", help="start the MLflow UI and the trace page on 127.0.0.1 for a workspace")
    ui.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    ui.add_argument("--port", type=int, default=5000, help="MLflow UI port")
    ui.add_argument("--page-port", type=int, default=8700, help="trace page port")
    ui.add_argument("--params", type=Path, default=None, help="params file with the opt-outs (default: the project's)")
    ui.add_argument("--preset", default="default")
    ui.set_defaults(func=cmd_ui)
    ex = sub.add_parser("experts", help="list the merged model's experts, or opt an owner's expert in or out")
    ex.add_argument("action", nargs="?", choices=["list", "enable", "disable"], default="list")
    ex.add_argument("owner", nargs="?", help="the owner to enable or disable")
    ex.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    ex.add_argument("--params", type=Path, default=None, help="params file to edit (default: the project's)")
    ex.add_argument("--preset", default="default")
    ex.set_defaults(func=cmd_experts)
    gen = sub.add_parser("generate", help="continue a prompt with the merged model")
    gen.add_argument("--prompt", required=True)
    _add_generation_arguments(gen)
    gen.set_defaults(func=cmd_generate)
    serve = sub.add_parser("serve", help="start every owner's trace service on 127.0.0.1 (the demo's owners)")
    serve.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    serve.add_argument("--owners", default=None, help="only these owners, e.g. code,news (default: all)")
    serve.set_defaults(func=cmd_serve)
    tr = sub.add_parser("trace", help="trace an output back to the owners' documents (needs `consort serve`)")
    what = tr.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="generate from this prompt with the merged model, then trace the output")
    what.add_argument("--text", help="trace this text as it is")
    tr.add_argument("--json", action="store_true", help="machine-readable output")
    _add_generation_arguments(tr)
    tr.set_defaults(func=cmd_trace)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if getattr(args, "action", None) in ("enable", "disable") and not args.owner:
        ap.error(f"consort experts {args.action} needs an owner name")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
