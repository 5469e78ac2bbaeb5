"""Stages forked from a pre-imported interpreter (flows/stage_server.py) behave as `python -m` would."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT
from transformers import AutoTokenizer

from flows import stage_server
from stages import params as P
from stages.runtime import LOGS_VARIABLE, failure_file, log_file


def shell(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """As DVC runs a stage's command: through the shell, `python` looked up on PATH."""
    return subprocess.run(command, shell=True, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A stage server for a workspace folder, up and accepting (the pipeline never waits for it)."""
    ws = tmp_path_factory.mktemp("ws")
    resolved = P.resolve(yaml.safe_load((PROJECT / "params.yaml").read_text()), "smoke")
    (ws / "params.yaml").write_text(yaml.safe_dump(resolved))  # the smoke preset's tokenizer: trained, no wheel
    corpus = ws / "train.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": f"The quick brown fox {i} jumps over the dog."}) + "\n"
                              for i in range(300)))
    log = ws / "server.log"
    with stage_server.running(ws, log):
        deadline = time.monotonic() + 120
        while not Path(os.environ[stage_server.SERVER_VARIABLE]).exists():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield ws, log


def test_a_stage_run_in_a_fork_writes_what_a_separate_interpreter_writes(server):
    ws, log = server
    command = "python -m stages.train_tokenizer --corpus train.jsonl --out {out} --cache cache"
    forked = shell(command.format(out="forked"), ws)
    assert forked.returncode == 0, forked.stderr
    assert "forked" in log.read_text().splitlines()[-1] and "stages.train_tokenizer" in log.read_text()
    alone = shell(command.format(out="alone"), ws, **{stage_server.SERVER_VARIABLE: "off"})
    assert alone.returncode == 0, alone.stderr
    assert log.read_text().count("stages.train_tokenizer") == 1  # the second ran in an interpreter of its own
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (ws / "forked" / name).read_bytes() == (ws / "alone" / name).read_bytes()
    vocab = yaml.safe_load((ws / "params.yaml").read_text())["tokenizer"]["vocab_size"]
    assert len(AutoTokenizer.from_pretrained(ws / "forked")) == vocab  # a whole tokenizer, as the stage trains it


def test_a_failing_stage_in_a_fork_exits_nonzero_and_records_its_cause(server):
    ws, _ = server
    stage = "train_tokenizer"
    failed = shell("python -m stages.train_tokenizer --corpus missing.jsonl --out never --cache cache", ws,
                   DVC_STAGE=f"dvc.yaml:{stage}", **{LOGS_VARIABLE: "1"})
    assert failed.returncode == 1
    assert "missing.jsonl" in failure_file(ws, stage).read_text()  # stages/runtime.py's hook ran in the fork
    assert "Traceback" in log_file(ws, stage).read_text()  # the stage's output went to its own log
    assert not (ws / "never").exists()
    usage = shell("python -m stages.evaluate --no-such-flag", ws)
    assert usage.returncode == 2 and "the following arguments are required" in usage.stderr


def test_other_commands_run_in_the_real_interpreter(server):
    ws, log = server
    before = log.read_text()
    other = shell("python -c 'import sys; print(sys.argv)' -m stages.io", ws)
    assert other.returncode == 0 and other.stdout.strip() == "['-c', '-m', 'stages.io']"
    assert log.read_text() == before


def test_a_stage_whose_caller_dies_is_killed(server):
    ws, log = server
    forks = len(log.read_text().splitlines())
    # A stage that waits for input for ever, its client killed as DVC kills a stage it stops.
    client = subprocess.Popen("exec python -m stages.train_tokenizer --corpus /dev/stdin --out never --cache cache",
                              shell=True, cwd=ws, stdin=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(log.read_text().splitlines()) == forks:
        assert time.monotonic() < deadline, "the server never forked the stage"
        time.sleep(0.1)
    child = Path("/proc") / log.read_text().splitlines()[-1].split()[1].rstrip(":")
    assert child.exists()
    client.kill()
    client.wait()
    while child.exists():
        assert time.monotonic() < deadline, "the stage outlived its caller"
        time.sleep(0.1)
