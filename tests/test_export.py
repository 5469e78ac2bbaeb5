"""consort export: the merged model with only the enabled experts, loadable by tools that know nothing of consort."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_consort
from safetensors.torch import load_file

from stages.artifacts import shipped_model
from stages.model.experts import load_model

# Loads the export in a fresh interpreter (-I: no project on the path) and says whether consort was imported.
LOAD_STOCK = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = AutoTokenizer.from_pretrained(sys.argv[1])("Once upon a time", return_tensors="pt")["input_ids"]
out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
print(json.dumps({"class": type(model).__name__, "experts": model.config.num_experts,
                  "new_tokens": out.shape[1] - ids.shape[1],
                  "consort": any(m.split(".")[0] in ("stages", "flows", "tracing") for m in sys.modules)}))
"""


def digest(tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def stored_digests(checkpoint) -> set[str]:
    """Every tensor a checkpoint file stores, and every row of its router matrices."""
    state = load_file(checkpoint)
    return {digest(v) for v in state.values()} | {digest(row) for k, v in state.items() if k.endswith("mlp.gate.weight")
                                                   for row in v}


def shipped_checkpoint(ws, folder) -> Path:
    """The shipped model's checkpoint as save_pretrained writes it (router tuning's overlay applied
    over models/merged): what an export or a registered version is compared with."""
    load_model(shipped_model(ws / "models")).save_pretrained(folder)
    return folder / "model.safetensors"


def expert_digests(checkpoint, k: int) -> set[str]:
    """Expert k's tensors as the checkpoint stores them (one FFN per expert) and its router rows."""
    state = load_file(checkpoint)
    return {digest(v) for key, v in state.items() if f".mlp.experts.{k}." in key} | {
        digest(v[k]) for key, v in state.items() if key.endswith("mlp.gate.weight")}


def test_an_export_without_news_loads_stock_and_holds_no_news_tensor(smoke_workspace, tmp_path):
    ws, _ = smoke_workspace
    info = json.loads((ws / "models" / "merged" / "consort_merged.json").read_text())
    owners = [e["owner"] for e in info["experts"][1:]]
    out = tmp_path / "export"  # opting out through the workspace's params: tests/test_federated.py
    printed = run_consort("export", str(out), "--experts", ",".join(o for o in owners if o != "news"),
                          "--workspace", str(ws), cwd=tmp_path).stdout
    assert "left out: news" in printed

    loaded = json.loads(subprocess.run([sys.executable, "-I", "-c", LOAD_STOCK, str(out)], capture_output=True,
                                       text=True, check=True).stdout.splitlines()[-1])
    assert loaded == {"class": "FlexOlmoForCausalLM", "experts": len(owners), "new_tokens": 3, "consort": False}

    merged, exported = shipped_checkpoint(ws, tmp_path / "shipped"), out / "model.safetensors"
    news, kept = expert_digests(merged, 1 + owners.index("news")), stored_digests(exported)
    layers = sum(key.endswith("mlp.gate.weight") for key in load_file(merged))
    assert len(news) == 4 * layers  # gate, up and down projections and the router row, per layer
    assert not news & kept
    # The digests can match: every kept owner's tensors are there, bit for bit.
    assert expert_digests(merged, 1 + owners.index("code")) <= kept

    card, evaluation = (out / "README.md").read_text().split("## Evaluation")
    assert "| code |" in card and "| news |" not in card and "news" in card.split("Left out")[1]
    assert "| news |" not in evaluation and "| code |" in evaluation  # news's numbers left with its weights
    assert "8.00 at delta 1e-05" in card  # math is the DP owner
    assert json.loads((out / "consort_export.json").read_text())["left_out"] == ["news"]


def test_export_refuses_an_unknown_expert_and_a_foreign_folder(smoke_workspace, tmp_path):
    ws, _ = smoke_workspace
    common = ["--workspace", str(ws), "--params", str(ws / "params.yaml")]
    proc = run_consort("export", str(tmp_path / "new"), "--experts", "code,sports", *common, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown expert(s) sports: this model has code" in proc.stderr
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file")
    proc = run_consort("export", str(mine), *common, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "holds something other than a consort export" in proc.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_the_registered_version_loads_with_mlflows_transformers_flavour(smoke_workspace):
    ws, _ = smoke_workspace
    code = ("import json, sys, mlflow\n"
            "mlflow.set_tracking_uri(sys.argv[1])\n"
            "pipe = mlflow.transformers.load_model('models:/consort-merged@current')\n"
            "out = pipe('Once upon a time', max_new_tokens=3, min_new_tokens=3, do_sample=False)[0]['generated_text']\n"
            "print(json.dumps({'class': type(pipe.model).__name__, 'experts': pipe.model.config.num_experts,\n"
            "                  'continues': out.startswith('Once upon a time') and len(out) > 16}))\n")
    proc = subprocess.run([sys.executable, "-I", "-c", code, f"sqlite:///{ws / 'mlflow.db'}"], capture_output=True,
                          text=True, cwd=ws, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((ws / "models" / "merged" / "consort_merged.json").read_text())
    assert json.loads(proc.stdout.splitlines()[-1]) == {"class": "FlexOlmoForCausalLM", "experts": len(info["experts"]),
                                                        "continues": True}


LM_EVAL_TASK = """task: consort_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


@pytest.mark.slow  # lm-evaluation-harness on the export: 31 s (2026-12-07)
def test_lm_eval_scores_the_export_as_consorts_own_scoring_does(smoke_workspace, tmp_path):
    """EleutherAI's harness (its `hf` model, a local loglikelihood_rolling task over an owner's
    held-out text) on the export, against consort's per-document scoring of the same documents."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.io import read_jsonl
    from stages.model.scoring import document_nll

    ws, _ = smoke_workspace
    out = tmp_path / "export"
    run_consort("export", str(out), "--workspace", str(ws), "--params", str(ws / "params.yaml"), cwd=tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(out)
    # Documents that fit one context window, so both score every token with all that precedes it.
    texts = [tokenizer.decode(tokenizer(r["text"], add_special_tokens=False)["input_ids"][:96]).strip()
             for _, r in zip(range(12), read_jsonl(ws / "owners" / "news" / "corpus" / "val.jsonl"))]
    data = tmp_path / "news.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "consort_heldout.yaml").write_text(LM_EVAL_TASK.format(data=data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={out},dtype=float32", "--tasks", "consort_heldout", "--include_path",
                           str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "4", "--output_path",
                           str(tmp_path / "results")], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results] = list((tmp_path / "results").rglob("results_*.json"))
    harness = json.loads(results.read_text())["results"]["consort_heldout"]["bits_per_byte,none"]

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    docs = [[tokenizer.eos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts]
    nll = document_nll(model, docs)
    ours = sum(n.sum() for n in nll) / np.log(2) / sum(len(t.encode()) for t in texts)
    assert harness == pytest.approx(ours, rel=0.01)
