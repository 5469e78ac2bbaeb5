"""Shared fixtures: tiny real models, and one real smoke run of the whole pipeline per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Olmo2Config, Olmo2ForCausalLM

PROJECT = Path(__file__).resolve().parents[1]
# Fetched Debian packages and wheels are shared by every workspace the tests create.
SHARED_CACHE = Path(os.environ.get("CONSORT_TEST_CACHE", Path.home() / ".cache" / "consort-test"))


def tiny_anchor(seed: int = 0, vocab: int = 96) -> Olmo2ForCausalLM:
    torch.manual_seed(seed)
    config = Olmo2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=1, bos_token_id=0, eos_token_id=0)
    return Olmo2ForCausalLM(config).eval()


def run_consort(*args: str, cwd: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, CONSORT_CACHE=str(SHARED_CACHE), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"consort {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def smoke_workspace(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A workspace after one real `consort run --preset smoke` (Prefect, DVC and MLflow all real)."""
    root = tmp_path_factory.mktemp("smoke")
    ws = root / "ws"
    proc = run_consort("run", "--preset", "smoke", "--workspace", str(ws), cwd=root)
    return ws, proc
