"""The study's extra models: the unrestricted reference, router tuning, and the report's target checks."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, FlexOlmoForCausalLM

from flows.params_file import read_project_params
from stages import params as P
from stages.artifacts import MERGED_INFO, PRIVATE_KEY, ROUTER_CANDIDATES, SHIPPED_ROUTER, SYNTHETIC_SAMPLES, has_model
from stages.io import write_json, write_jsonl
from stages.model.experts import load_model
from stages.model.router_fit import domain_targets, ridge
from stages.package import PackageRefused, create_owner_key, enrol_owner_key, sign_package
from stages.report import targets
from stages.results import DomainEvaluation
from stages.train_unrestricted import train_unrestricted
from stages.tune_router import pick_proxy, tune_router

OWNERS = ("alpha", "beta")


def tiny_params(**sections) -> P.Params:
    """The smoke preset's values cut to two owners, with `sections` merged on top."""
    raw = P.resolve(read_project_params(), "smoke")
    template = next(iter(raw["owners"].values()))
    raw["owners"] = {"alpha": template, "beta": {**template, "train": {"steps": 6}}}
    raw["expert"]["train"] = {**raw["expert"]["train"], "steps": 4, "seq_len": 16, "batch_size": 4, "warmup_steps": 1}
    raw["expert"]["router_init_docs"] = 5
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    return P.parse(raw)


@pytest.fixture(scope="module")
def corpora(tiny_anchor_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    paths = {}
    for o, word in zip(OWNERS, ("alpha", "beta")):
        paths[o] = root / f"{o}.jsonl"
        paths[o].write_text("".join(json.dumps({"text": f"{word} says {i} times {word}. "}) + "\n" for i in range(60)))
    return paths


def test_unrestricted_reference_trains_every_expert_on_all_owners_data(tiny_anchor_dir, corpora, tmp_path):
    root, anchor, _ = tiny_anchor_dir
    params = tiny_params(unrestricted={"enabled": True})
    out = tmp_path / "ref"
    summary = train_unrestricted(corpora, root / "public.jsonl", root / "anchor", root / "emb", params, out,
                                 tmp_path / "log.jsonl", tmp_path / "ckpt.pt")
    stage2 = params.expert.curriculum.stage2_steps
    assert stage2 and summary["steps"] == 4 + 6 + 2 * stage2  # the experts' steps together, stage 2's included
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is FlexOlmoForCausalLM and model.config.num_experts == 3
    assert model.config.num_experts_per_tok == min(params.merge.top_k or 3, 3)
    assert [e["owner"] for e in json.loads((out / MERGED_INFO).read_text())["experts"]] == ["public", *OWNERS]
    ref, dense = model.state_dict(), anchor.state_dict()
    # Shared tensors are the anchor's; every expert, the public one included, has learned.
    assert torch.equal(ref["model.layers.0.self_attn.q_proj.weight"], dense["model.layers.0.self_attn.q_proj.weight"])
    for e in range(3):
        assert not torch.equal(ref["model.layers.0.mlp.experts.down_proj"][e], dense["model.layers.0.mlp.down_proj.weight"])
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) >= 2
    assert not (tmp_path / "ckpt.pt").exists()


def test_unrestricted_reference_off_writes_only_a_stub(tiny_anchor_dir, corpora, tmp_path):
    root, _, _ = tiny_anchor_dir
    summary = train_unrestricted(corpora, root / "public.jsonl", root / "anchor", root / "emb",
                                 tiny_params(unrestricted={"enabled": False}),
                                 tmp_path / "ref", tmp_path / "log.jsonl", tmp_path / "ckpt.pt")
    assert summary == {"enabled": False} and not has_model(tmp_path / "ref")
    assert (tmp_path / "log.jsonl").read_text() == ""


def test_router_tuning_changes_only_router_rows(tiny_anchor_dir, corpora, tmp_path):
    root, anchor, _ = tiny_anchor_dir
    params = tiny_params(unrestricted={"enabled": True},
                         router_tuning={"enabled": True, "method": "public_lm", "compare": [], "token_fraction": 1.0,
                                        "candidate_docs": 20})
    # Any FlexOlmo model with a merge record will do: the reference is one.
    train_unrestricted(corpora, root / "public.jsonl", root / "anchor", root / "emb", params, tmp_path / "merged",
                       tmp_path / "log.jsonl", tmp_path / "ckpt.pt")
    info = tune_router(tmp_path / "merged", root / "public.jsonl", params, tmp_path / "tuned", tmp_path / "t.pt")
    public_lm = info["methods"]["public_lm"]
    assert info["enabled"] and set(public_lm["proxy_docs"]) == set(OWNERS) and public_lm["steps"] >= 1
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    after = load_model(tmp_path / "tuned").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed), changed


def test_the_router_overlay_is_the_tuned_model_for_loading_slicing_and_export(tiny_anchor_dir, corpora, tmp_path):
    """Router tuning stores router rows only; applied over models/merged they are the tuned model."""
    from stages.export import export_model
    from stages.model.experts import load_merged, slice_experts
    from stages.model.router_fit import set_router_state

    root, _, _ = tiny_anchor_dir
    _, _, info = _tuned_on_synthetic_sets(root, corpora, tmp_path, method="synthetic_ridge", compare=[])
    tuned_dir = tmp_path / "tuned"
    assert not (tuned_dir / "config.json").exists() and not list(tuned_dir.glob("model*.safetensors"))
    assert (tuned_dir / SHIPPED_ROUTER).stat().st_size < (tmp_path / "merged" / "model.safetensors").stat().st_size / 10
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # the tuned model, built by hand
    set_router_state(tuned, load_file(tuned_dir / ROUTER_CANDIDATES / "synthetic_ridge.safetensors"))
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    loaded = load_model(tuned_dir)
    torch.testing.assert_close(logits(loaded), logits(tuned), rtol=1e-6, atol=1e-6)
    assert (logits(loaded) - logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"))).abs().max() > 1e-4
    torch.testing.assert_close(logits(load_merged(tuned_dir, [OWNERS[0]], precision="fp32")),
                               logits(slice_experts(tuned, [1])), rtol=1e-6, atol=1e-6)
    export_model(tuned_dir, root / "anchor", tmp_path / "published", None, None, [], tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(logits(exported), logits(tuned), rtol=1e-6, atol=1e-6)


def test_ridge_reproduces_a_known_linear_rule():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g) * 30  # a residual stream's scale: the penalty is relative to it
    rule = torch.randn(8, 3, generator=g)
    fitted = ridge(x, x @ rule, 1e-8)
    assert torch.allclose(fitted, rule.double(), atol=1e-6)
    # The penalty shrinks the fit towards 0 (and is what keeps an underdetermined fit finite).
    assert ridge(x, x @ rule, 10.0).norm() < 0.5 * rule.norm()


def test_domain_targets_keep_the_public_expert_for_every_domain():
    assert domain_targets(torch.tensor([0, 2, 1]), 3).tolist() == [[1, 0, 0], [1, 0, 1], [1, 1, 0]]


def _publish_synthetic(root, owner: str, texts: list[str], keyring):
    keys = root / "keys" / owner
    enrol_owner_key(create_owner_key(keys), keyring, owner)
    folder = root / "published" / owner / "synthetic"
    folder.mkdir(parents=True)
    write_jsonl(folder / SYNTHETIC_SAMPLES, ({"id": f"{owner}-{i}", "text": t} for i, t in enumerate(texts)))
    sign_package(folder, keys / PRIVATE_KEY, owner)
    return folder


def _tuned_on_synthetic_sets(root, corpora, tmp_path, **router_tuning):
    """A 2-owner merged model (the reference will do: a FlexOlmo model with a merge record) tuned on
    stand-ins for the owners' signed synthetic sets: text of each owner's domain it was not scored on."""
    params = tiny_params(unrestricted={"enabled": True}, merge={"top_k": None},
                         router_tuning={"enabled": True, "seq_len": 16, **router_tuning})
    train_unrestricted(corpora, root / "public.jsonl", root / "anchor", root / "emb", params, tmp_path / "merged",
                       tmp_path / "log.jsonl", tmp_path / "ckpt.pt")
    keyring = tmp_path / "keyring"
    for o in OWNERS:
        _publish_synthetic(tmp_path, o, [f"{o} says {i} times {o}. " * 3 for i in range(100, 120)], keyring)
    info = tune_router(tmp_path / "merged", root / "public.jsonl", params, tmp_path / "tuned", tmp_path / "t.pt",
                       tmp_path / "published", keyring)
    return params, keyring, info


def test_closed_form_router_sends_each_owners_text_to_its_expert(tiny_anchor_dir, corpora, tmp_path):
    from stages.evaluate import routing_share
    from stages.model.scoring import windows

    root, _, _ = tiny_anchor_dir
    params, keyring, info = _tuned_on_synthetic_sets(root, corpora, tmp_path, method="synthetic_ridge", compare=[],
                                                     ridge_scales=[8.0])
    assert info["method"] == "synthetic_ridge"
    ridge_info = info["methods"]["synthetic_ridge"]
    assert set(ridge_info["rows_per_domain"]) == {*OWNERS, "public"} and ridge_info["scale"] == 8.0
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    after = load_model(tmp_path / "tuned")
    changed = {k for k, v in before.state_dict().items() if not torch.equal(v, after.state_dict()[k])}
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed), changed
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    e = params.evaluate.model_copy(update={"max_tokens": 128, "seq_len": 16})
    for i, o in enumerate(OWNERS):
        rows = windows(tokenizer, corpora[o], e.max_tokens, e.seq_len).rows
        other = 2 - i  # the other owner's expert
        share = [routing_share(m, rows, 4) for m in (before, after)]
        # The other owner's expert loses most of what it got; the public expert and the owner's keep the rest.
        assert share[1][other] < 0.5 * share[0][other], (o, share)
        assert share[1][0] + share[1][1 + i] > 0.8, (o, share)

    # A synthetic set altered after the owner signed it is refused, naming the owner.
    with open(tmp_path / "published" / "beta" / "synthetic" / SYNTHETIC_SAMPLES, "a") as fh:
        fh.write(json.dumps({"id": "x", "text": "planted"}) + "\n")
    with pytest.raises(PackageRefused, match="beta"):
        tune_router(tmp_path / "merged", root / "public.jsonl", params, tmp_path / "tuned2", tmp_path / "t.pt",
                    tmp_path / "published", keyring)
    assert not (tmp_path / "tuned2").exists()


def test_method_none_ships_the_router_as_merged_and_still_fits_the_compared_ones(tiny_anchor_dir, corpora, tmp_path):
    root, _, _ = tiny_anchor_dir
    _, _, info = _tuned_on_synthetic_sets(root, corpora, tmp_path, method="none", compare=["synthetic_ridge"],
                                          ridge_scales=[8.0])
    assert info["method"] == "none" and set(info["methods"]) == {"none", "synthetic_ridge"}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    shipped = load_model(tmp_path / "tuned").state_dict()
    assert all(torch.equal(merged[k], shipped[k]) for k in merged)
    candidates = {p.stem: load_file(p) for p in (tmp_path / "tuned" / ROUTER_CANDIDATES).glob("*.safetensors")}
    assert set(candidates) == {"synthetic_ridge"}
    assert any(not torch.equal(merged[k], v) for k, v in candidates["synthetic_ridge"].items())


def test_lm_tuning_on_synthetic_sets_stops_on_held_out_rows_and_saves_every_candidate(tiny_anchor_dir, corpora,
                                                                                      tmp_path):
    root, _, _ = tiny_anchor_dir
    _, _, info = _tuned_on_synthetic_sets(root, corpora, tmp_path, method="synthetic_lm", compare=["synthetic_ridge"],
                                          lr=0.05, max_epochs=30, patience=2)
    lm = info["methods"]["synthetic_lm"]
    held_out = [e["held_out_loss"] for e in lm["log"]]
    # Kept: the epoch with the lowest held-out loss, which beats the router as merged (epoch 0) on
    # these easy sets; stopped `patience` epochs after it unless the budget ran out first.
    assert lm["held_out_loss"] == min(held_out) < held_out[0]
    assert lm["best_epoch"] == held_out.index(min(held_out))
    assert len(held_out) - 1 in (lm["best_epoch"] + 2, 30)
    assert set(lm["rows_per_domain"]) == {*OWNERS, "public"} and len(set(lm["rows_per_domain"].values())) == 1
    ridge_info = info["methods"]["synthetic_ridge"]
    by_scale = ridge_info["held_out_loss_by_scale"]
    assert len(by_scale) == 5 and ridge_info["held_out_loss"] == pytest.approx(min(by_scale.values()))
    assert str(ridge_info["scale"]) == min(by_scale, key=by_scale.get)
    # Every method is judged on the same held-out rows; the router as merged is the baseline.
    assert info["methods"]["none"]["held_out_loss"] == held_out[0]
    candidates = {p.stem: load_file(p) for p in (tmp_path / "tuned" / ROUTER_CANDIDATES).glob("*.safetensors")}
    assert set(candidates) == {"synthetic_lm", "synthetic_ridge"}
    shipped = load_model(tmp_path / "tuned").state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for name, tensor in candidates["synthetic_lm"].items():
        assert torch.equal(shipped[name], tensor)
        assert not torch.equal(candidates["synthetic_ridge"][name], tensor) and not torch.equal(merged[name], tensor)
    assert {k for k in merged if not torch.equal(merged[k], shipped[k])} <= set(candidates["synthetic_lm"])


def test_proxy_documents_are_the_ones_routed_most_to_each_expert():
    share = np.array([[0.5, 0.4, 0.1], [0.2, 0.1, 0.7], [0.3, 0.6, 0.1], [0.1, 0.3, 0.6]])
    lengths = np.array([10, 10, 10, 10])
    assert pick_proxy(share, lengths, {1: 15, 2: 5}) == {1: [2, 0], 2: [1]}


def _domain(domain: str, losses: dict[str, float], spread: float = 0.002, routing: float | None = None,
            documents: int = 40, seed: int = 0) -> DomainEvaluation:
    """A domain's evaluation as stage evaluate builds it, from per-document NLLs: the documents differ
    a lot (20 %), each configuration's own noise per document is `spread`; `routing` is the share on
    the public expert plus the domain's own."""
    from stages.evidence import mean_interval, resample
    from stages.results import scores

    rng = np.random.default_rng(seed)
    tokens, n_bytes = np.full(documents, 100.0), np.full(documents, 400.0)
    difficulty = 1 + 0.2 * rng.standard_normal(documents)
    doc_nll = {m: v * difficulty * (1 + spread * rng.standard_normal(documents)) * tokens for m, v in losses.items()}
    models, compared, _ = scores(doc_nll, tokens, n_bytes, domain=domain)
    own = None if routing is None else mean_interval(
        tokens * np.clip(routing + 0.02 * rng.standard_normal(documents), 0, 1), tokens, resample(documents))
    return DomainEvaluation(domain=domain, experts=["a", "b"], routing={}, models=models, comparisons=compared,
                            own_routing=own)


def _rows(merged: tuple, others: dict, spread: float = 0.002) -> list[DomainEvaluation]:
    """Evaluation records for two owner domains: {model: (loss on a, loss on b)}."""
    models = {"merged": merged, **others}
    return [_domain(d, {m: v[i] for m, v in models.items()}, spread, seed=i) for i, d in enumerate("ab")]


def test_targets_are_judged_by_their_intervals():
    rows = _rows((5.0, 5.0), {"anchor": (5.5, 5.5), "soup": (5.4, 5.4), "btm": (4.9, 5.0), "unrestricted": (4.8, 4.8),
                              "alone/a": (4.9, 5.6), "alone/b": (5.6, 5.2),
                              "without/a": (5.3, 5.02), "without/b": (5.0, 5.1)})
    verdict = {name: v for name, v, _ in targets(rows)}
    assert verdict["merged beats the anchor"] == verdict["merged beats the soup"] == "met"
    assert verdict["merged beats every single expert"] == "met"
    assert verdict["merged beats BTM"] == "missed"  # +1.0 % on a, 0 on b
    assert verdict["merged within 3% of the unrestricted reference"] == "missed"  # +4.2 %
    assert verdict["removing a raises a's loss and moves others < 1%"] == "met"  # b moves +0.4 %
    assert verdict["removing b raises b's loss and moves others < 1%"] == "met"
    moved = _rows((5.0, 5.0), {"without/a": (5.3, 5.2)})  # b moves +4 % when a is removed
    assert dict((n, v) for n, v, _ in targets(moved))["removing a raises a's loss and moves others < 1%"] == "missed"


def test_a_gap_inside_the_documents_noise_cannot_be_told():
    """0.3 % apart with 5 % noise per document: neither met nor missed (the report once called it met)."""
    rows = _rows((5.0, 5.0), {"anchor": (5.015, 5.015), "soup": (5.3, 5.3)}, spread=0.05)
    found = {name: (v, numbers) for name, v, numbers in targets(rows)}
    verdict, numbers = found["merged beats the anchor"]
    assert verdict == "cannot tell at this budget" and numbers.startswith("merged vs anchor: "), numbers
    assert found["merged beats the soup"][0] == "met"


def test_routing_own_model_and_public_targets_are_judged_by_their_intervals():
    public = _domain("public", {"merged": 4.02, "anchor": 4.0}, routing=0.5, seed=3)
    rows = [_domain("a", {"merged": 5.0, "alone/a": 4.96}, routing=0.65, seed=4),
            _domain("b", {"merged": 5.0, "alone/b": 4.9}, routing=0.55, seed=5)]
    found = {name: (v, numbers) for name, v, numbers in targets([public, *rows])}
    verdict, numbers = found["each domain within 1% of its owner's own model"]
    assert verdict == "missed" and numbers.startswith("a +0.8% [") and ", b +2." in numbers, numbers
    assert found["public text within 1% of the anchor"][0] == "met"  # +0.5 %, interval well inside 1 %
    verdict, numbers = found["each domain puts >= 60% of its routing weight on its own expert plus the public one"]
    assert verdict == "missed" and numbers.startswith("public 50% ["), numbers
    rows = [_domain("a", {"merged": 5.0, "alone/a": 4.99}, routing=0.65, seed=4),
            _domain("b", {"merged": 4.9, "alone/b": 4.9}, routing=0.75, seed=5)]
    public = _domain("public", {"merged": 4.02, "anchor": 4.0}, routing=0.7, seed=3)
    verdict = {name: v for name, v, _ in targets([public, *rows])}
    assert verdict["each domain within 1% of its owner's own model"] == "met"
    assert verdict["each domain puts >= 60% of its routing weight on its own expert plus the public one"] == "met"


def test_the_price_of_dp_is_stated_with_paired_intervals(tmp_path):
    """A DP owner's model and the merged model against its non-DP twin's, each with its interval."""
    from stages.report import dp_markdown

    row = _domain("a", {"merged": 5.0, "anchor": 5.5, "alone/a": 5.2, "dp_baseline/alone": 5.0,
                        "dp_baseline/merged": 4.98})
    row.dp_baseline = {"train_seconds": 10.0, "steps": 10}
    write_json(tmp_path / "a" / "train_metrics.json", {"train_seconds": 30.0, "steps": 10, "dp": {
        "epsilon": 7.9, "delta": 1e-5, "accountant": "prv", "noise_multiplier": 0.8}})
    table = dp_markdown([row], tmp_path)
    cells = [c.strip() for c in table.splitlines()[-1].strip("|").split("|")]
    m = row.models
    assert cells[:6] == ["a", "7.90 at 1e-05 (prv)", "0.800", m["anchor"].loss_interval.text(),
                         m["alone/a"].loss_interval.text(), m["dp_baseline/alone"].loss_interval.text()]
    assert cells[6].startswith("+4.0% [") and cells[9].startswith("+0.")  # DP vs no DP: own (+4 %), merged (+0.4 %)
    low, high = (float(x) for x in cells[6].split("[")[1].rstrip("]").split(","))
    assert 3.5 < low < 4.0 < high < 4.5, cells[6]  # paired: the documents' 20 % spread cancels
    assert cells[-1] == "1.00 s (3.00x)"


def test_evaluation_record_of_an_old_merge_has_no_bias_to_toggle(tmp_path):
    from test_experts import random_merged

    from stages.model.experts import toggled_router_bias

    write_json(tmp_path / MERGED_INFO, {"experts": [{"owner": "public"}, {"owner": "a"}, {"owner": "b"}, {"owner": "c"}]})
    with pytest.raises(ValueError, match="re-run merge_experts"):
        toggled_router_bias(random_merged(), tmp_path)
