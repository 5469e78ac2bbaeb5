"""Merging experts: the anchor-identity check and the stacked result."""
import json

import pytest
import torch
from conftest import tiny_anchor
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FlexOlmoForCausalLM

from stages import params as P
from stages.artifacts import MANIFEST, MANIFEST_VERSION, SIGNATURE, WEIGHTS
from stages.io import file_digest, write_json
from stages.merge_experts import MERGED_INFO, MergeRefused
from stages.merge_experts import merge_experts as merge_with_keyring
from stages.model.experts import toggled_router_bias
from stages.model.moe import OWNER, BiasedFlexOlmoForCausalLM, blocks, upcycle
from stages.package import create_owner_key, enrol_owner_key, expert_tensors, sign_package
from stages.train_anchor import anchor_hash

H = 32


@pytest.fixture(scope="module")
def setup(tiny_anchor_dir):
    root = tiny_anchor_dir[0]
    KEYS.update(keys=root / "keys", keyring=root / "keyring", tokenizer_hash=file_digest(root / "anchor" / "tokenizer.json"))
    return tiny_anchor_dir


# Where the test owners' keys live, and the coordinator's keyring: set by the setup fixture.
KEYS: dict[str, object] = {}


def merge_experts(anchor_dir, emb, experts, m, out):
    """The merge with the keyring every test package's owner is enrolled in."""
    return merge_with_keyring(anchor_dir, emb, experts, m, out, keyring=KEYS["keyring"])


def resign(out, name):
    """Sign the package again, as its owner (after the test changed it on the owner's side)."""
    sign_package(out, KEYS["keys"] / name / "signing_key.pem", name)


def publish(root, name, base, r_pub, seed, claimed_hash=None, bias=0.0):
    """A signed expert package as train_expert writes it, with the owner half perturbed (as if trained)."""
    model = upcycle(base, r_pub, torch.randn(H, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        for b in blocks(model):
            for p in b.experts[OWNER].parameters():
                p.add_(0.05 * torch.randn_like(p))
    out = root / "published" / name
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for b in blocks(model):
            b.owner_bias.fill_(bias)
    save_file(expert_tensors(model), out / WEIGHTS)
    write_json(out / MANIFEST, {"schema_version": MANIFEST_VERSION, "owner": name, "data_digest": f"d-{name}",
                                "anchor_hash": claimed_hash or anchor_hash(base), "tokenizer_hash": KEYS["tokenizer_hash"]})
    enrol_owner_key(create_owner_key(KEYS["keys"] / name), KEYS["keyring"], name)
    resign(out, name)
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


def test_a_manifest_of_another_schema_is_refused(setup, tmp_path):
    root, anchor, r_pub = setup
    _, out = publish(root, "old", anchor, r_pub, seed=5, bias=-0.5)
    manifest = json.loads((out / MANIFEST).read_text())
    write_json(out / MANIFEST, {**manifest, "schema_version": 2})  # unsigned packages were schema 2
    resign(out, "old")
    with pytest.raises(MergeRefused, match="manifest schema 2.*--force train_expert@old"):
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


def test_expert_from_another_anchor_or_architecture_is_refused(setup, tmp_path):
    root, anchor, r_pub = setup
    other = tiny_anchor(seed=1, vocab=300)
    _, good = publish(root, "good", anchor, r_pub, seed=1)
    # Honest about the anchor it was trained against: refused on the hash, before any tensor is read.
    _, honest = publish(root, "honest", other, r_pub, seed=2)
    with pytest.raises(MergeRefused, match=r"expert honest: trained against anchor .* retrain"):
        merge_experts(root / "anchor", root / "emb", {"good": good, "honest": honest}, P.MergeParams(), root / "m3")
    assert not (root / "m3").exists()
    # Signed for this anchor but shaped for another model: refused naming the tensor.
    _, wide = publish(root, "wide", anchor, r_pub, seed=3)
    tensors = load_file(wide / WEIGHTS)
    tensors["layers.1.down_proj"] = torch.zeros(32, 80)
    save_file(tensors, wide / WEIGHTS)
    resign(wide, "wide")
    with pytest.raises(MergeRefused, match=r"expert wide: tensor layers\.1\.down_proj has shape \(32, 80\), this anchor "
                                           r"needs \(32, 64\)"):
        merge_experts(root / "anchor", root / "emb", {"wide": wide}, P.MergeParams(), tmp_path / "m4")
    del tensors["layers.1.down_proj"]
    save_file(tensors, wide / WEIGHTS)
    resign(wide, "wide")
    with pytest.raises(MergeRefused, match=r"expert wide: tensor layers\.1\.down_proj is missing"):
        merge_experts(root / "anchor", root / "emb", {"wide": wide}, P.MergeParams(), tmp_path / "m5")


def test_a_package_holds_only_the_owners_tensors(setup):
    root, anchor, r_pub = setup
    model, out = publish(root, "slim", anchor, r_pub, seed=4)
    tensors = load_file(out / WEIGHTS)
    layers = anchor.config.num_hidden_layers
    kinds = ("gate_up_proj", "down_proj", "router", "bias")
    assert set(tensors) == {f"layers.{i}.{n}" for i in range(layers) for n in kinds}
    owner = blocks(model)[0].experts[OWNER]
    assert torch.equal(tensors["layers.0.gate_up_proj"], torch.cat([owner.gate_proj.weight, owner.up_proj.weight]))
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS, MANIFEST, SIGNATURE])


def test_swapping_in_a_twin_expert_equals_merging_the_twin(setup, tmp_path):
    """The DP comparison's 'merged with the no-DP expert' is exactly the merge with that package."""
    from stages.model.experts import with_expert_from

    root, anchor, r_pub = setup
    _, alpha = publish(tmp_path, "alpha", anchor, r_pub, seed=30)
    _, beta = publish(tmp_path, "beta", anchor, r_pub, seed=31)
    _, twin = publish(tmp_path / "twin", "beta", anchor, r_pub, seed=32)  # beta's other package
    merge_experts(root / "anchor", root / "emb", {"alpha": alpha, "beta": beta}, P.MergeParams(top_k=2), tmp_path / "m1")
    merge_experts(root / "anchor", root / "emb", {"alpha": alpha, "beta": twin}, P.MergeParams(top_k=2), tmp_path / "m2")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m1")
    swapped = with_expert_from(merged, 2, load_file(twin / WEIGHTS))
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "m2")
    for key, value in expected.state_dict().items():
        assert torch.equal(swapped.state_dict()[key], value), key
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(swapped(ids).logits, merged(ids).logits)  # the twin really differs


def _flip_one_byte(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_or_foreign_packages_are_refused_saying_why(setup, tmp_path):
    root, anchor, r_pub = setup
    cases = {}
    for name in ("weights", "manifest", "unsigned", "added", "foreign", "unenrolled"):
        cases[name] = publish(root, f"t_{name}", anchor, r_pub, seed=40)[1]
    _flip_one_byte(cases["weights"] / WEIGHTS, offset=-5)  # inside the tensor data
    manifest_path = cases["manifest"] / MANIFEST
    manifest_path.write_text(manifest_path.read_text().replace('"d-t_manifest"', '"d-t_manifesT"'))
    (cases["unsigned"] / SIGNATURE).unlink()
    (cases["added"] / "extra.bin").write_bytes(b"x")
    # Signed with a key the coordinator never enrolled for this owner.
    create_owner_key(tmp_path / "intruder")
    sign_package(cases["foreign"], tmp_path / "intruder" / "signing_key.pem", "t_foreign")
    (KEYS["keyring"] / "t_unenrolled.pub").unlink()
    expected = {
        "weights": r"file expert\.safetensors changed after it was signed",
        "manifest": r"file consort_expert\.json changed after it was signed",
        "unsigned": r"\S+/consort_signature\.json is missing: the package is unsigned",
        "added": r"file extra\.bin is not covered by the signature",
        "foreign": r"the signature does not verify with t_foreign's enrolled key",
        "unenrolled": r"no public key for 't_unenrolled' in the keyring",
    }
    for name, pattern in expected.items():
        owner = f"t_{name}"
        with pytest.raises(MergeRefused, match=rf"expert {owner}: {pattern}"):
            merge_experts(root / "anchor", root / "emb", {owner: cases[name]}, P.MergeParams(), tmp_path / name)
        assert not (tmp_path / name).exists()
    # The untouched twin of these packages merges: the refusals are the changes, not the packages.
    _, clean = publish(root, "t_clean", anchor, r_pub, seed=40)
    merge_experts(root / "anchor", root / "emb", {"t_clean": clean}, P.MergeParams(), tmp_path / "clean")


def test_a_package_for_another_tokenizer_is_refused(setup, tmp_path):
    root, anchor, r_pub = setup
    _, out = publish(root, "tok", anchor, r_pub, seed=41)
    manifest = json.loads((out / MANIFEST).read_text())
    write_json(out / MANIFEST, {**manifest, "tokenizer_hash": "0" * 64})
    resign(out, "tok")
    with pytest.raises(MergeRefused, match=r"expert tok: trained with tokenizer 000000000000, .* retrain"):
        merge_experts(root / "anchor", root / "emb", {"tok": out}, P.MergeParams(), tmp_path / "m")


def test_the_keyring_keeps_an_owners_first_key(tmp_path):
    from stages.package import PackageRefused

    enrol_owner_key(create_owner_key(tmp_path / "a"), tmp_path / "ring", "alice")
    assert oct((tmp_path / "a" / "signing_key.pem").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(PackageRefused, match="already holds a different key for owner 'alice'"):
        enrol_owner_key(create_owner_key(tmp_path / "b"), tmp_path / "ring", "alice")


def test_a_merge_in_small_shards_holds_the_same_tensors_and_loads_with_stock_transformers(setup, tmp_path):
    """The merge writes tensor by tensor; with shards smaller than a layer's experts the result is
    the Hugging Face sharded layout, tensor for tensor the one-file merge."""
    from safetensors import safe_open

    from stages.model.tensor_files import INDEX_FILE, SINGLE_FILE, TensorFiles

    root, anchor, r_pub = setup
    dirs = {name: publish(root, name, anchor, r_pub, seed=20 + i)[1] for i, name in enumerate(["gamma", "delta"])}
    merge_with_keyring(root / "anchor", root / "emb", dirs, P.MergeParams(), tmp_path / "one", keyring=KEYS["keyring"])
    merge_with_keyring(root / "anchor", root / "emb", dirs, P.MergeParams(), tmp_path / "shards",
                       keyring=KEYS["keyring"], shard_bytes=20_000)
    assert (tmp_path / "one" / SINGLE_FILE).exists() and not (tmp_path / "one" / INDEX_FILE).exists()
    weight_map = json.loads((tmp_path / "shards" / INDEX_FILE).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) > 3 and files[-1].endswith(f"-of-{len(files):05d}.safetensors")
    for file in files:  # every shard but one with several tensors is within the bound
        with safe_open(tmp_path / "shards" / file, framework="pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]
        assert len(sizes) == 1 or sum(sizes) <= 20_000, file
    one, shards = TensorFiles(tmp_path / "one"), TensorFiles(tmp_path / "shards")
    assert sorted(one.keys()) == sorted(shards.keys()) == sorted(weight_map)
    assert all(torch.equal(one.get(k), shards.get(k)) for k in one.keys())
    ids = torch.randint(2, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(tmp_path / d)(input_ids=ids).logits for d in ("one", "shards")]
    assert torch.equal(*logits)
    # Slicing on disk (an export, an opt-out) equals slicing in memory, from shards into shards.
    from stages.model.experts import slice_experts, write_sliced

    (tmp_path / "sliced").mkdir()
    write_sliced(tmp_path / "shards", [2], tmp_path / "sliced", shard_bytes=20_000)
    assert (tmp_path / "sliced" / INDEX_FILE).exists()
    on_disk = AutoModelForCausalLM.from_pretrained(tmp_path / "sliced")
    in_memory = slice_experts(AutoModelForCausalLM.from_pretrained(tmp_path / "one"), [2])
    assert on_disk.config.num_experts == 2
    expected = in_memory.state_dict()
    assert set(on_disk.state_dict()) == set(expected)
    assert all(torch.equal(v, expected[k]) for k, v in on_disk.state_dict().items())
