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
    from flows.workspace import Workspace, read_project_params

    ws = Workspace(args.workspace.resolve())
    if not ws.merged_model.exists():
        print(f"consort: no merged model in {ws.root}; run `consort run` first", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer

    from stages.experts import load_merged, merged_owners, resolve_experts
    from stages.params import resolve

    try:
        # The project's params, not the workspace's copy: an opt-out counts from the moment it is made.
        disabled = resolve(read_project_params(args.params), args.preset)["inference"]["disabled"]
        experts = resolve_experts(args.experts, merged_owners(ws.merged_model), disabled)
    except ValueError as err:  # ParamsError included
        print(f"consort: {err}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(ws.merged_model)
    model = load_merged(ws.merged_model, experts)
    torch.manual_seed(args.seed)
    ids = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature or None, top_p=0.95 if args.temperature > 0 else None,
                         pad_token_id=tokenizer.eos_token_id)
    print(f"[experts: public, {', '.join(experts) or '(none)'}]", file=sys.stderr)
    print(args.prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
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
    ex = sub.add_parser("experts", help="list the merged model's experts, or opt an owner's expert in or out")
    ex.add_argument("action", nargs="?", choices=["list", "enable", "disable"], default="list")
    ex.add_argument("owner", nargs="?", help="the owner to enable or disable")
    ex.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    ex.add_argument("--params", type=Path, default=None, help="params file to edit (default: the project's)")
    ex.add_argument("--preset", default="default")
    ex.set_defaults(func=cmd_experts)
    gen = sub.add_parser("generate", help="continue a prompt with the merged model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--experts", default=None, help="owners whose experts run, e.g. code,math (default: enabled)")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE)
    gen.add_argument("--params", type=Path, default=None, help="params file with the opt-outs (default: the project's)")
    gen.add_argument("--preset", default="default")
    gen.set_defaults(func=cmd_generate)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if getattr(args, "action", None) in ("enable", "disable") and not args.owner:
        ap.error(f"consort experts {args.action} needs an owner name")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
