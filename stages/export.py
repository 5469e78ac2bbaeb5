"""A stock checkpoint for other tools (lm-eval, `transformers.pipeline`, vLLM): only the enabled experts.

Opt-outs live in params.yaml and consort's loader applies them; a tool that loads
`models/merged` directly would run every expert. The export is the shipped merged model sliced
to the experts asked for (stages/model/experts.py), so an opted-out owner's tensors are not in
it at all, with a model card saying what it holds: the anchor (source, licence, hash) and each
expert (owner, data digest, package hash, DP epsilon), and the report's evaluation table.
"""
from __future__ import annotations

from pathlib import Path

from stages.artifacts import ANCHOR_INFO, EXPORT_INFO, MANIFEST, MERGED_INFO
from stages.io import atomic_dir, read_json, write_json, write_text
from stages.package import package_hash


def expert_records(merged_dir: Path, published: Path, owners: list[str]) -> list[dict]:
    """What the card and the registry say of each expert: owner, data digest, package hash, DP epsilon, and
    how many document ids its owner had taken down when it trained (its manifest's erasure record)."""
    by_owner = {e["owner"]: e for e in read_json(merged_dir / MERGED_INFO)["experts"][1:]}
    records = []
    for owner in owners:
        package = published / owner / "expert"
        manifest = read_json(package / MANIFEST) if (package / MANIFEST).exists() else {}
        dp = manifest.get("dp")
        records.append({"owner": owner, "data_digest": by_owner[owner].get("data_digest", ""),
                        "package_hash": package_hash(package),
                        "dp_epsilon": dp["epsilon"] if dp else None, "dp_delta": dp["delta"] if dp else None,
                        "takedowns": (manifest.get("takedown") or {}).get("requested", 0)})
    return records


def model_card(anchor: dict, experts: list[dict], left_out: list[str], top_k: int, eval_table: str) -> str:
    source = anchor.get("source")
    where = (f"{source['where']} ({source['kind']}; licence {source['licence']}; SHA-256 of the original "
             f"weights `{source['sha256']}`)" if source else "trained from scratch on the public corpus")
    rows = [f"| {e['owner']} | `{e['data_digest'][:16]}` | `{e['package_hash'][:16]}` | "
            + (f"{e['dp_epsilon']:.2f} at delta {e['dp_delta']:g}" if e["dp_epsilon"] is not None else "none")
            + " |" for e in experts]
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [consort, flexolmo, mixture-of-experts]", "---", "", "# consort merged model", "",
        "A FlexOlmo mixture of experts: expert 0 is the public anchor's FFN, each other expert an owner's,",
        f"trained by that owner against the frozen anchor on its own machine; top-{top_k} routing. Loads with",
        "`AutoModelForCausalLM.from_pretrained` and no consort code.", "",
        f"**Anchor**: {where}; consort anchor hash `{anchor['anchor_hash']}`.", "",
        "| expert owner | data digest (SHA-256) | package hash (SHA-256 of its signature) | DP epsilon |",
        "|---|---|---|---|", *rows, "",
        ("**Left out** (opted out; none of their weights are in this checkpoint): " + ", ".join(left_out) + "."
         if left_out else "Every owner's expert is in this checkpoint."), "",
        "## Evaluation (consort's report, with every configuration it compares)", "",
        *(["The report's figures are of the merged model as evaluated; the columns and rows naming the owners "
           "left out are removed (averages over the owners still include them).", ""] if left_out else []),
        eval_table.strip() or "(no report)", "",
    ])


def without_owners(tables: str, owners: list[str]) -> str:
    """The report's markdown less what names one of `owners`: their columns, and every row that names
    them (their own numbers); the text between tables is kept."""
    import re

    if not owners:
        return tables
    named = re.compile(r"\b(" + "|".join(map(re.escape, owners)) + r")\b")
    out, table = [], []

    def flush() -> None:
        cells = [line.strip().strip("|").split("|") for line in table]
        drop = {j for j, head in enumerate(cells[0]) if named.search(head)} if cells else set()
        for i, row in enumerate(cells):
            kept = [c for j, c in enumerate(row) if j not in drop]
            if i < 2 or not any(named.search(c) for c in kept):  # the header and its rule stay
                out.append("|" + "|".join(kept) + "|")
        table.clear()

    for line in tables.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        out.append(line)
    flush()
    return "\n".join(out)


def export_model(merged_dir: Path, anchor_dir: Path, published: Path, eval_table: Path | None,
                 experts: list[str] | str | None, disabled: list[str], out: Path) -> dict:
    """Write the shipped merged model with only `experts` (default: every owner not in `disabled`) to `out`,
    tensor by tensor in shards (stages/model/experts.write_sliced); return what it holds (the summary
    written as consort_export.json)."""
    # Here, not at the top: the lineage reads expert_records without loading torch and transformers.
    from transformers import AutoTokenizer

    from stages.artifacts import model_weights
    from stages.model.experts import merged_owners, resolve_experts, write_sliced
    from stages.model.moe import BiasedFlexOlmoConfig

    if out.exists() and any(out.iterdir()) and not (out / EXPORT_INFO).exists():
        raise FileExistsError(f"{out} exists and holds something other than a consort export; "
                              "name a new folder (an earlier export is replaced)")
    owners = merged_owners(merged_dir)
    chosen = resolve_experts(experts, owners, disabled)
    config = read_json(model_weights(merged_dir) / "config.json")
    if config.get("model_type") == BiasedFlexOlmoConfig.model_type:
        raise ValueError(f"{merged_dir} keeps the router biases in consort's own class (merge.router_bias: keep), "
                         "which other tools cannot load; merge with merge.router_bias: drop to export")
    info = read_json(merged_dir / MERGED_INFO)
    records = expert_records(merged_dir, published, chosen)
    left_out = [o for o in owners if o not in chosen]
    summary = {"source": merged_dir.name, "experts": records, "left_out": left_out,
               "num_experts": 1 + len(chosen), "top_k": min(config["num_experts_per_tok"], 1 + len(chosen))}
    # A left-out owner's evaluation numbers leave with its weights.
    table = without_owners(eval_table.read_text(), left_out) if eval_table and eval_table.exists() else ""
    with atomic_dir(out) as tmp:
        write_sliced(merged_dir, [1 + owners.index(o) for o in chosen], tmp)
        AutoTokenizer.from_pretrained(merged_dir).save_pretrained(tmp)
        write_json(tmp / EXPORT_INFO, summary | {"anchor_hash": info["anchor_hash"]})
        write_text(tmp / "README.md", model_card(read_json(anchor_dir / ANCHOR_INFO), records, left_out,
                                                 summary["top_k"], table))
    return summary
