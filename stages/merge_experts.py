"""Stage (coordinator): merge the anchor and the published experts into one FlexOlmo model.

Stacks [public FFN, FFN_1 ... FFN_n] and [r_pub; r_1 ... r_n] per layer, the public FFN and every
shared tensor taken from this pipeline's own anchor. Before merging, every package's signature
must verify with its owner's key in the coordinator's keyring (stages/package.py), its manifest
must name this anchor and tokenizer, and its tensors must fit this anchor's shapes; otherwise the
merge is refused, saying which check failed.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.utils import GENERATION_CONFIG_NAME

from stages import params as P
from stages.artifacts import ANCHOR_INFO, MANIFEST, MANIFEST_VERSION, MERGED_INFO, PRESENT_OWNERS
from stages.io import atomic_dir, file_digest, read_json, write_json
from stages.model.moe import moe_class, moe_config, moe_extra_state, per_expert_checkpoint
from stages.model.router_rows import load_embedding
from stages.model.tensor_files import DEFAULT_SHARD_BYTES, ShardWriter, TensorFiles
from stages.package import PackageRefused, enrolled_key, open_expert_tensors, verify_package
from stages.runtime import start_stage

READABLE_MANIFESTS = (MANIFEST_VERSION,)  # earlier packages were unsigned (3: whole 2-expert models)


class MergeRefused(ValueError):
    """An expert cannot be merged with this anchor."""


def check_manifest(name: str, manifest: dict, anchor_hash: str, tokenizer_hash: str) -> None:
    """Raise MergeRefused unless the manifest is this version's, this owner's, for this anchor and tokenizer."""
    if manifest.get("schema_version") not in READABLE_MANIFESTS:
        raise MergeRefused(f"expert {name}: manifest schema {manifest.get('schema_version')!r}, this version reads "
                           f"{READABLE_MANIFESTS}; retrain it with this version (consort run --force train_expert@{name})")
    if manifest.get("owner") != name:
        raise MergeRefused(f"expert {name}: the package's manifest is owner {manifest.get('owner')!r}'s")
    if manifest.get("anchor_hash") != anchor_hash:
        raise MergeRefused(f"expert {name}: trained against anchor {str(manifest.get('anchor_hash'))[:12]}, "
                           f"but this pipeline's anchor is {anchor_hash[:12]}; retrain the expert against this anchor")
    if manifest.get("tokenizer_hash") != tokenizer_hash:
        raise MergeRefused(f"expert {name}: trained with tokenizer {str(manifest.get('tokenizer_hash'))[:12]}, "
                           f"but this pipeline's is {tokenizer_hash[:12]}; retrain the expert with this anchor's tokenizer")


def anchor_identity(anchor_dir: Path) -> tuple[str, str]:
    """(the anchor's hash, its tokenizer's digest): what every package's manifest must name."""
    return read_json(anchor_dir / ANCHOR_INFO)["anchor_hash"], file_digest(anchor_dir / "tokenizer.json")


def load_package(owner: str, package: Path, keyring: Path, c: PretrainedConfig, anchor_hash: str,
                 tokenizer_hash: str) -> tuple[dict, TensorFiles]:
    """(manifest, tensors read on demand) of a package whose signature, manifest and shapes (for anchor
    config `c`) all hold."""
    manifest_path = package / MANIFEST
    if not manifest_path.exists():
        raise MergeRefused(f"expert {owner}: {manifest_path} is missing; is {package} an expert package?")
    try:  # first: nothing of a package is trusted, not even its manifest, before its signature holds
        verify_package(package, owner, enrolled_key(keyring, owner))
        manifest = json.loads(manifest_path.read_text())
        check_manifest(owner, manifest, anchor_hash, tokenizer_hash)
        tensors = open_expert_tensors(package, owner, c.num_hidden_layers, c.hidden_size, c.intermediate_size)
    except PackageRefused as err:
        raise MergeRefused(str(err)) from None
    return manifest, tensors


def check_package(owner: str, package: Path, keyring: Path, anchor_dir: Path) -> None:
    """Raise MergeRefused unless the merge would take this package (what a coordinator asks before
    merging, so that one refused owner can be left out instead of failing the merge)."""
    load_package(owner, package, keyring, AutoConfig.from_pretrained(anchor_dir), *anchor_identity(anchor_dir))


def merge_experts(anchor_dir: Path, public_embedding: Path, experts: dict[str, Path], m: P.MergeParams,
                  out_dir: Path, keyring: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write the merged model into `out_dir`, tensor by tensor: the anchor's shared tensors as they are,
    then each layer's stacked experts and router rows, in shards of at most `shard_bytes` (beside one
    layer's tensors, all the merge holds in memory)."""
    if not experts:
        raise MergeRefused("no expert to merge: params.yaml lists no owner")
    c = AutoConfig.from_pretrained(anchor_dir)
    anchor_hash, tokenizer_hash = anchor_identity(anchor_dir)
    r_pub = load_embedding(public_embedding)
    num_experts = 1 + len(experts)
    top_k = min(m.top_k or num_experts, num_experts)
    keep_bias = m.router_bias == "keep"
    try:
        config = moe_config(c, num_experts=num_experts, top_k=top_k, keep_bias=keep_bias)
    except ValueError as err:
        raise MergeRefused(f"{anchor_dir}: {err}") from None
    anchor = TensorFiles(anchor_dir)
    packages = {o: load_package(o, d, keyring, c, anchor_hash, tokenizer_hash) for o, d in experts.items()}
    biases = {o: [min(float(t.get(f"layers.{i}.bias")), 0.0) for i in range(c.num_hidden_layers)]
              for o, (_, t) in packages.items()}
    per_expert = per_expert_checkpoint(config)
    with atomic_dir(out_dir) as tmp:
        out = ShardWriter(tmp, shard_bytes)
        for name in anchor.keys():
            if ".mlp." not in name:  # shared verbatim (a tied lm_head is not in the anchor's files)
                out.add(name, anchor.get(name))
        for name, tensor in moe_extra_state(config).items():
            out.add(name, tensor)
        for i in range(c.num_hidden_layers):
            dense, layer = f"model.layers.{i}.mlp.", f"layers.{i}."
            public = [anchor.get(dense + p + "_proj.weight") for p in ("gate", "up", "down")]
            if per_expert:  # one FFN per expert, as save_pretrained stores them: nothing stacked
                for k, ffn in enumerate([public] + [[*t.get(layer + "gate_up_proj").chunk(2), t.get(layer + "down_proj")]
                                                   for _, t in packages.values()]):
                    for p, tensor in zip(("gate", "up", "down"), ffn):
                        out.add(f"{dense}experts.{k}.{p}_proj.weight", tensor.clone())
            else:  # the model's own packed layout (the biased class)
                out.add(dense + "experts.gate_up_proj", torch.stack(
                    [torch.cat(public[:2])] + [t.get(layer + "gate_up_proj") for _, t in packages.values()]))
                out.add(dense + "experts.down_proj", torch.stack(
                    [public[2]] + [t.get(layer + "down_proj") for _, t in packages.values()]))
            out.add(dense + "gate.weight", torch.stack(
                [r_pub.view(-1)] + [t.get(layer + "router") for _, t in packages.values()]))
            if keep_bias:  # the public expert has no bias; an owner's is min(b, 0) as trained
                out.add(dense + "gate.bias", torch.tensor([0.0] + [biases[o][i] for o in experts]))
        out.close()
        config.architectures = [moe_class(config).__name__]
        config.dtype = anchor.get(next(iter(anchor.keys()))).dtype
        config.save_pretrained(tmp)
        if (anchor_dir / GENERATION_CONFIG_NAME).exists():
            shutil.copy2(anchor_dir / GENERATION_CONFIG_NAME, tmp / GENERATION_CONFIG_NAME)
        AutoTokenizer.from_pretrained(anchor_dir).save_pretrained(tmp)
        info = {
            "anchor_hash": anchor_hash,
            "top_k": top_k,
            "router_bias": m.router_bias,
            "experts": [{"index": 0, "owner": "public"}] + [
                {"index": i, "owner": owner, "data_digest": packages[owner][0]["data_digest"],
                 "anchor_hash": packages[owner][0]["anchor_hash"],
                 # kept here even when dropped from the weights, so the evaluation can score both ways
                 "router_bias": biases[owner]}
                for i, owner in enumerate(experts, start=1)],
        }
        write_json(tmp / MERGED_INFO, info)
    return info


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--anchor", type=Path, required=True)
    ap.add_argument("--public-embedding", type=Path, required=True)
    ap.add_argument("--published", type=Path, required=True, help="folder holding <owner>/expert packages")
    ap.add_argument("--keyring", type=Path, required=True, help="folder of the owners' public keys, <owner>.pub")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    params = P.load(args.params)
    # Every owner's expert is merged; opting out (inference.disabled) slices it out where the model
    # runs, so enabling or disabling an owner never re-runs the merge. A coordinator whose owners run
    # remotely lists the owners that delivered (flows/remote.py); it may merge without one that failed.
    present = args.published / PRESENT_OWNERS
    owners = [o for o in read_json(present)["owners"] if o in params.owners] if present.exists() else list(params.owners)
    experts = {o: args.published / o / "expert" for o in owners}
    try:
        info = merge_experts(args.anchor, args.public_embedding, experts, params.merge, args.out, args.keyring)
    except MergeRefused as err:
        raise SystemExit(f"merge refused: {err}") from None
    print(f"merged {len(info['experts'])} experts (top-{info['top_k']}) -> {args.out}")


if __name__ == "__main__":
    main()
