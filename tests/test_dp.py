"""Differential privacy for an owner's expert: per-document gradients, the accounting, refusal of invalid setups."""
import json

import numpy as np
import pytest
import torch
from test_reference import tiny_params

from stages import params as P
from stages.artifacts import MANIFEST, WEIGHTS
from stages.model.moe import blocks, upcycle
from stages.package import create_owner_key
from stages.train.dp import DPConfigError, spent_epsilon, training_noise
from stages.train_expert import train_expert

DP = P.DPParams(target_epsilon=8.0, delta=1e-5)


def test_per_document_gradients_equal_one_document_backprop(tiny_anchor_dir):
    from opacus import GradSampleModule

    _, anchor, r_pub = tiny_anchor_dir
    model = upcycle(anchor, r_pub, -r_pub)
    for b in blocks(model):
        b.owner_bias.requires_grad_(False)
    gsm = GradSampleModule(model)
    batch = torch.randint(2, 300, (3, 10), generator=torch.Generator().manual_seed(0))
    logits = gsm(input_ids=batch).logits
    torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch, reduction="none").mean(1).mean().backward()
    trainable = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    assert trainable and all("experts.1" in n or "routers.1" in n for n, _ in trainable)
    per_doc = {n: q.grad_sample.clone() for n, q in trainable}
    gsm._close()  # plain backprop from here on
    for i in range(3):
        model.zero_grad()
        one = model(input_ids=batch[i:i + 1]).logits
        torch.nn.functional.cross_entropy(one.transpose(1, 2), batch[i:i + 1], reduction="none").mean().backward()
        for n, q in trainable:  # under mean reduction Opacus undoes the 1/batch: each is that document's gradient
            torch.testing.assert_close(per_doc[n][i], q.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_noise_is_chosen_so_the_whole_release_meets_the_budget():
    sigma = training_noise(DP, sample_rate=0.05, steps=50)
    history = [(DP.init_noise_multiplier, 1.0, 1), (sigma, 0.05, 50)]
    eps = spent_epsilon(history, DP.delta, "prv")
    assert 7.5 < eps <= 8.0
    assert spent_epsilon([(DP.init_noise_multiplier, 1.0, 1), (sigma * 0.9, 0.05, 50)], DP.delta, "prv") > 8.0
    with pytest.raises(DPConfigError, match="too small"):
        training_noise(P.DPParams(target_epsilon=0.01), sample_rate=0.05, steps=50)


def test_dp_expert_trains_and_its_package_states_the_epsilon(tiny_anchor_dir, tmp_path):
    root, anchor, _ = tiny_anchor_dir
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"owner note {i} says private things number {i * 7}."}) + "\n"
                              for i in range(40)))
    params = tiny_params()
    summary = train_expert("alpha", corpus, root / "public.jsonl", root / "anchor", root / "emb", params.expert,
                           params.expert_train("alpha"), tmp_path / "pkg", tmp_path / "log.jsonl", tmp_path / "c.pt",
                           create_owner_key(tmp_path / "keys").with_name("signing_key.pem"), DP)
    manifest = json.loads((tmp_path / "pkg" / MANIFEST).read_text())
    assert manifest["dp"]["accountant"] == "prv" and manifest["dp"]["epsilon"] == summary["dp"]["epsilon"]
    assert 0 < manifest["dp"]["epsilon"] <= DP.target_epsilon + 1e-6
    from safetensors.torch import load_file


    biases = [v for k, v in load_file(tmp_path / "pkg" / WEIGHTS).items() if k.endswith(".bias")]
    assert biases and all(float(b) == 0.0 for b in biases)  # under DP the bias is not trained
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["epsilon"] == pytest.approx(summary["dp"]["epsilon"])


def test_shuffled_batches_are_refused_before_any_work(tiny_anchor_dir, tmp_path):
    root, _, _ = tiny_anchor_dir
    params = tiny_params()
    with pytest.raises(DPConfigError, match="owners.alpha.dp.sampling: 'shuffle'"):
        train_expert("alpha", tmp_path / "missing.jsonl", root / "public.jsonl", root / "anchor", root / "emb",
                     params.expert, params.expert_train("alpha"), tmp_path / "pkg", tmp_path / "log.jsonl",
                     tmp_path / "c.pt", tmp_path / "no-key.pem", DP.model_copy(update={"sampling": "shuffle"}))
    assert not (tmp_path / "pkg").exists()
