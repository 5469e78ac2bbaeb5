"""Merging experts: the anchor-identity check and the stacked result."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, FlexOlmoForCausalLM

from conftest import tiny_anchor
from stages import params as P
from stages.experts import toggled_router_bias
from stages.io import write_json
from stages.merge_experts import MERGED_INFO, MergeRefused, merge_experts
from stages.moe import OWNER, BiasedFlexOlmoForCausalLM, blocks, export_flexolmo, upcycle
from stages.train_anchor import anchor_hash
from stages.train_expert import MANIFEST, MANIFEST_VERSION

H = 32


@pytest.fixture(scope="module")
def setup(tiny_anchor_dir):
    return tiny_anchor_dir


def publish(root, name, base, r_pub, seed, claimed_hash=None, bias=0.0):
    """An expert package as train_expert writes it, with the owner half perturbed (as if trained)."""
    model = upcycle(base, r_pub, torch.randn(H, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        for b in blocks(model):
            for p in b.experts[OWNER].parameters():
                p.add_(0.05 * torch.randn_like(p))
    out = root / "published" / name
    export_flexolmo(model).save_pretrained(out)
    with torch.no_grad():
        for b in blocks(model):
            b.owner_bias.fill_(bias)
    write_json(out / MANIFEST, {"schema_version": MANIFEST_VERSION, "owner": name, "data_digest": f"d-{name}",
                                "anchor_hash": claimed_hash or anchor_hash(base),
                                "router_bias": [bias] * len(blocks(model))})
    return model, out


def test_merge_stacks_experts_and_reloads(setup):
    root, anchor, r_pub = setup
    models, dirs = {}, {}
    for i, name in enumerate(["alpha", "beta"]):
        models[name], dirs[name] = publish(root, name, anchor, r_pub, seed=10 + i)
    info = merge_experts(root / "anchor", root / "emb", dirs, P.MergeParams(top_k=None), root / "merged")
    assert [e["owner"] for e in info["experts"]] == ["public", "alpha", "beta"]
    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    assert merged.config.num_experts == 3 and merged.config.num_experts_per_tok == 3
    assert json.loads((root / "merged" / MERGED_INFO).read_text())["anchor_hash"] == anchor_hash(anchor)
    for i, name in enumerate(["alpha", "beta"], start=1):
        layer0 = merged.model.layers[0].mlp
        owner_ffn = blocks(models[name])[0].experts[OWNER]
        assert torch.equal(layer0.experts.down_proj[i], owner_ffn.down_proj.weight)
        assert torch.equal(layer0.gate.weight[i], blocks(models[name])[0].routers[OWNER].weight[0])
    assert torch.equal(merged.model.layers[1].mlp.gate.weight[0], r_pub)


def test_kept_bias_round_trips_and_matches_the_training_block(setup, tmp_path):
    root, anchor, r_pub = setup
    model, out = publish(root, "biased", anchor, r_pub, seed=4, bias=-1.5)
    merge_experts(root / "anchor", root / "emb", {"biased": out}, P.MergeParams(router_bias="keep"), tmp_path / "keep")
    merge_experts(root / "anchor", root / "emb", {"biased": out}, P.MergeParams(router_bias="drop"), tmp_path / "drop")
    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "keep")
    assert type(kept) is BiasedFlexOlmoForCausalLM
    assert torch.equal(kept.model.layers[0].mlp.gate.bias, torch.tensor([0.0, -1.5]))
    ids = torch.randint(2, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(kept(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)  # b applied
        for b in blocks(model):
            b.apply_bias = False
        dropped = AutoModelForCausalLM.from_pretrained(tmp_path / "drop")
        assert type(dropped) is FlexOlmoForCausalLM
        assert torch.allclose(dropped(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(kept(input_ids=ids).logits, dropped(input_ids=ids).logits, atol=1e-3)
        # The stock class reads the kept folder too, with the bias dropped.
        stock = FlexOlmoForCausalLM.from_pretrained(tmp_path / "keep")
        assert torch.allclose(stock(input_ids=ids).logits, dropped(input_ids=ids).logits, atol=1e-6)
        kept.save_pretrained(tmp_path / "again")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
        assert torch.equal(again(input_ids=ids).logits, kept(input_ids=ids).logits)
        # The evaluation's bias ablation: each merge toggled gives the other one.
        from_drop = toggled_router_bias(dropped, tmp_path / "drop")
        from_keep = toggled_router_bias(kept, tmp_path / "keep")
        assert type(from_drop) is BiasedFlexOlmoForCausalLM and type(from_keep) is FlexOlmoForCausalLM
        assert torch.equal(from_drop(input_ids=ids).logits, kept(input_ids=ids).logits)
        assert torch.equal(from_keep(input_ids=ids).logits, dropped(input_ids=ids).logits)


def test_packages_of_the_previous_manifest_schema_still_merge(setup, tmp_path):
    root, anchor, r_pub = setup
    _, out = publish(root, "old", anchor, r_pub, seed=5, bias=-0.5)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["schema_version"], manifest["router_bias_dropped"] = 1, manifest.pop("router_bias")
    write_json(out / MANIFEST, manifest)
    merge_experts(root / "anchor", root / "emb", {"old": out}, P.MergeParams(router_bias="keep"), tmp_path / "m")
    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(kept.model.layers[1].mlp.gate.bias, torch.tensor([0.0, -0.5]))
    write_json(out / MANIFEST, {**manifest, "schema_version": 99})
    with pytest.raises(MergeRefused, match="manifest schema 99.*--force train_expert@old"):
        merge_experts(root / "anchor", root / "emb", {"old": out}, P.MergeParams(), tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


def test_single_expert_merge_equals_the_expert_model(setup):
    root, anchor, r_pub = setup
    model, out = publish(root, "solo", anchor, r_pub, seed=3)
    merge_experts(root / "anchor", root / "emb", {"solo": out}, P.MergeParams(top_k=None), root / "merged_solo")
    merged = AutoModelForCausalLM.from_pretrained(root / "merged_solo")
    for b in blocks(model):
        b.apply_bias = False
    ids = torch.randint(2, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_expert_from_another_anchor_is_refused_naming_tensor(setup):
    root, anchor, r_pub = setup
    other = tiny_anchor(seed=1, vocab=300)
    _, good = publish(root, "good", anchor, r_pub, seed=1)
    # claims our anchor's hash, but its shared tensors come from another anchor
    _, forged = publish(root, "forged", other, r_pub, seed=2, claimed_hash=anchor_hash(anchor))
    with pytest.raises(MergeRefused, match=r"expert forged: tensor model\.embed_tokens\.weight differs"):
        merge_experts(root / "anchor", root / "emb", {"good": good, "forged": forged}, P.MergeParams(), root / "m2")
    assert not (root / "m2").exists()
    # honest about its anchor: refused on the hash, before any tensor is compared
    _, honest = publish(root, "honest", other, r_pub, seed=2)
    with pytest.raises(MergeRefused, match=r"expert honest: trained against anchor .* retrain"):
        merge_experts(root / "anchor", root / "emb", {"honest": honest}, P.MergeParams(), root / "m3")


def test_modified_public_half_is_refused(setup):
    root, anchor, r_pub = setup
    model, out = publish(root, "tamper", anchor, r_pub, seed=4)
    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        hf.model.layers[1].mlp.experts.down_proj[0, 0, 0] += 1e-3
    hf.save_pretrained(out)
    with pytest.raises(MergeRefused, match=r"expert tamper: tensor model\.layers\.1\.mlp\.experts\.down_proj\[public\] differs"):
        merge_experts(root / "anchor", root / "emb", {"tamper": out}, P.MergeParams(), root / "m4")
