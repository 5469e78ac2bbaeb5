"""Intervals a consortium can act on: the paired bootstrap over documents, the windows every
document contributes to, and BTM from the NLLs stored per token."""
import json

import numpy as np
import pytest
import torch

from stages import params as P
from stages.evidence import Interval, average, judge, judge_within, mean_interval, relative_interval, resample
from stages.model.baselines import btm_token_nll
from stages.results import scores


def population_sample(rng, documents: int, gap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two configurations on the same documents: lengths and difficulty vary a lot across documents,
    B is worse than A by `gap` on average, with noise of its own per document."""
    tokens = rng.integers(50, 400, documents).astype(float)
    difficulty = rng.lognormal(1.0, 0.3, documents)
    a = difficulty * tokens
    b = a * (1 + gap + 0.03 * rng.standard_normal(documents))
    return a, b, tokens


def test_the_interval_covers_a_known_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    # The true relative difference of the population means: estimated once on a very large sample.
    a, b, _ = population_sample(np.random.default_rng(99), 200_000, 0.01)
    truth = b.sum() / a.sum() - 1
    covered = 0
    for trial in range(300):
        a, b, _ = population_sample(rng, 60, 0.01)
        iv = relative_interval(b, a, resample(60, resamples=600, seed=trial))
        covered += iv.low <= truth <= iv.high
    assert 0.90 <= covered / 300 <= 0.99, covered


def test_the_resample_is_paired_across_configurations():
    """Configurations scored on the same documents: a difference that is the same on every document
    has no spread at all, however much the documents differ, and the unpaired intervals hide it."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(50, 400, 40).astype(float)
    a = rng.lognormal(1.0, 0.5, 40) * tokens
    doc_nll = {"merged": a, "anchor": a * 1.01}
    models, compared, _ = scores(doc_nll, tokens, tokens * 4)
    gap = compared["merged vs anchor"]
    assert gap.value == pytest.approx(-0.01 / 1.01) and gap.high - gap.low < 1e-12
    overlap = models["merged"].loss_interval.high > models["anchor"].loss_interval.low
    assert overlap  # each mean's own interval is wide: only the paired one tells them apart
    assert judge(gap, 0.0, below=True) == "met"


def test_verdicts_are_three_valued():
    iv = Interval(value=0.004, low=-0.002, high=0.010, se=0.003)
    assert judge(iv, 0.0, below=True) == "cannot tell at this budget"
    assert judge(iv, 0.02, below=True) == "met" and judge(iv, -0.01, below=True) == "missed"
    assert judge(iv, -0.01, below=False) == "met" and judge(iv, 0.02, below=False) == "missed"
    assert judge_within(iv, 0.02) == "met" and judge_within(iv, 0.005) == "cannot tell at this budget"
    assert judge_within(Interval(value=0.03, low=0.025, high=0.04, se=0.004), 0.02) == "missed"


def test_the_owners_average_adds_standard_errors_in_quadrature():
    ivs = [Interval(value=v, low=v - 0.02, high=v + 0.02, se=0.01) for v in (0.1, 0.2, 0.3, 0.4)]
    avg = average(ivs)
    assert avg.value == pytest.approx(0.25) and avg.se == pytest.approx(0.01 / 2)
    assert avg.high - avg.low == pytest.approx(2 * 1.959963984540054 * 0.005)


def test_mean_interval_is_the_ratio_over_documents():
    tokens = np.array([10.0, 30.0, 60.0])
    nll = np.array([20.0, 30.0, 60.0])
    iv = mean_interval(nll, tokens, resample(3))
    assert iv.value == pytest.approx(110 / 100) and iv.low <= iv.value <= iv.high


def test_every_document_contributes_to_the_windows(tiny_anchor_dir, tmp_path):
    from transformers import AutoTokenizer

    from stages.io import write_jsonl
    from stages.model.scoring import fair_shares, windows

    root, _, _ = tiny_anchor_dir
    tokenizer = AutoTokenizer.from_pretrained(root / "anchor")
    texts = [f"document {i} " + "word " * (3 + 40 * (i % 3)) for i in range(9)]
    write_jsonl(tmp_path / "val.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    e = P.EvaluateParams(max_tokens=128, batch_size=4, seq_len=16)
    text = windows(tokenizer, tmp_path / "val.jsonl", e.max_tokens, e.seq_len)
    assert text.rows.shape[1] == 17 and text.rows[:, 1:].size <= 128
    assert set(np.unique(text.doc_of)) == set(range(9))  # each document scored
    # Each target token is counted to the document its token came from.
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    for w, d in zip(text.rows[:, 1:].ravel(), text.doc_of.ravel()):
        assert w in ids[d] or w == tokenizer.eos_token_id
    assert fair_shares([5, 100, 100], 60) == [5, 28, 27]  # a short document's leftover goes to the others
    assert fair_shares([3, 4], 100) == [3, 4]  # a split smaller than the budget: all of it
    whole = windows(tokenizer, tmp_path / "val.jsonl", 10_000, e.seq_len)
    assert whole.rows[:, 1:].size >= sum(len(i) for i in ids)  # every token (and each EOS) scored


def test_btm_from_stored_token_nlls_equals_btm_from_the_models_distributions():
    from test_experts import random_merged

    from stages.model.experts import slice_experts

    merged = random_merged(num_experts=3)
    ids = torch.randint(2, 80, (2, 9), generator=torch.Generator().manual_seed(3))
    singles = [slice_experts(merged, [k]) for k in (1, 2)]
    with torch.no_grad():
        probs = torch.stack([torch.softmax(m(input_ids=ids[:, :-1]).logits, -1) for m in singles])  # (M, B, T, V)
    target = ids[:, 1:]
    p_token = probs.gather(-1, target.expand(2, *target.shape).unsqueeze(-1)).squeeze(-1)  # (M, B, T)
    stored = -torch.log(p_token).numpy()
    # Directly: weights from each model's likelihood of the prefix, mixing full distributions.
    prefix = torch.cumsum(-torch.log(p_token), -1) - (-torch.log(p_token))
    w = torch.softmax(-prefix, 0)
    mixed = (w.unsqueeze(-1) * probs).sum(0)
    direct = -torch.log(mixed.gather(-1, target.unsqueeze(-1)).squeeze(-1)).numpy()
    np.testing.assert_allclose(btm_token_nll(stored, 1.0), direct, rtol=1e-5, atol=1e-6)


def test_a_published_evaluation_holds_no_per_document_number(smoke_workspace):
    ws, _ = smoke_workspace
    for path in (ws / "evaluations").glob("*.json"):
        evaluation = json.loads(path.read_text())
        documents = evaluation["scored"]["documents"]
        assert documents >= 2

        def lists(value):
            if isinstance(value, dict):
                for v in value.values():
                    yield from lists(v)
            elif isinstance(value, list):
                yield value

        assert not [v for v in lists(evaluation) if len(v) == documents and all(isinstance(x, float) for x in v)]
    private = ws / "owners" / "news" / "evaluation_documents.json"
    assert len(json.loads(private.read_text())["merged"]) == json.loads((ws / "evaluations" / "news.json").read_text()
                                                                        )["scored"]["documents"]
