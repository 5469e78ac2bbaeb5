"""The model registry's side of lineage: which anchor and which experts a model holds (tags and a
note with links to the expert runs), and registering the shipped model, as `consort export` writes
it, in MLflow's transformers flavour under `consort-merged`."""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from flows.layout import Workspace
from stages.artifacts import ANCHOR_INFO, MERGED_INFO
from stages.export import expert_records, export_model

REGISTERED_MODEL = "consort-merged"
CURRENT_ALIAS = "current"


def anchor_source_tags(ws: Workspace) -> dict[str, str]:
    """Where the anchor came from: kind, location, licence, SHA-256 of the original weights."""
    path = ws.root / "models" / "anchor" / ANCHOR_INFO
    source = json.loads(path.read_text()).get("source") if path.exists() else None
    if not source:
        return {"anchor.source.kind": "scratch"}
    return {"anchor.source.kind": source["kind"], "anchor.source.where": source["where"],
            "anchor.licence": source["licence"], "anchor.source.sha256": source["sha256"]}


def merged_lineage(lineage, expert_runs: dict[str, str], left_out: list[str]) -> tuple[dict[str, str], str]:
    """Tags and a markdown note saying which anchor and which experts (all but `left_out`) a model holds."""
    ws = lineage.ws
    info = json.loads((ws.as_merged / MERGED_INFO).read_text())
    tags = {"anchor.hash": info["anchor_hash"], "top_k": str(info["top_k"])} | anchor_source_tags(ws)
    rows = ["| owner | data digest (SHA-256) | package hash (SHA-256 of its signature file) | run |",
            "|---|---|---|---|"]
    owners = [e["owner"] for e in info["experts"][1:] if e["owner"] not in left_out]
    for e in expert_records(ws.as_merged, ws.root / "published", owners):
        owner, run = e["owner"], expert_runs.get(e["owner"], "")
        tags |= {f"expert.{owner}.data_digest": e["data_digest"], f"expert.{owner}.package_hash": e["package_hash"],
                 f"expert.{owner}.run_id": run, f"expert.{owner}.takedowns": str(e["takedowns"])}
        link = f"#/experiments/{lineage.experiment_id}/runs/{run}"
        rows.append(f"| {owner} | `{e['data_digest'][:16]}` | `{e['package_hash'][:16]}` | "
                    + (f"[{run[:8]}]({link})" if run else "") + " |")
    where = tags.get("anchor.source.where", "trained from scratch on the public corpus")
    note = (f"Merged model (FlexOlmo routing): the public anchor `{info['anchor_hash'][:16]}` ({where}) and "
            f"the experts below, top-{info['top_k']} routing"
            + (f"; left out (opted out): {', '.join(left_out)}" if left_out else "") + ".\n\n"
            + "\n".join(rows) + "\n")
    return tags, note


def register_export(lineage) -> None:
    """Register what other tools load: the shipped model with this run's opt-outs applied (consort
    export), in MLflow's transformers flavour; one version per distinct model and expert set, with
    the alias `current` on this run's."""
    import mlflow
    import mlflow.transformers
    import torch
    import transformers

    from stages.model.experts import merged_owners

    ws, client = lineage.ws, lineage.client
    shipped = ws.merged_model
    # The merge's weights and, when router tuning shipped its overlay, the router rows over them.
    rels = {p.relative_to(ws.root).as_posix() for p in (shipped, ws.as_merged)}
    md5 = "+".join(sorted(o.get("md5", "") for e in lineage.dvc.stages().values() for o in e.get("outs", [])
                          if o["path"] in rels))
    disabled = ws.params().inference.disabled
    left_out = [o for o in merged_owners(shipped) if o in disabled]
    key = hashlib.sha256(f"{md5}|{','.join(left_out)}".encode()).hexdigest()
    known = client.search_model_versions(f"name='{REGISTERED_MODEL}' and tag.export_key='{key}'")
    if known:
        version = known[0].version
    else:
        expert_runs = {s.split("@", 1)[1]: lineage.stage_runs.get(s) or lineage.producing_run(s) or ""
                       for s in lineage.expert_stages()}
        tags, note = merged_lineage(lineage, expert_runs, left_out)
        with tempfile.TemporaryDirectory(dir=ws.root, prefix=".export-") as tmp:
            export = Path(tmp) / "export"
            export_model(shipped, ws.root / "models" / "anchor", ws.root / "published",
                         ws.reports / "eval_table.md", None, disabled, export)
            model = transformers.AutoModelForCausalLM.from_pretrained(export)
            # From a pipeline, not the checkpoint's path: this MLflow cannot read the task of
            # a local checkpoint with this transformers release.
            pipe = transformers.pipeline("text-generation", model=model,
                                         tokenizer=transformers.AutoTokenizer.from_pretrained(export))
            flavour = Path(tmp) / "model"
            mlflow.transformers.save_model(pipe, path=str(flavour), pip_requirements=[
                f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}"])
            shutil.copy2(export / "README.md", flavour / "README.md")  # the model card
            client.log_artifacts(lineage.parent, str(flavour), "model")
        try:
            client.get_registered_model(REGISTERED_MODEL)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(
                REGISTERED_MODEL, description="FlexOlmo mixture of the public anchor and the owners' experts")
        source = f"{client.get_run(lineage.parent).info.artifact_uri}/model"
        version = client.create_model_version(
            REGISTERED_MODEL, source, run_id=lineage.parent, description=note,
            tags={"export_key": key, "dvc_md5": md5, "left_out": ",".join(left_out)} | tags).version
    # `latest` is MLflow's own name for the newest version; `current` is what the last run ships.
    client.set_registered_model_alias(REGISTERED_MODEL, CURRENT_ALIAS, version)
    client.set_tag(lineage.parent, "consort.registered_version", version)
    withdraw_stale(client, version, list(ws.params().owners))


def withdraw_stale(client, current: str, roster: list[str]) -> list[str]:
    """Tag `withdrawn` every other version holding an expert nobody may load any more: one trained
    before its owner's latest takedown (fewer ids taken down than the current version's expert), or
    the expert of an owner no longer in the roster (params' owners: it left the consortium; an
    opted-out owner stays in it)."""
    versions = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    now = next(v for v in versions if str(v.version) == str(current)).tags
    done = {k.split(".")[1]: int(v) for k, v in now.items() if k.startswith("expert.") and k.endswith(".takedowns")}
    withdrawn = []
    for v in versions:
        held = {k.split(".")[1] for k in v.tags if k.startswith("expert.") and k.endswith(".data_digest")}
        reasons = [f"holds the expert of {o} trained on documents taken down since" for o, n in done.items()
                   if o in held and int(v.tags.get(f"expert.{o}.takedowns", "0")) < n]
        reasons += [f"holds the expert of {o}, who left the consortium" for o in sorted(held - set(roster))]
        if str(v.version) != str(current) and reasons and v.tags.get("withdrawn") != "true":
            client.set_model_version_tag(REGISTERED_MODEL, v.version, "withdrawn", "true")
            client.set_model_version_tag(REGISTERED_MODEL, v.version, "withdrawn_reason", "; ".join(reasons))
            withdrawn.append(str(v.version))
    return withdrawn
