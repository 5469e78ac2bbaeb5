"""The pipeline's console: what a stage did (ran, restored from DVC's run cache, up to date) and
its output kept in its own log, on a real DVC repo whose stage calls the stages' start-up."""
import inspect
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT
from dvc.repo import Repo

from flows import pipeline as pipeline_module
from flows.console import StageConsole, last_line, log_tail
from flows.prefect_env import prefect_environment
from stages.runtime import LOGS_VARIABLE, log_file

STAGE_SCRIPT = """
import sys
from stages.runtime import start_stage
start_stage()
text = open("in.txt").read()
print("copying", text, file=sys.stderr)
if text == "fail":
    raise SystemExit("in.txt says fail")
open("out.txt", "w").write(text)
"""


def _repo(tmp_path: Path) -> Path:
    (tmp_path / "copy.py").write_text(STAGE_SCRIPT)
    (tmp_path / "in.txt").write_text("A")
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  copy:\n    cmd: {sys.executable} copy.py\n    deps: [in.txt, copy.py]\n    outs: [out.txt]\n")
    Repo.init(str(tmp_path), no_scm=True)
    return tmp_path


def test_a_stage_that_ran_restored_or_was_up_to_date_says_which(tmp_path, monkeypatch):
    root = _repo(tmp_path)
    monkeypatch.chdir(root)
    monkeypatch.setenv(LOGS_VARIABLE, "1")
    monkeypatch.setenv("PYTHONPATH", str(PROJECT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    shown = io.StringIO()
    monkeypatch.setattr(pipeline_module, "_console", StageConsole(root, shown))
    assert pipeline_module.reproduce_stage(root, "copy")[0] == "ran"
    assert "copying A" in log_file(root, "copy").read_text()  # the stage's output went to its log
    (root / "in.txt").write_text("B")
    assert pipeline_module.reproduce_stage(root, "copy")[0] == "ran"
    (root / "in.txt").write_text("A")  # outputs for these inputs are in DVC's run cache
    assert pipeline_module.reproduce_stage(root, "copy")[0] == "restored"
    assert (root / "out.txt").read_text() == "A"
    assert pipeline_module.reproduce_stage(root, "copy")[0] == "cached"
    lines = [line.split() for line in shown.getvalue().splitlines()]
    assert [w[0] for w in lines if w[0] != "started"] == ["ran", "ran", "restored"]  # up to date: no line

    (root / "in.txt").write_text("fail")
    try:
        pipeline_module.reproduce_stage(root, "copy")
    except Exception:
        pass
    else:
        raise AssertionError("a failing stage must raise")
    failed = shown.getvalue().split("FAILED")[1]
    assert "in.txt says fail" in failed and str(log_file(root, "copy")) in failed


def test_a_stage_dvc_cannot_start_names_the_root_cause(tmp_path, monkeypatch):
    root = _repo(tmp_path)
    monkeypatch.chdir(root)
    (root / "params.yaml").write_text("merge: {}\n")  # the stage tracks merge.top_k, which is not there
    text = (root / "dvc.yaml").read_text().replace("    outs:", "    params: [merge.top_k]\n    outs:")
    (root / "dvc.yaml").write_text(text)
    try:
        pipeline_module.reproduce_stage(root, "copy")
    except Exception as err:
        cause = pipeline_module.failure_cause(root, "copy", err)
    else:
        raise AssertionError("a stage with a missing param must fail")
    assert cause.startswith("MissingParamsError") and "merge.top_k" in cause, cause


def test_the_newest_progress_line_is_read_through_carriage_returns(tmp_path):
    log = tmp_path / "x.log"
    log.write_bytes(b"loading\nexpert code:  10%|#   | 1/10\rexpert code:  50%|##  | 5/10\r")
    assert last_line(log) == "expert code:  50%|##  | 5/10"
    assert log_tail(log).splitlines() == ["loading", "expert code:  50%|##  | 5/10"]
    assert last_line(tmp_path / "missing.log") == ""
    log.write_bytes(b"expert code:  50%|##  | 5/10\r\nUserWarning: a warning after the bar\n")
    assert last_line(log) == "expert code:  50%|##  | 5/10"


def test_quiet_shows_only_failures_and_verbose_adds_each_stage_log_tail(tmp_path, monkeypatch):
    from flows.console import VERBOSITY_VARIABLE

    log = log_file(tmp_path, "train_expert@news")
    log.parent.mkdir(parents=True)
    log.write_text("loading the anchor\nexpert news: 100%|####| 4/4 [00:01<00:00]\n")
    shown = {}
    for level in ("-1", "0", "1"):
        monkeypatch.setenv(VERBOSITY_VARIABLE, level)
        out = io.StringIO()
        with StageConsole(tmp_path, out) as console:
            console.started("train_expert@news")
            console.finished("train_expert@news", "ran", 1.0)
            console.finished("audit@news", "failed", 2.0)
        shown[level] = out.getvalue()
    assert "started" not in shown["-1"] and "train_expert@news" not in shown["-1"] and "FAILED" in shown["-1"]
    assert "started" in shown["0"] and "ran" in shown["0"] and "loading the anchor" not in shown["0"]
    assert "loading the anchor" in shown["1"] and "FAILED" in shown["1"]


def test_the_cli_maps_each_subcommand_onto_a_typed_function():
    from flows.cli import build_parser, owner_publish

    args = build_parser().parse_args(["-q", "owner", "publish", "/store", "--workspace", "/ws", "--phase", "train"])
    assert args.func is owner_publish and args.quiet
    wanted = inspect.signature(args.func).parameters
    assert {k: v for k, v in vars(args).items() if k in wanted} == {"store": "/store", "workspace": Path("/ws"),
                                                                   "phase": "train"}


def test_prefect_processes_drop_the_server_pools_shutdown_noise_and_keep_other_errors(tmp_path, monkeypatch):
    # The ephemeral server is a child process that reads its logging config from the environment;
    # a child set up the same way shows what a run's console would show.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    monkeypatch.setattr(os, "environ", env)
    prefect_environment(tmp_path)
    probe = ("from prefect.logging.configuration import setup_logging\n"
             "import logging\n"
             "setup_logging()\n"
             "logging.getLogger('sqlalchemy.pool.impl.AsyncAdaptedQueuePool').error('cancelled mid-rollback')\n"
             "logging.getLogger('sqlalchemy.pool.impl.QueuePool').error('a store error')\n"
             "logging.getLogger('prefect.server').critical('a server crash')\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert "cancelled mid-rollback" not in out.stderr
    assert "a store error" in out.stderr and "a server crash" in out.stderr


def test_every_command_takes_one_workspace_option_and_an_owner_must_name_its_own():
    import argparse

    from flows.cli import DEFAULT_WORKSPACE, build_parser

    def commands(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from commands(child, (*prefix, name))
        if prefix and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            yield prefix, parser

    found = dict(commands(build_parser()))
    assert len(found) == 20
    for name, parser in found.items():
        (option,) = [a for a in parser._actions if "--workspace" in a.option_strings]
        if name[0] == "owner":
            assert option.required and option.help == "the owner's workspace", name
            with pytest.raises(SystemExit):
                build_parser().parse_args([*name, *(["x"] if name[-1] in ("publish", "worker", "init") else [])])
        else:
            assert option.default == DEFAULT_WORKSPACE and option.help.startswith("the workspace: "), name
