"""Aurora-M's two-stage curriculum: stage 2 trains on the chosen subset only, and each stage is scored."""
import json

import numpy as np
import pytest
import torch
from test_reference import tiny_params

import stages.train_expert as train_expert_module
from stages import params as P
from stages.artifacts import MANIFEST
from stages.io import read_json
from stages.package import create_owner_key
from stages.train.curriculum import near_duplicates, select_high_quality
from stages.train_expert import train_expert


def _corpus(folder, n=40):
    """Two kinds of owner documents: "plain" ones and "gold" ones (the subset), and held-out text."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"doc-{i}", "text": (f"gold record {i} lists the zinc and quartz findings of site {i * 3}."
                                        if i % 4 == 0 else f"plain note {i} says ordinary things number {i * 7}.")}
            for i in range(n)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "val.jsonl").write_text("".join(json.dumps({"id": f"v{i}", "text": f"plain note {i} held out."}) + "\n"
                                              for i in range(30)))
    return rows


def test_near_duplicates_drop_the_later_copy_only():
    a = "the quick brown fox jumps over the lazy dog near the river bank today"
    texts = [a, a.replace("today", "tonight"), "an entirely different sentence about ledgers and ink pots here", a]
    assert near_duplicates(texts, 0.8) == [False, True, False, True]
    assert near_duplicates(texts, 1.0) == [False, False, False, True]


def test_the_anchor_score_keeps_the_middle_band(tiny_anchor_dir, tmp_path):
    from transformers import AutoTokenizer

    root, anchor, _ = tiny_anchor_dir
    _corpus(tmp_path / "c")
    tokenizer = AutoTokenizer.from_pretrained(root / "anchor")
    chosen, info = select_high_quality("alpha", tmp_path / "c" / "train.jsonl", [],
                                       P.HighQualitySelection(scored_docs=20, band=(0.25, 0.75)), anchor, tokenizer)
    assert info["method"] == "anchor_bpb_band" and info["scored"] == 20
    low, high = info["band_bits_per_byte"]
    assert low < high and 2 <= len(chosen) == info["documents"] < 20 - info["near_duplicates"]
    with pytest.raises(ValueError, match=r"owners\.alpha\.high_quality names 1 document.*'nope'"):
        select_high_quality("alpha", tmp_path / "c" / "train.jsonl", ["doc-0", "nope"], P.HighQualitySelection(),
                            anchor, tokenizer)


def test_stage_two_reads_only_the_selected_subset_and_each_stage_is_scored(tiny_anchor_dir, tmp_path, monkeypatch):
    root, _, _ = tiny_anchor_dir
    rows = _corpus(tmp_path / "corpus")
    gold = [r["id"] for r in rows if r["text"].startswith("gold")]
    params = tiny_params()
    expert = params.expert.model_copy(update={"curriculum": P.CurriculumParams(
        stages=2, stage2_steps=3, stage2_lr=1e-3, eval_tokens=128)})
    t = params.expert_train("alpha").model_copy(update={"batch_size": 8})
    seen: dict[str, list[torch.Tensor]] = {}
    real_train = train_expert_module.train

    def spying_train(model, step_loss, make_batch, p, ckpt, log_path, desc, **kw):
        def recorded(step):
            batch, is_owner = make_batch(step)
            seen.setdefault(desc, []).append(batch[is_owner])
            return batch, is_owner
        return real_train(model, step_loss, recorded, p, ckpt, log_path, desc, **kw)

    monkeypatch.setattr(train_expert_module, "train", spying_train)
    key = create_owner_key(tmp_path / "keys").with_name("signing_key.pem")
    summary = train_expert("alpha", tmp_path / "corpus" / "train.jsonl", root / "public.jsonl", root / "anchor",
                           root / "emb", expert, t, tmp_path / "pkg", tmp_path / "log.jsonl", tmp_path / "c.pt", key,
                           high_quality=gold)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "anchor")
    gold_stream = ",".join(map(str, train_expert_module.tokenize_texts(
        tokenizer, [r["text"] for r in rows if r["id"] in gold]).tolist()))
    assert set(seen) == {"expert alpha", "expert alpha one-stage", "expert alpha two-stage"}
    assert len(seen["expert alpha two-stage"]) == 3
    for name, batches in seen.items():
        inside = [f",{','.join(map(str, row.tolist()))}," in f",{gold_stream}," for b in batches for row in b]
        if name == "expert alpha two-stage":
            assert all(inside), "a stage-2 owner row came from outside the selected subset"
        else:  # the whole corpus: most windows cross the plain documents
            assert not all(inside)
    c = summary["curriculum"]
    assert c["shipped"] == "two_stage" and c["selection"] == {"method": "owner_list", "documents": len(gold)}
    for stage in ("anchor", "stage_1", "one_stage", "two_stage"):
        assert np.isfinite(c[stage]["own_loss"]) and np.isfinite(c[stage]["public_loss"])
    assert c["stage_1"]["own_loss"] < c["anchor"]["own_loss"]  # stage 1 learned the owner's text
    assert c["one_stage"]["own_loss"] != c["two_stage"]["own_loss"]
    assert summary["steps"] == t.steps + 3
    manifest = read_json(tmp_path / "pkg" / MANIFEST)
    assert manifest["curriculum"]["stages"] == 2 and manifest["curriculum"]["selection"]["method"] == "owner_list"
    assert manifest["metrics"]["steps"] == t.steps + 3
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log if "stage" in r] == [2] * len(c["two_stage"]["log"])
    assert log[-1]["step"] == t.steps + 2
