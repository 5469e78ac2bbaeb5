"""Training under torchrun: two CPU processes (gloo) compute what one process computes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import PROJECT
from flows.workspace import read_project_params
from stages import distributed
from stages import params as P
from stages.package import create_owner_key


def _params(tmp_path, **expert_train) -> str:
    raw = P.resolve(read_project_params(), "smoke")
    raw["anchor"]["train"].update(steps=8, checkpoint_every=100)
    raw["expert"]["train"].update(steps=6, batch_size=8, checkpoint_every=100, **expert_train)
    raw["owners"]["code"].pop("dp", None)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _run(args: list[str], processes: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([*launcher, "-m", *args], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_anchor_and_expert_train_the_same_on_two_processes(tiny_anchor_dir, tmp_path):
    root, _, _ = tiny_anchor_dir
    params = _params(tmp_path)
    corpus = tmp_path / "owner.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n"
                              for i in range(60)))
    key = create_owner_key(tmp_path / "keys").with_name("signing_key.pem")
    for n in (1, 2):
        _run(["stages.train_anchor", "--corpus", str(root / "public.jsonl"), "--tokenizer", str(root / "tok"),
              "--out", str(tmp_path / f"anchor{n}"), "--metrics", str(tmp_path / f"anchor{n}.json"),
              "--train-log", str(tmp_path / f"anchor{n}.jsonl"), "--checkpoint", str(tmp_path / f"a{n}.pt"),
              "--params", params], n)
        _run(["stages.train_expert", "code", "--corpus", str(corpus), "--public-corpus", str(root / "public.jsonl"),
              "--anchor", str(root / "anchor"), "--public-embedding", str(root / "emb"),
              "--out", str(tmp_path / f"expert{n}"), "--metrics", str(tmp_path / f"expert{n}.json"),
              "--train-log", str(tmp_path / f"expert{n}.jsonl"), "--checkpoint", str(tmp_path / f"e{n}.pt"),
              "--signing-key", str(key), "--params", params], n)
    for name in ("anchor", "expert"):
        one, two = _weights(tmp_path / f"{name}1"), _weights(tmp_path / f"{name}2")
        assert one.keys() == two.keys()
        worst = max((one[k] - two[k]).abs().max().item() for k in one)
        assert worst < 1e-4, (name, worst)
        logs = [[json.loads(line)["loss"] for line in (tmp_path / f"{name}{n}.jsonl").read_text().splitlines()]
                for n in (1, 2)]
        assert logs[0] == pytest.approx(logs[1], abs=1e-4)  # logged on the global batch, not one process's share
    # The comparison means something: the owner's expert did move away from its public twin.
    anchor = _weights(root / "anchor")
    expert = _weights(tmp_path / "expert2")
    for i in range(2):
        dense = f"model.layers.{i}.mlp."
        start = torch.cat([anchor[dense + "gate_proj.weight"], anchor[dense + "up_proj.weight"]])
        assert (expert[f"layers.{i}.gate_up_proj"] - start).abs().max() > 1e-4


def test_rows_that_do_not_split_evenly_are_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    assert distributed.local_rows(6, "rows") == slice(3, 6)
    with pytest.raises(ValueError, match="owner rows: 3 rows do not split evenly over 2 processes"):
        distributed.local_rows(3, "owner rows")
