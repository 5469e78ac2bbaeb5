"""The `consort` command. Each subcommand is a typed function of its options, grouped by who runs
it: a user on one machine (flows/commands_local.py, erasure in flows/commands_erasure.py), the
coordinator (flows/commands_coordinator.py) and an owner on its own machine (flows/commands_owner.py).
This file maps the command line onto them; an option shared by several commands is declared once,
below, and added to each as a parent.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

from flows.commands_coordinator import cmd_coordinate, cmd_enrol, cmd_server
from flows.commands_erasure import cmd_forget, cmd_withdraw
from flows.commands_local import (
    cmd_experts,
    cmd_export,
    cmd_generate,
    cmd_prune,
    cmd_remote_owner,
    cmd_run,
    cmd_serve,
    cmd_trace,
    cmd_ui,
)
from flows.commands_owner import owner_forget, owner_init, owner_publish, owner_run, owner_serve, owner_worker
from flows.console import VERBOSITY_VARIABLE

DEFAULT_WORKSPACE = Path("workspace")
# What --params means for each kind of command.
SOURCE = "params file (default: the project's params.yaml)"
BUILT_FROM = "the params file the workspace was built from (another is refused; default: the workspace's record)"
OWNER_SECTION = "the params file the owner's section comes from"
EDITED = ("params file to edit (default: the one the workspace was built from, and the workspace's own; "
          "without a workspace, the project's)")


def _group() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def workspace_option(owner: bool = False) -> argparse.ArgumentParser:
    """--workspace: a user's and the coordinator's default to ./workspace; an owner names its own."""
    group = _group()
    group.add_argument("--workspace", type=Path, required=owner, default=None if owner else DEFAULT_WORKSPACE,
                       help="the owner's workspace" if owner else "the workspace: where data, models and runs are")
    return group


def preset_option() -> argparse.ArgumentParser:
    group = _group()
    group.add_argument("--preset", default="default", help="a preset of params.yaml: default, smoke, study, ...")
    return group


def params_option(meaning: str) -> argparse.ArgumentParser:
    group = _group()
    group.add_argument("--params", type=Path, default=None, help=meaning)
    return group


def generation_options(workspace: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What generating with the merged model takes (generate, trace --prompt)."""
    group = argparse.ArgumentParser(add_help=False, parents=[workspace, params_option(BUILT_FROM)])
    group.add_argument("--experts", default=None, help="owners whose experts run, e.g. code,math (default: enabled)")
    group.add_argument("--max-new-tokens", type=int, default=40)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    group.add_argument("--seed", type=int, default=0)
    return group


def listen_options() -> argparse.ArgumentParser:
    """Where trace services listen (serve, owner serve)."""
    group = _group()
    group.add_argument("--host", default="127.0.0.1", help="the address to listen on (other than loopback: TLS only)")
    group.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate the services present")
    group.add_argument("--tls-key", type=Path, default=None, help="PEM private key of that certificate")
    group.add_argument("--allow-insecure-remote", action="store_true",
                       help="listen on a non-loopback address without TLS (a trusted network only)")
    return group


def phase_option() -> argparse.ArgumentParser:
    group = _group()
    group.add_argument("--phase", choices=["train", "evaluate", "all"], default="all")
    return group


def _port(text: str) -> int:
    """A TCP port for argparse: the error names the value and the range."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1024 <= port <= 65000:
        raise argparse.ArgumentTypeError(f"{port} is outside 1024-65000 (ports below 1024 need root)")
    return port


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own_version = version("consort")
    except PackageNotFoundError:  # run from a checkout that was never installed
        own_version = "unknown (not installed: run `make install`)"
    workspace, owner_workspace, preset = workspace_option(), workspace_option(owner=True), preset_option()
    generation, listen, phase = generation_options(workspace), listen_options(), phase_option()
    ap = argparse.ArgumentParser(prog="consort", description=__doc__)
    ap.add_argument("--version", action="version", version=f"consort {own_version}")
    level = ap.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_true",
                       help="also show each finished stage's last log lines, and Prefect's info messages")
    level.add_argument("-q", "--quiet", action="store_true", help="only failures and the run's summary")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline (only what changed runs again)",
                         parents=[preset, workspace, params_option(SOURCE)])
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="run STAGE even if DVC finds it up to date (its inputs changed outside the project); repeatable")
    run.set_defaults(func=cmd_run)
    ui = sub.add_parser("ui", help="start the MLflow UI and the trace page on 127.0.0.1 for a workspace",
                        parents=[workspace, params_option(BUILT_FROM)])
    ui.add_argument("--port", type=int, default=5000, help="MLflow UI port")
    ui.add_argument("--page-port", type=int, default=8700, help="trace page port")
    ui.set_defaults(func=cmd_ui)
    ex = sub.add_parser("experts", help="list the merged model's experts, or opt an owner's expert in or out",
                        parents=[workspace, params_option(EDITED)])
    ex.add_argument("action", nargs="?", choices=["list", "enable", "disable"], default="list")
    ex.add_argument("owner", nargs="?", help="the owner to enable or disable")
    ex.set_defaults(func=cmd_experts)
    fg = sub.add_parser("forget", help="take documents of an owner down (an erasure request): the next run "
                        "retrains without them", parents=[workspace, params_option(EDITED)])
    fg.add_argument("owner")
    fg.add_argument("ids", nargs="+", metavar="DOC_ID", help="ids as in owners/<owner>/corpus/*.jsonl")
    fg.set_defaults(func=cmd_forget)
    wd = sub.add_parser("withdraw", help="an owner leaves the consortium: out of the params, the merge, the "
                        "trace services and the registry's usable versions", parents=[workspace, params_option(EDITED)])
    wd.add_argument("owner")
    wd.set_defaults(func=cmd_withdraw)
    pr = sub.add_parser("prune", help="delete what the workspace holds of owners removed from params.yaml",
                        parents=[workspace])
    pr.add_argument("--yes", action="store_true", help="delete (without it, only list)")
    pr.set_defaults(func=cmd_prune)
    gen = sub.add_parser("generate", help="continue a prompt with the merged model", parents=[generation])
    gen.add_argument("--prompt", required=True)
    gen.set_defaults(func=cmd_generate)
    exp = sub.add_parser("export", help="write the merged model with only the enabled experts, for other tools",
                         parents=[workspace, params_option(BUILT_FROM)])
    exp.add_argument("out", type=Path, help="the folder to write (an earlier export there is replaced)")
    exp.add_argument("--experts", default=None, help="only these owners' experts, e.g. code,news (default: the enabled)")
    exp.set_defaults(func=cmd_export)
    serve = sub.add_parser("serve", help="start every owner's trace service (the demo's owners; 127.0.0.1 by default)",
                           parents=[workspace, listen])
    serve.add_argument("--owners", default=None, help="only these owners, e.g. code,news (default: all)")
    serve.add_argument("--base-port", type=_port, default=None,
                       help="owner i listens on HOST:(BASE_PORT + i) (default: trace.base_port in params.yaml)")
    serve.set_defaults(func=cmd_serve)
    remote = sub.add_parser("remote-owner", help="record the trace service of an owner on its own machine",
                            parents=[workspace])
    remote.add_argument("action", choices=["add", "remove", "list"])
    remote.add_argument("owner", nargs="?", help="the owner's name")
    remote.add_argument("url", nargs="?", help="its service, https://HOST:PORT")
    remote.add_argument("--token", default=None, help="the client token the owner gave the coordinator")
    remote.add_argument("--ca", type=Path, default=None,
                        help="the certificate to expect (self-signed, or its CA; default: the system's CAs)")
    remote.set_defaults(func=cmd_remote_owner)
    tr = sub.add_parser("trace", help="trace an output back to the owners' documents (needs `consort serve`)",
                        parents=[generation])
    what = tr.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="generate from this prompt with the merged model, then trace the output")
    what.add_argument("--text", help="trace this text as it is")
    tr.add_argument("--json", dest="as_json", action="store_true", help="machine-readable output")
    tr.set_defaults(func=cmd_trace)
    srv = sub.add_parser("server", help="the coordinator's Prefect server and MLflow UI on 127.0.0.1",
                         parents=[workspace])
    srv.add_argument("--port", type=int, default=4200, help="Prefect API port")
    srv.add_argument("--mlflow-port", type=int, default=5000)
    srv.set_defaults(func=cmd_server)
    en = sub.add_parser("enrol", help="add an owner's public key to the coordinator's keyring", parents=[workspace])
    en.add_argument("owner")
    en.add_argument("key", type=Path, help="the owner's signing_key.pub")
    en.set_defaults(func=cmd_enrol)
    co = sub.add_parser("coordinate", help="run the pipeline with each owner's stages on that owner's worker",
                        parents=[preset, workspace, params_option(SOURCE)])
    co.add_argument("--store", required=True, help="what the coordinator and the owners share: a folder, or "
                    "dvc:NAME for the DVC remote NAME of the workspace (dvc remote add NAME URL)")
    co.add_argument("--allow-missing", action="store_true", help="merge the owners that delivered if some fail")
    co.add_argument("--lost-after", type=float, default=20.0, help="seconds without a worker heartbeat = owner lost")
    co.add_argument("--owner-timeout", type=float, default=3600.0, help="seconds an owner's phase may take")
    co.set_defaults(func=cmd_coordinate)
    ow = sub.add_parser("owner", help="an owner's commands on its own machine: init, run, publish, serve, worker")
    owner_sub = ow.add_subparsers(dest="owner_command", required=True)
    oi = owner_sub.add_parser("init", help="create the owner's workspace, its stages and its key pair",
                              parents=[preset, owner_workspace, params_option(OWNER_SECTION)])
    oi.add_argument("name", help="the owner's name: a key of owners: in the params file")
    oi.set_defaults(func=owner_init)
    orun = owner_sub.add_parser("run", help="run the owner's stages (both phases, or --phase)",
                                parents=[owner_workspace, phase])
    orun.add_argument("--store", default=None, help="fetch the public inputs from it and publish to it")
    orun.set_defaults(func=owner_run)
    opub = owner_sub.add_parser("publish", help="copy the signed expert and the numbers to the store",
                                parents=[owner_workspace, phase])
    opub.add_argument("store", help="the shared store: a folder or dvc:NAME")
    opub.set_defaults(func=owner_publish)
    ofg = owner_sub.add_parser("forget", help="take documents down: the next owner run retrains without them",
                               parents=[owner_workspace])
    ofg.add_argument("ids", nargs="+", metavar="DOC_ID", help="ids as in the owner's corpus/*.jsonl")
    ofg.add_argument("--reason", default=None, help="kept with the request in the owner's workspace only")
    ofg.set_defaults(func=owner_forget)
    oserve = owner_sub.add_parser("serve", help="the owner's trace service (127.0.0.1, or another address over TLS)",
                                  parents=[owner_workspace, listen])
    oserve.add_argument("--base-port", type=_port, default=None, help="listen on BASE_PORT + the owner's index "
                        "(default: trace.base_port in params.yaml)")
    oserve.set_defaults(func=owner_serve)
    owork = owner_sub.add_parser("worker", help="a Prefect worker that runs the owner's phases for the coordinator",
                                 parents=[owner_workspace])
    owork.add_argument("store", help="the shared store: a folder or dvc:NAME")
    owork.set_defaults(func=owner_worker)
    # Every option's help ends with its default, unless it says it already.
    for parser in [*sub.choices.values(), *owner_sub.choices.values()]:
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
