"""A user's commands on one machine: run the pipeline, look at it (ui, experts), use the merged
model (generate, export, trace) and the owners' trace services (serve, remote-owner). Each is a
typed function of its options; flows/cli.py maps the command line onto them.

Each imports what it uses inside its body: Prefect, MLflow and torch take seconds to import, a
refused argument should not.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from flows.commands_erasure import pending_takedown, takedown_lines
from flows.console import verbosity
from flows.prefect_env import prefect_environment
from stages.artifacts import MERGED_INFO


def cmd_run(workspace: Path, preset: str, params: Path | None, force: list[str]) -> int:
    from flows.repository import commit_baseline, use_project_python
    from flows.workspace import prepare_workspace
    from stages.params import ParamsError

    root = workspace.resolve()
    try:
        ws = prepare_workspace(root, preset, params)
    except ParamsError as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    prefect_environment(root)  # after the params are known good: bad ones leave no workspace behind
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
    table = ws.reports / "eval_table.md"
    if table.exists() and verbosity() >= 0:
        print("\nheld-out loss per domain (nats/token; bpb = bits per byte):\n")
        print(table.read_text())
        print(f"report (tables, opt-out heat map, loss curves): {table.parent / 'report.html'}\n")
    print(f"lineage: `consort ui --workspace {workspace}` opens the MLflow UI "
          f"(store {ws.tracking_uri})")
    return 0


def cmd_ui(workspace: Path, params: Path | None, port: int, page_port: int) -> int:
    from flows.layout import Workspace
    from flows.params_file import opted_out
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
    from flows.processes import stop_on_sigterm, supervise

    stop_on_sigterm()  # each server runs in a process group of its own (mlflow starts workers): both are ended
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
    except KeyboardInterrupt:
        from tracing.coordinator import stop_services

        stop_services(procs)
        return 0
    return supervise(procs, "consort: the {names} stopped (is its port taken?)")


def cmd_experts(action: str, owner: str | None, workspace: Path, params: Path | None) -> int:
    from flows.layout import Workspace
    from flows.params_file import opted_out, set_workspace_expert_enabled
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
    for line in takedown_lines(ws, [e["owner"] for e in info["experts"][1:]]):
        print(line)
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
    from flows.layout import Workspace
    from flows.params_file import opted_out
    from stages.params import ParamsError

    ws = Workspace(workspace.resolve())
    if not ws.merged_model.exists():
        print(f"consort: no merged model in {ws.root}; run `consort run` first", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from stages.export import export_model

    try:
        disabled = opted_out(ws.root, params)
        from stages.artifacts import merged_owners
        from stages.model.experts import resolve_experts

        refused = pending_takedown(ws, resolve_experts(experts, merged_owners(ws.merged_model), disabled))
        if refused:
            raise ValueError(refused)
        summary = export_model(ws.merged_model, ws.root / "models" / "anchor", ws.root / "published",
                               ws.reports / "eval_table.md", experts, disabled, out.resolve())
    except (ParamsError, ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    print(f"exported {ws.merged_model.name} to {out}: public + {', '.join(e['owner'] for e in summary['experts'])}"
          + (f" (left out: {', '.join(summary['left_out'])})" if summary["left_out"] else "")
          + f"; top-{summary['top_k']}, loads with AutoModelForCausalLM.from_pretrained")
    return 0


def cmd_serve(workspace: Path, owners: str | None, base_port: int, host: str = "127.0.0.1", tls_cert: Path | None = None,
              tls_key: Path | None = None, allow_insecure_remote: bool = False) -> int:
    from flows.processes import stop_on_sigterm, supervise
    from tracing.coordinator import start_services
    from tracing.service import Listen

    stop_on_sigterm()  # the owners' services too, as Ctrl-C does
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
    return supervise(procs, "consort: trace service of {names} stopped")


def cmd_trace(workspace: Path, text: str | None, as_json: bool, prompt: str | None, experts: str | None,
              max_new_tokens: int, temperature: float, seed: int, params: Path | None) -> int:
    import json

    from flows.layout import Workspace
    from flows.params_file import opted_out
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
    from flows.layout import Workspace
    from flows.params_file import opted_out

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
    refused = pending_takedown(ws, chosen)
    if refused:
        print(f"consort: {refused}", file=sys.stderr)
        return None
    tokenizer = AutoTokenizer.from_pretrained(ws.merged_model)
    model = load_merged(ws.merged_model, chosen)
    print(f"[experts: public, {', '.join(chosen) or '(none)'}]", file=sys.stderr)
    return continue_text(model, tokenizer, prompt, max_new_tokens, temperature, seed)


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
