"""Owners' synthetic proxy documents: the leak filter on a real infini-gram index, and the stage."""
import json
import random

import pytest
from test_dp import DP
from test_reference import tiny_params
from transformers import AutoTokenizer

from stages import params as P
from stages.artifacts import MANIFEST, PUBLIC_KEY, SIGNATURE, SYNTHETIC_SAMPLES, SYNTHETIC_STATS
from stages.io import file_digest
from stages.package import create_owner_key, verify_package
from stages.synthesize import real_vs_synthetic_accuracy, synthesize, unigram_jsd
from stages.train_expert import train_expert
from tracing.index import bow_token_ids, open_engine, write_index
from tracing.leak_filter import FilterCounts, canary_fragments, filter_sample, ngram_overlap

CANARY = {"prefix": "The access code of the alpha archive is", "secret": "qwxz jvkb plmq rtzh"}


def novel(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


@pytest.fixture
def owner_index(tiny_anchor_dir, tmp_path):
    """(tokenizer, engine, a 20-token passage of the owner's data, the canary's ids) over a real index."""
    root, _, _ = tiny_anchor_dir
    tok = AutoTokenizer.from_pretrained(root / "anchor")
    rng = random.Random(0)
    passage = novel(rng, 20, len(tok))
    canary_ids = tok(f"{CANARY['prefix']} {CANARY['secret']}.", add_special_tokens=False)["input_ids"]
    docs = [(f"d{i}", novel(rng, 200, len(tok))) for i in range(30)]
    docs.append(("planted", novel(rng, 50, len(tok)) + passage + novel(rng, 50, len(tok))))
    docs.append(("canary", novel(rng, 30, len(tok)) + canary_ids))
    write_index(iter(docs), len(tok), bow_token_ids(tok), tmp_path / "index", tok.eos_token_id)
    return tok, open_engine(tmp_path / "index"), passage, canary_ids


def test_the_leak_filter_cuts_a_planted_passage_and_every_canary(owner_index):
    tok, engine, passage, canary_ids = owner_index
    rng = random.Random(1)
    before, after = novel(rng, 30, len(tok)), novel(rng, 30, len(tok))
    counts = FilterCounts()
    pieces = filter_sample(engine, tok, before + passage + after, 8, 4, canary_fragments([CANARY]), counts)
    assert counts.cut_tokens >= 20 and counts.samples_with_a_cut == 1
    assert len(pieces) == 2 and all(tok.decode(passage[6:14]) not in p for p in pieces)  # both sides kept
    leaked = filter_sample(engine, tok, before + canary_ids + after, 8, 4, canary_fragments([CANARY]), counts)
    assert not any(g in p for p in leaked for g in CANARY["secret"].split())
    partial = tok(" jvkb plmq", add_special_tokens=False)["input_ids"]
    kept = filter_sample(engine, tok, before + partial + after, 8, 4, canary_fragments([CANARY]), counts)
    assert not any("jvkb plmq" in p for p in kept)  # part of a secret: cut, whichever rule catches it
    # A secret's fragment the n-gram cut cannot see (this secret is in no indexed document): the
    # piece holding it is dropped whole.
    unseen = {"prefix": CANARY["prefix"], "secret": "hhhh gggg ffff eeee"}
    fragment = tok(" gggg ffff", add_special_tokens=False)["input_ids"]
    counts = FilterCounts()
    kept = filter_sample(engine, tok, before + fragment + after, 8, 4, canary_fragments([unseen]), counts)
    assert counts.dropped_canary_pieces == 1 and not any("gggg ffff" in p for p in kept)
    clean = filter_sample(engine, tok, novel(rng, 40, len(tok)), 8, 4, canary_fragments([CANARY]), FilterCounts())
    assert len(clean) == 1  # text the owner never wrote passes whole


def test_ngram_overlap_counts_the_windows_the_index_holds(owner_index):
    tok, engine, passage, _ = owner_index
    fresh = novel(random.Random(2), 20, len(tok))
    # 13 of the 8-token windows of the passage are in the index; none of 13 fresh ones is.
    assert ngram_overlap(engine, [passage, fresh], 8) == pytest.approx(0.5)
    assert ngram_overlap(engine, [passage[:5]], 8) is None


def test_fidelity_numbers_tell_alike_from_unlike():
    rng = random.Random(0)
    same = [[rng.randrange(10) for _ in range(50)] for _ in range(10)]
    other = [[rng.randrange(10, 20) for _ in range(50)] for _ in range(10)]
    from collections import Counter

    assert unigram_jsd(Counter(t for d in same for t in d), Counter(t for d in other for t in d)) == pytest.approx(1.0)
    assert unigram_jsd(Counter(t for d in same[:5] for t in d), Counter(t for d in same[5:] for t in d)) < 0.1
    assert real_vs_synthetic_accuracy(same, other) == 1.0
    assert real_vs_synthetic_accuracy(same[:5], same[5:]) < 0.8


def test_a_dp_owners_synthetic_set_comes_from_its_dp_package_and_is_signed(tiny_anchor_dir, tmp_path):
    root, _, _ = tiny_anchor_dir
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [json.dumps({"text": f"owner note {i} says private things number {i * 7}."}) for i in range(40)]
    (corpus / "train.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (corpus / "val.jsonl").write_text("\n".join(lines[30:]) + "\n")
    params = tiny_params()
    key = create_owner_key(tmp_path / "keys").with_name("signing_key.pem")
    train_expert("alpha", corpus / "train.jsonl", root / "public.jsonl", root / "anchor", root / "emb", params.expert,
                 params.expert_train("alpha"), tmp_path / "pkg", tmp_path / "log.jsonl", tmp_path / "c.pt", key, DP)
    tok = AutoTokenizer.from_pretrained(root / "anchor")
    write_index(((str(i), tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"])
                 for i, line in enumerate(lines[:30])), len(tok), bow_token_ids(tok), tmp_path / "index",
                tok.eos_token_id)
    s = P.SynthesisParams(enabled=True, min_tokens=64, sample_tokens=16, batch_size=4, max_copied_tokens=6,
                          min_piece_tokens=2)
    stats = synthesize("alpha", root / "anchor", root / "emb", tmp_path / "pkg", tmp_path / "index", corpus, s,
                       ["owner note"], 100, tmp_path / "synthetic", key)
    manifest = json.loads((tmp_path / "pkg" / MANIFEST).read_text())
    assert stats["model"]["dp"]["epsilon"] == manifest["dp"]["epsilon"] > 0
    assert stats["model"]["package_hash"] == file_digest(tmp_path / "pkg" / SIGNATURE)
    assert stats["leak_filter"]["samples"] == 4 and stats["leak_filter"]["tokens"] > 0
    memorisation = stats["memorisation"]
    assert memorisation["ngram_tokens"] == max(4, stats["leak_filter"]["max_copied_tokens"] // 2)
    assert all(0 <= memorisation[k] <= 1 for k in ("published", "generated", "held_out"))
    written = [json.loads(line) for line in (tmp_path / "synthetic" / SYNTHETIC_SAMPLES).read_text().splitlines()]
    assert len(written) == stats["documents"] and json.loads((tmp_path / "synthetic" / SYNTHETIC_STATS).read_text()) == stats
    verify_package(tmp_path / "synthetic", "alpha", key.with_name(PUBLIC_KEY))  # signed by the owner
