"""Training under torchrun: two CPU processes (gloo), with DDP or FSDP, compute what one process computes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import PROJECT, kill_tree
from safetensors.torch import load_file

from flows.params_file import read_project_params
from stages import params as P
from stages.package import create_owner_key
from stages.train import distributed

GRAD_CLIP = 0.05


def _params(tmp_path, **expert_train) -> str:
    raw = P.resolve(read_project_params(), "smoke")
    # A clip below the gradients' norm, so that clipping (over shards and whole tensors alike) acts.
    raw["anchor"]["train"].update(steps=8, checkpoint_every=100, grad_clip=GRAD_CLIP)
    raw["expert"]["train"].update({"steps": 6, "batch_size": 8, "checkpoint_every": 100, "grad_clip": GRAD_CLIP,
                                   **expert_train})
    raw["owners"]["code"].pop("dp", None)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


# (name, processes, CONSORT_DATA_PARALLEL)
LAUNCHES = [("one", 1, "ddp"), ("ddp", 2, "ddp"), ("fsdp", 2, "fsdp")]


def _command(args: list[str], processes: int, parallel: str) -> tuple[list[str], dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CONSORT_DATA_PARALLEL=parallel)
    return [*launcher, "-m", *args], env


def _run(args: list[str], processes: int, parallel: str = "ddp") -> None:
    command, env = _command(args, processes, parallel)
    proc = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _expert_args(root, corpus, key, params, out, name) -> list[str]:
    return ["stages.train_expert", "code", "--corpus", str(corpus), "--public-corpus", str(root / "public.jsonl"),
            "--anchor", str(root / "anchor"), "--public-embedding", str(root / "emb"),
            "--out", str(out / f"expert_{name}"), "--metrics", str(out / f"expert_{name}.json"),
            "--train-log", str(out / f"expert_{name}.jsonl"), "--checkpoint", str(out / f"e_{name}.pt"),
            "--signing-key", str(key), "--params", params]


def _owner_corpus(tmp_path):
    corpus = tmp_path / "owner.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n"
                              for i in range(60)))
    # The curriculum scores each stage on the held-out text beside the corpus.
    corpus.with_name("val.jsonl").write_text("".join(json.dumps({"text": f"def g{i}(y):\n    return y - {i}\n"}) + "\n"
                                                     for i in range(20)))
    return corpus, create_owner_key(tmp_path / "keys").with_name("signing_key.pem")


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow  # two torchrun processes: 53 s (2026-12-07)
def test_anchor_and_expert_train_the_same_on_two_processes(tiny_anchor_dir, tmp_path):
    root, _, _ = tiny_anchor_dir
    params = _params(tmp_path)
    corpus, key = _owner_corpus(tmp_path)
    for name, processes, parallel in LAUNCHES:
        _run(["stages.train_anchor", "--corpus", str(root / "public.jsonl"), "--tokenizer", str(root / "tok"),
              "--out", str(tmp_path / f"anchor_{name}"), "--metrics", str(tmp_path / f"anchor_{name}.json"),
              "--train-log", str(tmp_path / f"anchor_{name}.jsonl"), "--checkpoint", str(tmp_path / f"a_{name}.pt"),
              "--params", params], processes, parallel)
        _run(_expert_args(root, corpus, key, params, tmp_path, name), processes, parallel)
    for model in ("anchor", "expert"):
        one = _weights(tmp_path / f"{model}_one")
        rows = {name: [json.loads(line) for line in (tmp_path / f"{model}_{name}.jsonl").read_text().splitlines()]
                for name, _, _ in LAUNCHES}
        logs = {name: [r["loss"] for r in log] for name, log in rows.items()}
        assert all(r["grad_norm"] > GRAD_CLIP for log in rows.values() for r in log)  # clipped every step
        for name in ("ddp", "fsdp"):
            other = _weights(tmp_path / f"{model}_{name}")
            assert one.keys() == other.keys()
            worst = max((one[k] - other[k]).abs().max().item() for k in one)
            assert worst < 1e-4, (model, name, worst)
            assert logs[name] == pytest.approx(logs["one"], abs=1e-4)  # logged on the global batch
    # The comparison means something: the owner's expert did move away from its public twin.
    anchor = _weights(root / "anchor")
    expert = _weights(tmp_path / "expert_fsdp")
    for i in range(2):
        dense = f"model.layers.{i}.mlp."
        start = torch.cat([anchor[dense + "gate_proj.weight"], anchor[dense + "up_proj.weight"]])
        assert (expert[f"layers.{i}.gate_up_proj"] - start).abs().max() > 1e-4


@pytest.mark.slow  # two torchrun processes killed and restarted: 32 s (2026-12-07)
def test_fsdp_training_killed_mid_run_resumes_from_its_checkpoint(tiny_anchor_dir, tmp_path):
    # The checkpoint of a sharded run holds whole tensors and the optimizer state by name: the
    # resumed run ends where one uninterrupted process ends.
    root, _, _ = tiny_anchor_dir
    params = _params(tmp_path, steps=80, checkpoint_every=5)
    corpus, key = _owner_corpus(tmp_path)
    _run(_expert_args(root, corpus, key, params, tmp_path, "one"), 1)
    command, env = _command(_expert_args(root, corpus, key, params, tmp_path, "fsdp"), 2, "fsdp")
    proc = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "e_fsdp.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_tree(proc)  # torchrun's agent and its workers, as when the machine goes down
    assert not (tmp_path / "expert_fsdp").exists(), "killed too late: the run had finished"
    _run(_expert_args(root, corpus, key, params, tmp_path, "fsdp"), 2, "fsdp")
    assert json.loads((tmp_path / "expert_fsdp.json").read_text())["resumed_from_step"] >= 5
    one, resumed = _weights(tmp_path / "expert_one"), _weights(tmp_path / "expert_fsdp")
    assert max((one[k] - resumed[k]).abs().max().item() for k in one) < 1e-4


def test_unknown_parallel_mode_is_named(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setenv("CONSORT_DATA_PARALLEL", "zero3")
    with pytest.raises(ValueError, match="CONSORT_DATA_PARALLEL='zero3': use one of ddp, fsdp"):
        distributed.mode()


def test_rows_that_do_not_split_evenly_are_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    assert distributed.local_rows(6, "rows") == slice(3, 6)
    with pytest.raises(ValueError, match="owner rows: 3 rows do not split evenly over 2 processes"):
        distributed.local_rows(3, "owner rows")
