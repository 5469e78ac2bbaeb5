"""Lineage hooks: what a stage's MLflow run gets beyond its params, metrics and datasets. A stage
names its hooks in its registry entry (stages/registry.py, `lineage`); each hook is one small unit
here, called with the pipeline's Lineage (flows/tracking.py): `tags` before the run is created,
`deps` for more dvc.lock inputs to record as datasets, `after` once the run exists."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlflow.entities import Metric
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from flows.metrics import numbers
from flows.registration import anchor_source_tags, merged_lineage

EXPERT_RUN_TAG = "consort.expert_run."


@dataclass(frozen=True)
class Hook:
    tags: Callable[..., dict] | None = None   # (lineage, stage) -> tags
    deps: Callable[..., list] | None = None   # (lineage, stage) -> dvc.lock deps
    after: Callable[..., None] | None = None  # (lineage, run_id, stage, tags)


def _expert_run_tags(lineage, stage: str) -> dict:
    """The merge links the run of every expert it merged (this run's, or the one that made its outputs)."""
    runs = {other: lineage.stage_runs.get(other) or lineage.producing_run(other) for other in lineage.expert_stages()}
    return {f"{EXPERT_RUN_TAG}{other.split('@', 1)[1]}": run for other, run in runs.items() if run}


def _expert_deps(lineage, stage: str) -> list:
    """The merge reads no corpus, but lineage should show which data made each expert."""
    return [d for other in lineage.expert_stages() for d in lineage.dvc.entry(other).get("deps", [])]


def _merge_note(lineage, run_id: str, stage: str, tags: dict) -> None:
    experts = {k.removeprefix(EXPERT_RUN_TAG): v for k, v in tags.items() if k.startswith(EXPERT_RUN_TAG)}
    lineage.client.set_tag(run_id, "mlflow.note.content", merged_lineage(lineage, experts, [])[1])


def _trace_page(lineage, run_id: str, stage: str, tags: dict) -> None:
    page = lineage.ws.root / "evaluations" / f"{stage.partition('@')[2]}.trace.html"
    if page.exists():
        lineage.client.log_artifact(run_id, str(page), "trace")


def _report_files(lineage, run_id: str, stage: str, tags: dict) -> None:
    if (lineage.ws.reports).exists():
        lineage.client.log_artifacts(run_id, str(lineage.ws.reports), "report")


def _curriculum_runs(lineage, run_id: str, stage: str, tags: dict) -> None:
    """One child run of the expert's run per curriculum stage: held-out losses, and the stage's curve."""
    for f in lineage.dvc.declared(stage)[1]:
        path = lineage.ws.root / f
        curriculum = json.loads(path.read_text()).get("curriculum") if path.exists() else None
        if not curriculum:
            continue
        anchor, now = curriculum["anchor"], int(time.time() * 1000)
        for recipe in ("stage_1", "one_stage", "two_stage"):
            if recipe not in curriculum:
                continue
            c = curriculum[recipe]
            metrics = [Metric(k, float(c[k]), now, 0) for k in ("own_loss", "public_loss")]
            metrics += [Metric("gain_vs_anchor", anchor["own_loss"] - c["own_loss"], now, 0),
                        Metric("forgetting_vs_anchor", c["public_loss"] - anchor["public_loss"], now, 0)]
            # Relative changes with their paired 95 % intervals: against the anchor, and two stages against one.
            for pair, name in ((f"{recipe} vs anchor", "vs_anchor"), (f"{recipe} vs one_stage", "vs_one_stage")):
                for kind, iv in curriculum.get("compared", {}).get(pair, {}).items():
                    metrics += [Metric(f"{kind}_{name}{end}", float(iv[field]), now, 0)
                                for end, field in (("", "value"), ("_low", "low"), ("_high", "high"))]
            metrics += [Metric(f"curve/{k}", v, 0, int(row["step"])) for row in c.get("log", [])
                        for k, v in numbers(row).items() if k != "step"]
            with lineage.lock:
                child = lineage.client.create_run(lineage.experiment_id, run_name=f"{stage} {recipe}", tags={
                    MLFLOW_PARENT_RUN_ID: run_id, "consort.kind": "curriculum_stage",
                    # not consort.stage: a search for a stage's run must find the stage's run only
                    "consort.expert_stage": stage, "consort.curriculum": recipe,
                    "consort.shipped": str(recipe == curriculum["shipped"] or recipe == "stage_1").lower(),
                }).info.run_id
                for i in range(0, len(metrics), 900):
                    lineage.client.log_batch(child, metrics=metrics[i:i + 900])
                lineage.client.log_param(child, "steps", c["steps"])
                lineage.client.set_terminated(child, "FINISHED")


HOOKS: dict[str, Hook] = {
    "anchor_source": Hook(tags=lambda lineage, stage: anchor_source_tags(lineage.ws)),
    "expert_links": Hook(tags=_expert_run_tags, deps=_expert_deps, after=_merge_note),
    "trace_page": Hook(after=_trace_page),
    "report_files": Hook(after=_report_files),
    "curriculum_runs": Hook(after=_curriculum_runs),
}
