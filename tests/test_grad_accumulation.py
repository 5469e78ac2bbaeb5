"""Gradient accumulation: k micro-batches per step make the same update as the whole batch in one pass."""
import json

import pytest
import torch
from safetensors.torch import load_file
from test_dp import DP
from test_reference import tiny_params

from stages.artifacts import WEIGHTS
from stages.package import create_owner_key
from stages.train.loop import micro_batches
from stages.train_expert import train_expert


def test_micro_batches_give_every_part_the_same_mix_of_row_kinds():
    rows = torch.arange(8).view(8, 1)
    is_owner = torch.arange(8) < 6  # six owner rows, then two public rows
    parts = micro_batches((rows, is_owner), 2)
    assert [int(labels.sum()) for _, labels in parts] == [3, 3]
    assert sorted(torch.cat([r for r, _ in parts]).view(-1).tolist()) == list(range(8))
    with pytest.raises(ValueError, match="grad_accumulation.*divides by 3"):
        micro_batches(rows, 3)


def trained_weights(root, corpus, tmp_path, name, dp=None, **train):
    params = tiny_params()
    t = params.expert_train("alpha").model_copy(update={"batch_size": 8, **train})
    folder = tmp_path / name
    train_expert("alpha", corpus, root / "public.jsonl", root / "anchor", root / "emb", params.expert, t,
                 folder / "pkg", folder / "log.jsonl", folder / "c.pt",
                 create_owner_key(folder / "keys").with_name("signing_key.pem"), dp)
    losses = [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]
    return load_file(folder / "pkg" / WEIGHTS), losses


# DP-SGD's per-document gradients over two micro-batches: 32 s of a 978 s suite (2026-12-07), slow.
@pytest.mark.parametrize("dp", [None, pytest.param(DP, marks=pytest.mark.slow)], ids=["plain", "dp"])
def test_an_expert_trained_in_two_micro_batches_equals_one_pass(tiny_anchor_dir, tmp_path, dp):
    """The owner's rows and the public rows (public_mix 0.25: 6 + 2 of 8) are split alike, so the
    owner-only loss and the router contrast keep their weights; under DP each document is still
    clipped alone and the noise is added once per step."""
    root, anchor, _ = tiny_anchor_dir
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"owner note {i} says private things number {i * 7}."}) + "\n"
                              for i in range(40)))
    corpus.with_name("val.jsonl").write_text("".join(json.dumps({"text": f"owner note {i} held out."}) + "\n"
                                                     for i in range(20)))
    whole, whole_losses = trained_weights(root, corpus, tmp_path, "whole", dp)
    split, split_losses = trained_weights(root, corpus, tmp_path, "split", dp, grad_accumulation=2)
    assert whole.keys() == split.keys()
    # The owner's FFN starts as the anchor's: it must have moved, or the comparison proves nothing.
    assert not torch.allclose(whole["layers.0.down_proj"], anchor.model.layers[0].mlp.down_proj.weight, atol=1e-4)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-5, msg=k)
    assert split_losses == pytest.approx(whole_losses, rel=1e-4)
