"""Shared fixtures: tiny real models, and one real smoke run of the whole pipeline per session."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Olmo2Config, Olmo2ForCausalLM

from stages.artifacts import ANCHOR_INFO

PROJECT = Path(__file__).resolve().parents[1]
# Fetched Debian packages and wheels are shared by every workspace the tests create.
SHARED_CACHE = Path(os.environ.get("CONSORT_TEST_CACHE", Path.home() / ".cache" / "consort-test"))


def tiny_anchor(seed: int = 0, vocab: int = 96) -> Olmo2ForCausalLM:
    torch.manual_seed(seed)
    config = Olmo2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=1, bos_token_id=0, eos_token_id=0)
    return Olmo2ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_anchor_dir(tmp_path_factory):
    """(folder with a tiny anchor, tokenizer and public embedding, the anchor, the public router row)."""
    from transformers import AutoTokenizer

    from stages import params as P
    from stages.io import write_json
    from stages.model.router_rows import save_embedding
    from stages.train_anchor import anchor_hash
    from stages.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    corpus = root / "public.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"public text number {i}."}) + "\n" for i in range(50)))
    (root / "val.jsonl").write_text("".join(json.dumps({"text": f"public text {i} held out."}) + "\n" for i in range(30)))
    train_tokenizer(corpus, P.TokenizerParams(vocab_size=300, max_chars=10**6), root / "tok")
    anchor = tiny_anchor(seed=0, vocab=300)
    anchor.save_pretrained(root / "anchor")
    AutoTokenizer.from_pretrained(root / "tok").save_pretrained(root / "anchor")
    write_json(root / "anchor" / ANCHOR_INFO, {"anchor_hash": anchor_hash(anchor)})
    r_pub = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(5)), dim=0)
    save_embedding(r_pub, root / "emb")
    return root, anchor, r_pub


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every process it started (torchrun's workers, a Prefect worker's flow runs)."""
    import psutil

    parent = psutil.Process(proc.pid)
    for p in [*parent.children(recursive=True), parent]:
        p.kill()
    proc.wait(timeout=30)


def run_consort(*args: str, cwd: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, CONSORT_CACHE=str(SHARED_CACHE), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"consort {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def smoke_workspace(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A workspace after one real `consort run --preset smoke` (Prefect, DVC and MLflow all real), built
    from a copy of the project's params.yaml beside it: commands that edit the file a workspace was built
    from (`consort forget`, `experts disable`) edit the copy."""
    root = tmp_path_factory.mktemp("smoke")
    ws, params = root / "ws", root / "params.yaml"
    params.write_text((PROJECT / "params.yaml").read_text())
    proc = run_consort("run", "--preset", "smoke", "--workspace", str(ws), "--params", str(params), cwd=root)
    return ws, proc


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that change the shared smoke workspace run after every test that reads it."""
    items.sort(key=lambda item: item.get_closest_marker("changes_smoke_workspace") is not None)
