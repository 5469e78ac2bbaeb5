"""MLflow lineage, recorded from outside the stages (a callback after each stage, never inside it).

One parent run per pipeline run and one child run per stage that ran (stages DVC found up to date
are listed on the parent, `consort.cached_stages`; their outputs are those of the earlier child
run with the same DVC stage hash, which the merge run links to). A child run carries the stage's
params (from the stage's params sections), its metrics and per-step curves (from the files the
stage declares as metrics and plots), the SHA-256 of its input files as metadata-only datasets
(a digest and a logical name: never text, never a filesystem path), and tags linking it to the
git commit, the DVC stage and the Prefect flow run. What else a stage's run gets is its lineage
hooks' (flows/lineage_hooks.py); registering the shipped model is flows/registration.py.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import mlflow
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from flows.dvc_lock import DvcState
from flows.layout import PROJECT_ROOT, Workspace
from flows.lineage_hooks import HOOKS
from flows.metrics import numbers
from flows.registration import register_export
from stages import registry
from stages.artifacts import has_model
from stages.io import file_digest

EXPERIMENT = "consort"
# Stage outputs that are datasets; lineage records the SHA-256 of each of their files.
DATASET_PREFIXES = ("public/corpus", "owners/")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value, sort_keys=True) if isinstance(value, list) else value
    return out


def params_of(params: dict, keys: list[str]) -> list[Param]:
    """The stage's params sections, flattened (`expert.train.lr`); MLflow keeps 6,000 characters."""
    flat: dict = {}
    for key in keys:
        node = params
        for part in key.split("."):
            node = node[part]
        flatten(key, node, flat)
    return [Param(k, str(v)[:6000]) for k, v in flat.items()]


def metrics_of(root: Path, seconds: float, metric_files: list[str], plot_files: list[str]) -> list[Metric]:
    """The stage's seconds, every number of its metrics files, and its plots' rows as curves."""
    now = int(time.time() * 1000)
    out = [Metric("stage_seconds", seconds, now, 0)]
    for f in metric_files:
        if (root / f).exists():
            out += [Metric(k, v, now, 0) for k, v in numbers(flatten("", json.loads((root / f).read_text()), {})).items()]
    for f in plot_files:
        if (root / f).exists():
            rows = [json.loads(line) for line in (root / f).read_text().splitlines()]
            out += [Metric(f"curve/{k}", v, 0, int(row["step"])) for row in rows
                    for k, v in numbers(row).items() if k != "step"]
    return out


def dataset_input(name: str, sha256: str, context: str) -> DatasetInput:
    # MLflow keeps 36 characters of a digest: the start of the SHA-256.
    dataset = MetaDataset(CodeDatasetSource({"dvc_path": name}), name=name, digest=sha256[:36])
    return DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])


class DatasetDigests:
    """(logical name, SHA-256) of each file of a dataset, the digest `consort experts` prints; a file is
    hashed again only when it changed."""

    def __init__(self, root: Path) -> None:
        self.root, self._known = root, {}

    def __call__(self, path: str) -> list[tuple[str, str]]:
        top = self.root / path
        found = []
        for f in sorted(top.glob("*.jsonl")) if top.is_dir() else [top] if top.is_file() else []:
            stat = f.stat()
            key = (str(f), stat.st_mtime_ns, stat.st_size)
            if key not in self._known:
                self._known[key] = file_digest(f)
            # owners/code/corpus -> code/corpus: a logical name, not where the owner keeps it.
            found.append((f.relative_to(self.root).as_posix().removeprefix("owners/"), self._known[key]))
        return found


class Lineage:
    """Writes the MLflow runs of one pipeline run. Safe to call from concurrent Prefect tasks."""

    def __init__(self, ws: Workspace, preset: str, flow_run_id: str | None) -> None:
        self.ws, self.dvc, self.digests = ws, DvcState(ws.root), DatasetDigests(ws.root)
        mlflow.set_tracking_uri(ws.tracking_uri)
        self.client = MlflowClient(ws.tracking_uri)
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            EXPERIMENT, artifact_location=ws.artifacts.as_uri())
        self.commit, self.flow_run_id = git_commit(), flow_run_id or ""
        self.lock = threading.Lock()
        self.stage_runs: dict[str, str] = {}
        self.cached: list[str] = []  # stages DVC found up to date: no child run of their own
        # Opened in the model-training view (MLflow 3 otherwise guesses GenAI, where it looks empty).
        self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        disabled = ws.params().inference.disabled if ws.params_path.exists() else []
        self.run_name = f"{preset}" + (f" without {','.join(disabled)}" if disabled else "") + time.strftime(
            " %Y-%m-%d %H:%M")
        self.parent = self.client.create_run(self.experiment_id, run_name=self.run_name, tags={
            "consort.kind": "pipeline", "consort.preset": preset, "consort.git_commit": self.commit,
            "prefect.flow_run_id": self.flow_run_id}).info.run_id
        self.client.log_param(self.parent, "preset", preset)

    def record_stage(self, stage: str, ran: bool, seconds: float, params: dict) -> str | None:
        """A child run for a stage that ran; a stage DVC found up to date is only listed in the parent
        (its outputs are those of the earlier child run with the same DVC stage hash)."""
        if not ran:
            with self.lock:
                self.cached.append(stage)
            return None
        param_keys, metric_files, plot_files = self.dvc.declared(stage)
        hooks = [HOOKS[name] for name in registry.spec(stage).lineage]
        tags = {MLFLOW_PARENT_RUN_ID: self.parent, MLFLOW_RUN_NAME: stage, "consort.kind": "stage",
                "consort.stage": stage, "consort.cached": "false", "consort.git_commit": self.commit,
                "prefect.flow_run_id": self.flow_run_id, "dvc.stage_hash": self.dvc.stage_hash(stage)}
        tags |= {"consort.owner": stage.split("@", 1)[1]} if "@" in stage else {}
        for hook in hooks:
            tags |= hook.tags(self, stage) if hook.tags else {}
        deps = list(self.dvc.entry(stage).get("deps", [])) + [d for h in hooks if h.deps for d in h.deps(self, stage)]
        context = registry.spec(stage).context
        datasets = {name: dataset_input(name, digest, context)  # a corpus behind several experts is recorded once
                    for d in deps if d["path"].startswith(DATASET_PREFIXES) for name, digest in self.digests(d["path"])}
        metrics = metrics_of(self.ws.root, seconds, metric_files, plot_files)
        items = params_of(params, param_keys)
        with self.lock:
            # The stage's real span: it ended now and took `seconds` (not the few ms of recording it).
            run_id = self.client.create_run(self.experiment_id, run_name=stage, tags=tags,
                                            start_time=int((time.time() - seconds) * 1000)).info.run_id
            for i in range(0, len(metrics), 900):
                self.client.log_batch(run_id, metrics=metrics[i:i + 900])
            for i in range(0, len(items), 90):
                self.client.log_batch(run_id, params=items[i:i + 90])
            if datasets:
                self.client.log_inputs(run_id, datasets=list(datasets.values()))
            self.stage_runs[stage] = run_id
        for hook in hooks:
            if hook.after:
                hook.after(self, run_id, stage, tags)
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def expert_stages(self) -> list[str]:
        """The expert stages behind the merge: those in dvc.lock, and remote ones recorded this run."""
        return sorted(n for n in set(self.dvc.stages()) | set(self.stage_runs) if n.startswith("train_expert@"))

    def producing_run(self, stage: str) -> str | None:
        """The latest child run of `stage` with the stage hash it has now: the run that made its outputs."""
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`consort.stage` = '{stage}' and "
            f"tags.`dvc.stage_hash` = '{self.dvc.stage_hash(stage)}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        return found[0].info.run_id if found else None

    def finish(self, ok: bool, summary: dict | None = None, report_dir: Path | None = None) -> None:
        if self.cached:
            self.client.set_tag(self.parent, "consort.cached_stages", ",".join(sorted(self.cached)))
        if summary:
            now = int(time.time() * 1000)
            self.client.log_batch(self.parent, metrics=[
                Metric(f"{domain}.{model}.{k}", v, now, 0)
                for domain, models in summary.items() for model, vals in models.items() for k, v in numbers(vals).items()])
        if report_dir and report_dir.exists():
            self.client.log_artifacts(self.parent, str(report_dir), "report")
        try:
            if ok and has_model(self.ws.merged_model):
                register_export(self)
        except Exception:
            ok = False  # the run is marked failed, not left running, and the error still surfaces
            raise
        finally:
            if not ok:
                self.client.set_tag(self.parent, MLFLOW_RUN_NAME, f"{self.run_name} (failed)")
            self.client.set_terminated(self.parent, "FINISHED" if ok else "FAILED")


def record_remote_expert(lineage: Lineage, owner: str, manifest: dict, flow_run_id: str | None) -> str:
    """An expert trained on its owner's machine, as the coordinator knows it: its signed manifest.

    Recorded like a local train_expert run (so the merge run links to it): the owner's corpus as
    a metadata-only dataset with the manifest's data digest, the training params and metrics,
    the DP epsilon if any, and the owner's Prefect flow run.
    """
    stage = f"train_expert@{owner}"
    tags = {MLFLOW_PARENT_RUN_ID: lineage.parent, MLFLOW_RUN_NAME: stage, "consort.kind": "stage",
            "consort.stage": stage, "consort.owner": owner, "consort.remote": "true",
            "consort.git_commit": lineage.commit, "prefect.flow_run_id": flow_run_id or "",
            "consort.anchor_hash": manifest["anchor_hash"]}
    values = dict(manifest.get("metrics", {})) | {f"dp.{k}": v for k, v in (manifest.get("dp") or {}).items()}
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in numbers(values).items()]
    params = [Param(k, str(v)[:6000]) for k, v in flatten("expert.train", manifest.get("training", {}), {}).items()]
    dataset = dataset_input(f"{owner}/corpus/train.jsonl", manifest["data_digest"], "training")
    with lineage.lock:
        run_id = lineage.client.create_run(lineage.experiment_id, run_name=stage, tags=tags).info.run_id
        lineage.client.log_batch(run_id, metrics=metrics, params=params)
        lineage.client.log_inputs(run_id, datasets=[dataset])
        lineage.stage_runs[stage] = run_id
    lineage.client.set_terminated(run_id, "FINISHED")
    return run_id
