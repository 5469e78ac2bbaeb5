"""MLflow lineage, recorded from outside the stages (a callback after each stage, never inside it).

One parent run per pipeline run and one child run per stage that ran (stages DVC found up to date
are listed on the parent, `consort.cached_stages`; their outputs are those of the earlier child
run with the same DVC stage hash, which the merge run links to). A child run carries the stage's
params (from the stage's params sections), its metrics and per-step curves (from the files the
stage declares as metrics and plots), the SHA-256 of its input files as metadata-only datasets
(a digest and a logical name: never text, never a filesystem path), and tags linking it to the
git commit, the DVC stage and the Prefect flow run.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import yaml
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from flows.workspace import PROJECT_ROOT, Workspace
from stages import registry
from stages.artifacts import ANCHOR_INFO, MERGED_INFO, has_model
from stages.export import expert_records, export_model
from stages.io import file_digest

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML has it
EXPERIMENT = "consort"
REGISTERED_MODEL = "consort-merged"
CURRENT_ALIAS = "current"
# Stage outputs that are datasets; lineage records the SHA-256 of each of their files.
DATASET_PREFIXES = ("public/corpus", "owners/")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value, sort_keys=True)
    else:
        out[prefix] = value
    return out


def _lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        node = node[part]
    return node


def _stage_hash(lock_entry: dict) -> str:
    return hashlib.md5(json.dumps(lock_entry, sort_keys=True).encode()).hexdigest()


def _dataset_input(name: str, sha256: str, context: str) -> DatasetInput:
    # MLflow keeps 36 characters of a digest: the start of the SHA-256.
    dataset = MetaDataset(CodeDatasetSource({"dvc_path": name}), name=name, digest=sha256[:36])
    return DatasetInput(dataset._to_mlflow_entity(),
                        [InputTag("mlflow.data.context", context)])


def _dataset_name(path: str) -> str:
    # owners/code/corpus -> code/corpus: a logical name, not where the owner keeps it.
    return path.removeprefix("owners/")


class Lineage:
    """Writes the MLflow runs of one pipeline run. Safe to call from concurrent Prefect tasks."""

    def __init__(self, ws: Workspace, preset: str, flow_run_id: str | None) -> None:
        self.ws = ws
        mlflow.set_tracking_uri(ws.tracking_uri)
        self.client = MlflowClient(ws.tracking_uri)
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            EXPERIMENT, artifact_location=ws.artifacts.as_uri())
        self.commit = git_commit()
        self.flow_run_id = flow_run_id or ""
        self.lock = threading.Lock()
        self.stage_runs: dict[str, str] = {}
        self.stage_files: dict[str, tuple[list[str], list[str], list[str]]] | None = None
        self._lock_cache: tuple[int, dict] | None = None
        self._digests: dict[tuple[str, int, int], str] = {}
        self.cached: list[str] = []  # stages DVC found up to date: no child run of their own
        # Opened in the model-training view (MLflow 3 otherwise guesses GenAI, where it looks empty).
        self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        disabled = ws.params().inference.disabled if ws.params_path.exists() else []
        self.run_name = (f"{preset}" + (f" without {','.join(disabled)}" if disabled else "")
                         + time.strftime(" %Y-%m-%d %H:%M"))
        self.parent = self.client.create_run(self.experiment_id, run_name=self.run_name, tags={
            "consort.kind": "pipeline", "consort.preset": preset, "consort.git_commit": self.commit,
            "prefect.flow_run_id": self.flow_run_id,
        }).info.run_id
        self.client.log_param(self.parent, "preset", preset)

    # -- per stage --------------------------------------------------------------------------
    def _stage_files(self, stage_name: str) -> tuple[list[str], list[str], list[str]]:
        """(param keys, metric files, plot files) of a stage, read from dvc.yaml once per pipeline run."""
        with self.lock:
            if self.stage_files is None:
                from dvc.repo import Repo

                with Repo(str(self.ws.root), _wait_for_lock=True) as repo:
                    self.stage_files = {
                        s.name: ([k for d in s.deps if hasattr(d, "params") for k in (d.params or [])],
                                 [str(o.def_path) for o in s.outs if o.metric],
                                 [str(o.def_path) for o in s.outs if o.plot])
                        for s in repo.index.stages}
            return self.stage_files[stage_name]

    def record_stage(self, stage_name: str, ran: bool, seconds: float, params: dict) -> str | None:
        """A child run for a stage that ran; a stage DVC found up to date is only listed in the parent.

        Its outputs are those of the earlier child run with the same DVC stage hash, which the
        merge run links to (a no-op re-run then writes one run, not one per stage).
        """
        if not ran:
            with self.lock:
                self.cached.append(stage_name)
            return None
        param_keys, metric_files, plot_files = self._stage_files(stage_name)
        lock_entry = self._lock_entry(stage_name)
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent, MLFLOW_RUN_NAME: stage_name,
            "consort.kind": "stage", "consort.stage": stage_name, "consort.cached": "false",
            "consort.git_commit": self.commit, "prefect.flow_run_id": self.flow_run_id,
            "dvc.stage_hash": _stage_hash(lock_entry),
        }
        if "@" in stage_name:
            tags["consort.owner"] = stage_name.split("@", 1)[1]
        entry = registry.spec(stage_name)
        if "anchor_source" in entry.lineage:
            tags |= self._anchor_source_tags()
        if "expert_links" in entry.lineage:
            for other in self._expert_stages():
                run_id = self.stage_runs.get(other) or self._producing_run(other)
                if run_id:
                    tags[f"consort.expert_run.{other.split('@', 1)[1]}"] = run_id
        flat: dict = {}
        for key in param_keys:
            _flatten(key, _lookup(params, key), flat)
        metrics = [Metric("stage_seconds", seconds, int(time.time() * 1000), 0)]
        for f in metric_files:
            path = self.ws.root / f
            if path.exists():
                for k, v in _flatten("", json.loads(path.read_text()), {}).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        metrics.append(Metric(k, float(v), int(time.time() * 1000), 0))
        for f in plot_files:
            path = self.ws.root / f
            if path.exists():
                for line in path.read_text().splitlines():
                    row = json.loads(line)
                    for k, v in row.items():
                        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                            metrics.append(Metric(f"curve/{k}", float(v), 0, int(row["step"])))
        deps = list(lock_entry.get("deps", []))
        if "expert_links" in entry.lineage:
            # The merge reads no corpus, but lineage should show which data made each expert.
            deps += [d for other in self._expert_stages() for d in self._lock_entry(other).get("deps", [])]
        by_name = {  # a corpus behind several experts is recorded once
            name: _dataset_input(name, digest, entry.context)
            for d in deps if d["path"].startswith(DATASET_PREFIXES)
            for name, digest in self._dataset_files(d["path"])
        }
        datasets = list(by_name.values())
        with self.lock:
            # The stage's real span: it ended now and took `seconds` (not the few ms of recording it).
            run_id = self.client.create_run(self.experiment_id, run_name=stage_name, tags=tags,
                                            start_time=int((time.time() - seconds) * 1000)).info.run_id
            for i in range(0, len(metrics), 900):
                self.client.log_batch(run_id, metrics=metrics[i:i + 900])
            items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
            for i in range(0, len(items), 90):
                self.client.log_batch(run_id, params=items[i:i + 90])
            if datasets:
                self.client.log_inputs(run_id, datasets=datasets)
            self.stage_runs[stage_name] = run_id
        trace_page = self.ws.root / "evaluations" / f"{stage_name.partition('@')[2]}.trace.html"
        if "trace_page" in entry.lineage and trace_page.exists():
            self.client.log_artifact(run_id, str(trace_page), "trace")
        if "curriculum_runs" in entry.lineage:
            self._record_curriculum(run_id, stage_name, metric_files)
        if "report_files" in entry.lineage and (self.ws.root / "reports").exists():
            self.client.log_artifacts(run_id, str(self.ws.root / "reports"), "report")
        if "expert_links" in entry.lineage:
            experts = {k.rsplit(".", 1)[1]: v for k, v in tags.items() if k.startswith("consort.expert_run.")}
            self.client.set_tag(run_id, "mlflow.note.content", self._merged_lineage(experts, [])[1])
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def _record_curriculum(self, stage_run: str, stage_name: str, metric_files: list[str]) -> None:
        """One child run of the expert's run per curriculum stage: held-out losses, and the stage's curve."""
        for f in metric_files:
            path = self.ws.root / f
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
                metrics += [Metric(f"curve/{k}", float(v), 0, int(row["step"])) for row in c.get("log", [])
                            for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)]
                with self.lock:
                    run_id = self.client.create_run(self.experiment_id, run_name=f"{stage_name} {recipe}", tags={
                        MLFLOW_PARENT_RUN_ID: stage_run, "consort.kind": "curriculum_stage",
                        # not consort.stage: a search for a stage's run must find the stage's run only
                        "consort.expert_stage": stage_name, "consort.curriculum": recipe,
                        "consort.shipped": str(recipe == curriculum["shipped"] or recipe == "stage_1").lower(),
                    }).info.run_id
                    for i in range(0, len(metrics), 900):
                        self.client.log_batch(run_id, metrics=metrics[i:i + 900])
                    self.client.log_param(run_id, "steps", c["steps"])
                    self.client.set_terminated(run_id, "FINISHED")

    def record_remote_expert(self, owner: str, manifest: dict, flow_run_id: str | None) -> str:
        """An expert trained on its owner's machine, as the coordinator knows it: its signed manifest.

        Recorded like a local train_expert run (so the merge run links to it): the owner's corpus as
        a metadata-only dataset with the manifest's data digest, the training params and metrics,
        the DP epsilon if any, and the owner's Prefect flow run.
        """
        stage_name = f"train_expert@{owner}"
        tags = {MLFLOW_PARENT_RUN_ID: self.parent, MLFLOW_RUN_NAME: stage_name, "consort.kind": "stage",
                "consort.stage": stage_name, "consort.owner": owner, "consort.remote": "true",
                "consort.git_commit": self.commit, "prefect.flow_run_id": flow_run_id or "",
                "consort.anchor_hash": manifest["anchor_hash"]}
        numbers = dict(manifest.get("metrics", {}))
        if manifest.get("dp"):
            numbers |= {f"dp.{k}": v for k, v in manifest["dp"].items() if isinstance(v, (int, float))}
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in numbers.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        params = [Param(k, str(v)[:6000]) for k, v in _flatten("expert.train", manifest.get("training", {}), {}).items()]
        dataset = _dataset_input(f"{owner}/corpus/train.jsonl", manifest["data_digest"], "training")
        with self.lock:
            run_id = self.client.create_run(self.experiment_id, run_name=stage_name, tags=tags).info.run_id
            self.client.log_batch(run_id, metrics=metrics, params=params)
            self.client.log_inputs(run_id, datasets=[dataset])
            self.stage_runs[stage_name] = run_id
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def _dataset_files(self, path: str) -> list[tuple[str, str]]:
        """(logical name, SHA-256) of each file of a dataset: the digest `consort experts` prints."""
        top = self.ws.root / path
        files = sorted(top.glob("*.jsonl")) if top.is_dir() else [top] if top.is_file() else []
        found = []
        for f in files:
            stat = f.stat()
            key = (str(f), stat.st_mtime_ns, stat.st_size)
            if key not in self._digests:
                self._digests[key] = file_digest(f)
            found.append((_dataset_name(f.relative_to(self.ws.root).as_posix()), self._digests[key]))
        return found

    def _expert_stages(self) -> list[str]:
        """The expert stages behind the merge: those in dvc.lock, and remote ones recorded this run."""
        return sorted(n for n in set(self._lock_stages()) | set(self.stage_runs) if n.startswith("train_expert@"))

    def _producing_run(self, stage_name: str) -> str | None:
        """The latest child run of `stage_name` with the stage hash it has now: the run that made its outputs."""
        found = self.client.search_runs(
            [self.experiment_id], f"tags.`consort.stage` = '{stage_name}' and "
            f"tags.`dvc.stage_hash` = '{_stage_hash(self._lock_entry(stage_name))}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        return found[0].info.run_id if found else None

    def _lock_entry(self, stage_name: str) -> dict:
        return self._lock_stages().get(stage_name, {})

    def _lock_stages(self) -> dict:
        """dvc.lock's stages, parsed again only when DVC rewrote the file (several reads per stage that ran)."""
        lock = self.ws.root / "dvc.lock"
        if not lock.exists():
            return {}
        with self.lock:
            stamp = lock.stat().st_mtime_ns
            if self._lock_cache is None or self._lock_cache[0] != stamp:
                self._lock_cache = (stamp, (yaml.load(lock.read_text(), Loader=_YAML_LOADER) or {}).get("stages", {}))
            return self._lock_cache[1]

    def _run_link(self, run_id: str) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{run_id}"

    def _anchor_source_tags(self) -> dict[str, str]:
        """Where the anchor came from: kind, location, licence, SHA-256 of the original weights."""

        path = self.ws.root / "models" / "anchor" / ANCHOR_INFO
        source = json.loads(path.read_text()).get("source") if path.exists() else None
        if not source:
            return {"anchor.source.kind": "scratch"}
        return {"anchor.source.kind": source["kind"], "anchor.source.where": source["where"],
                "anchor.licence": source["licence"], "anchor.source.sha256": source["sha256"]}

    def _merged_lineage(self, expert_runs: dict[str, str], left_out: list[str]) -> tuple[dict[str, str], str]:
        """Tags and a markdown note saying which anchor and which experts (all but `left_out`) a model holds."""

        info = json.loads((self.ws.as_merged / MERGED_INFO).read_text())
        tags = {"anchor.hash": info["anchor_hash"], "top_k": str(info["top_k"])} | self._anchor_source_tags()
        rows = ["| owner | data digest (SHA-256) | package hash (SHA-256 of its signature file) | run |",
                "|---|---|---|---|"]
        owners = [e["owner"] for e in info["experts"][1:] if e["owner"] not in left_out]
        for e in expert_records(self.ws.as_merged, self.ws.root / "published", owners):
            owner, run = e["owner"], expert_runs.get(e["owner"], "")
            tags |= {f"expert.{owner}.data_digest": e["data_digest"], f"expert.{owner}.package_hash": e["package_hash"],
                     f"expert.{owner}.run_id": run}
            rows.append(f"| {owner} | `{e['data_digest'][:16]}` | `{e['package_hash'][:16]}` | "
                        + (f"[{run[:8]}]({self._run_link(run)})" if run else "") + " |")
        where = tags.get("anchor.source.where", "trained from scratch on the public corpus")
        note = (f"Merged model (FlexOlmo routing): the public anchor `{info['anchor_hash'][:16]}` ({where}) and "
                f"the experts below, top-{info['top_k']} routing"
                + (f"; left out (opted out): {', '.join(left_out)}" if left_out else "") + ".\n\n"
                + "\n".join(rows) + "\n")
        return tags, note

    def _register_export(self) -> None:
        """Register what other tools load: the shipped model with this run's opt-outs applied (consort
        export), in MLflow's transformers flavour; one version per distinct model and expert set, with
        the alias `current` on this run's."""
        import mlflow.transformers
        import torch
        import transformers

        from stages.model.experts import merged_owners

        shipped = self.ws.merged_model
        # The merge's weights and, when router tuning shipped its overlay, the router rows over them.
        rels = {p.relative_to(self.ws.root).as_posix() for p in (shipped, self.ws.as_merged)}
        md5 = "+".join(sorted(o.get("md5", "") for e in self._lock_stages().values() for o in e.get("outs", [])
                              if o["path"] in rels))
        disabled = self.ws.params().inference.disabled
        left_out = [o for o in merged_owners(shipped) if o in disabled]
        key = hashlib.sha256(f"{md5}|{','.join(left_out)}".encode()).hexdigest()
        known = self.client.search_model_versions(f"name='{REGISTERED_MODEL}' and tag.export_key='{key}'")
        if known:
            version = known[0].version
        else:
            expert_runs = {s.split("@", 1)[1]: self.stage_runs.get(s) or self._producing_run(s) or ""
                           for s in self._expert_stages()}
            tags, note = self._merged_lineage(expert_runs, left_out)
            with tempfile.TemporaryDirectory(dir=self.ws.root, prefix=".export-") as tmp:
                export = Path(tmp) / "export"
                _, model = export_model(shipped, self.ws.root / "models" / "anchor", self.ws.root / "published",
                                        self.ws.root / "reports" / "eval_table.md", None, disabled, export)
                # From a pipeline, not the checkpoint's path: this MLflow cannot read the task of
                # a local checkpoint with this transformers release.
                pipe = transformers.pipeline("text-generation", model=model,
                                             tokenizer=transformers.AutoTokenizer.from_pretrained(export))
                flavour = Path(tmp) / "model"
                mlflow.transformers.save_model(pipe, path=str(flavour), pip_requirements=[
                    f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}"])
                shutil.copy2(export / "README.md", flavour / "README.md")  # the model card
                self.client.log_artifacts(self.parent, str(flavour), "model")
            try:
                self.client.get_registered_model(REGISTERED_MODEL)
            except mlflow.exceptions.MlflowException:
                self.client.create_registered_model(
                    REGISTERED_MODEL, description="FlexOlmo mixture of the public anchor and the owners' experts")
            source = f"{self.client.get_run(self.parent).info.artifact_uri}/model"
            version = self.client.create_model_version(
                REGISTERED_MODEL, source, run_id=self.parent, description=note,
                tags={"export_key": key, "dvc_md5": md5, "left_out": ",".join(left_out)} | tags).version
        # `latest` is MLflow's own name for the newest version; `current` is what the last run ships.
        self.client.set_registered_model_alias(REGISTERED_MODEL, CURRENT_ALIAS, version)
        self.client.set_tag(self.parent, "consort.registered_version", version)

    # -- end of the pipeline ----------------------------------------------------------------
    def finish(self, ok: bool, summary: dict | None = None, report_dir: Path | None = None) -> None:
        if self.cached:
            self.client.set_tag(self.parent, "consort.cached_stages", ",".join(sorted(self.cached)))
        if summary:
            metrics = [Metric(f"{domain}.{model}.{k}", float(v), int(time.time() * 1000), 0)
                       for domain, models in summary.items() for model, vals in models.items() for k, v in vals.items()]
            self.client.log_batch(self.parent, metrics=metrics)
        if report_dir and report_dir.exists():
            self.client.log_artifacts(self.parent, str(report_dir), "report")
        try:
            if ok and has_model(self.ws.merged_model):
                self._register_export()
        except Exception:
            ok = False  # the run is marked failed, not left running, and the error still surfaces
            raise
        finally:
            if not ok:
                self.client.set_tag(self.parent, MLFLOW_RUN_NAME, f"{self.run_name} (failed)")
            self.client.set_terminated(self.parent, "FINISHED" if ok else "FAILED")
