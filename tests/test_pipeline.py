"""The DVC graph as Prefect runs it, and real smoke runs of the whole flow."""
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT, run_consort
from mlflow.tracking import MlflowClient

from flows.params_file import read_project_params
from flows.pipeline import CpuScheduler, dvc_state, stage_graph, topological_order
from flows.workspace import prepare_workspace
from stages import params as P
from stages.artifacts import MANIFEST

OWNERS = ["code", "math", "news"]  # the smoke preset's: one per trace policy, and DP


def test_a_stage_tracks_only_the_owner_fields_it_reads(tmp_path):
    """Read back by DVC itself: one owner's trace policy is tracked by that owner's trace page alone,
    and the merge tracks the roster, not the whole owners section."""
    from dvc.repo import Repo

    ws = prepare_workspace(tmp_path / "ws", "smoke")
    with Repo(str(ws.root)) as repo:
        tracked = {s.name: {k for d in s.deps if hasattr(d, "params") for k in (d.params or [])}
                   for s in repo.index.stages}
    assert {name for name, keys in tracked.items() if any(k.startswith("owners.news.trace") for k in keys)} \
        == {"trace_page@news"}
    assert {k for k in tracked["merge_experts"] if k.startswith("owners")} == {f"owners.{o}.data" for o in OWNERS}
    assert not [name for name, keys in tracked.items() if "owners" in keys]
    assert {k for k in tracked["evaluate_safety"] if k.startswith("owners")} == {
        f"owners.{o}.safety_prompts" for o in OWNERS}


def test_dvc_graph_becomes_task_order(tmp_path):
    ws = prepare_workspace(tmp_path / "ws", "smoke")
    graph = stage_graph(ws.root)
    assert set(graph) >= {"prepare_public", "train_tokenizer", "train_anchor", "embed_public", "merge_experts",
                          "evaluate_public", "report"} | {f"train_expert@{o}" for o in OWNERS}
    assert graph["train_tokenizer"] == ["prepare_public"]
    assert set(graph["train_expert@news"]) == {"prepare_owner@news", "prepare_public", "train_anchor", "embed_public"}
    assert set(graph["merge_experts"]) >= {f"train_expert@{o}" for o in OWNERS}
    # The report reads the published evaluations, training logs (the anchor's, the experts', the
    # reference's), the safety probe and the owners' synthetic sets' numbers.
    assert set(graph["report"]) == ({f"evaluate_owner@{o}" for o in OWNERS} | {"evaluate_public", "train_anchor"}
                                    | {f"trace_page@{o}" for o in OWNERS}  # their pages are in evaluations/ too
                                    | {f"train_expert@{o}" for o in OWNERS} | {"train_unrestricted", "evaluate_safety"}
                                    | {f"audit@{o}" for o in OWNERS} | {f"synthesize@{o}" for o in OWNERS})
    assert set(graph["audit@news"]) == {"prepare_owner@news", "train_anchor", "merge_experts"}
    # The reference reads the whole owners/ folder, indexes and DP twins included (it is off by default).
    assert set(graph["train_unrestricted"]) == ({f"{s}@{o}" for o in OWNERS
                                                 for s in ("prepare_owner", "build_index", "train_dp_baseline")}
                                                | {"prepare_public", "train_anchor", "embed_public"})
    assert set(graph["train_dp_baseline@math"]) == set(graph["train_expert@math"])
    assert "train_dp_baseline@math" in graph["evaluate_owner@math"]
    assert set(graph["build_index@news"]) == {"prepare_owner@news", "train_tokenizer"}
    assert "build_index@news" in graph["trace_page@news"] and "build_index@news" not in graph["evaluate_owner@news"]
    assert set(graph["evaluate_public"]) == {"prepare_public", "train_anchor", "merge_experts", "tune_router",
                                             "tune_router_oracle", "train_unrestricted"}
    order = topological_order(graph)
    position = {s: i for i, s in enumerate(order)}
    assert all(position[d] < position[s] for s, deps in graph.items() for d in deps)
    with pytest.raises(ValueError, match="cycle"):
        topological_order({"a": ["b"], "b": ["a"]})


# The unrestricted reference exists only to measure what keeping data apart costs (off by default).
READS_ALL_OWNERS = {"train_unrestricted", "tune_router_oracle"}  # the reference side: off by default


def test_coordinator_stages_never_read_owner_folders(tmp_path):
    """Only owner stages (foreach owners) may depend on owners/<name>/, and the reference side, off by default
    (router tuning, on by default, reads only what the owners published)."""
    dvc = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    readers = {name for name, stage in dvc["stages"].items()
               if "foreach" not in stage and any(str(d).startswith("owners") for d in stage.get("deps", []))}
    assert readers == READS_ALL_OWNERS
    assert P.resolve(read_project_params())["unrestricted"]["enabled"] is False


def test_smoke_run_trains_merges_and_records_lineage(smoke_workspace):
    ws, proc = smoke_workspace
    out = proc.stdout
    assert "merged model:" in out and "| domain | anchor loss |" in out and "consort ui" in out
    assert "report.html" in out
    for o in OWNERS:
        assert f"| {o} |" in out
    # A quiet console: a line per stage as it ends, the table once, each stage's own output in
    # its log; no weight-loading bars, no warnings of DVC about stub files.
    assert out.count("| domain | anchor loss |") == 1
    ended = [line.split()[1] for line in out.splitlines() if line.strip().startswith("ran ")]
    assert sorted(ended) == sorted(set(ended)) == sorted(stage_graph(ws)), out[-3000:]
    assert all((ws / ".consort" / "logs" / f"{s}.log").exists() for s in ended)
    # The stages after the first few forked from the stage server's pre-imported interpreter.
    forked = (ws / ".consort" / "logs" / "stage_server.log").read_text()
    assert "stages.merge_experts" in forked and "stages.report" in forked, forked
    assert "Loading weights" not in out + proc.stderr and "is empty" not in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in out + proc.stderr

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ws / "models" / "merged")
    tok = AutoTokenizer.from_pretrained(ws / "models" / "merged")
    assert type(model).__name__ == "FlexOlmoForCausalLM"
    assert model.config.num_experts == 1 + len(OWNERS)
    ids = tok("def main():", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 8 and isinstance(tok.decode(gen[0]), str)

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("consort")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("consort.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    by_stage = {r.data.tags["consort.stage"]: r for r in children}
    assert set(by_stage) == set(stage_graph(ws))
    for r in children:
        assert r.data.tags["dvc.stage_hash"] and "consort.git_commit" in r.data.tags and r.data.tags["prefect.flow_run_id"]

    # One digest per dataset: MLflow shows the start of the SHA-256 that `consort experts` prints.
    merged = {e["owner"]: e for e in json.loads((ws / "models" / "merged" / "consort_merged.json").read_text())["experts"]}
    for o in OWNERS:
        run = by_stage[f"train_expert@{o}"]
        train = (f"{o}/corpus/train.jsonl", merged[o]["data_digest"][:36])
        assert train[1] == hashlib.sha256((ws / "owners" / o / "corpus" / "train.jsonl").read_bytes()).hexdigest()[:36]
        assert train in {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
        merge_inputs = by_stage["merge_experts"].inputs.dataset_inputs
        assert train in {(d.dataset.name, d.dataset.digest) for d in merge_inputs}
        assert "final_loss" in run.data.metrics and run.data.params["expert.train.steps"]
        history = client.get_metric_history(run.info.run_id, "curve/loss")
        assert len(history) >= 3 and history[0].step < history[-1].step
        assert by_stage["merge_experts"].data.tags[f"consort.expert_run.{o}"] == run.info.run_id
    # The registered version is the pipeline run's export (its opt-outs applied), aliased `current`.
    versions = client.search_model_versions("name='consort-merged'")
    assert len(versions) == 1 and versions[0].run_id == parents[0].info.run_id and versions[0].tags["left_out"] == ""
    assert client.get_model_version_by_alias("consort-merged", "current").version == versions[0].version


def test_dp_owner_publishes_its_epsilon_and_the_report_prices_it(smoke_workspace):
    """math trains with DP (params.yaml): epsilon in the manifest and MLflow, its non-DP twin in the report."""
    ws, _ = smoke_workspace
    params = P.load(ws / "params.yaml")
    dp_owners = [o for o in OWNERS if params.owners[o].dp]
    assert dp_owners == ["math"]
    manifest = json.loads((ws / "published" / "math" / "expert" / "consort_expert.json").read_text())
    target = params.owners["math"].dp.target_epsilon
    assert 0 < manifest["dp"]["epsilon"] <= target + 1e-6 and manifest["dp"]["accountant"] == "prv"
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("consort").experiment_id],
                              "tags.`consort.stage` = 'train_expert@math'")
    assert runs[0].data.metrics["dp.epsilon"] == pytest.approx(manifest["dp"]["epsilon"])
    # The twin is trained only for the DP owner and stays in its private folder.
    assert (ws / "owners" / "math" / "dp_baseline" / "expert.safetensors").exists()
    assert not (ws / "owners" / "code" / "dp_baseline" / "expert.safetensors").exists()
    assert not list((ws / "published").glob("*/dp_baseline*"))
    math_eval = json.loads((ws / "evaluations" / "math.json").read_text())
    assert {"dp_baseline/alone", "dp_baseline/merged"} <= set(math_eval["models"])
    assert math_eval["dp_baseline"]["train_seconds"] > 0
    code_eval = json.loads((ws / "evaluations" / "code.json").read_text())
    assert "dp_baseline" not in code_eval and "dp_baseline/alone" not in code_eval["models"]
    page = (ws / "reports" / "report.html").read_text()
    assert "Differential privacy: what it costs" in page
    table = (ws / "reports" / "eval_table.md").read_text().splitlines()
    row = next(line for line in table if line.startswith("| math | ") and "(prv)" in line)
    assert f"{manifest['dp']['epsilon']:.2f} at" in row
    assert f"{math_eval['models']['dp_baseline/alone']['loss']:.3f}" in row


def _owner_snippets(ws: Path, per_owner: int = 20) -> list[str]:
    snippets = []
    for o in OWNERS:
        for i, line in enumerate((ws / "owners" / o / "corpus" / "train.jsonl").read_text().splitlines()):
            text = json.loads(line)["text"]
            mid = len(text) // 2
            snippets.append(text[mid:mid + 48])
            if i >= per_owner:
                break
    return [s for s in snippets if len(s.strip()) > 30]


def test_mlflow_store_holds_no_owner_text_or_private_path(smoke_workspace):
    ws, _ = smoke_workspace
    blobs = [(ws / "mlflow.db").read_bytes()]
    blobs += [p.read_bytes() for p in (ws / "mlartifacts").rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    db = sqlite3.connect(ws / "mlflow.db")
    blobs += ["\n".join(map(str, row)).encode() for t in ("params", "tags", "datasets", "inputs")
              for row in db.execute(f"select * from {t}")]
    haystack = b"\n".join(blobs)
    snippets = _owner_snippets(ws)
    assert len(snippets) > 50
    leaked = [s for s in snippets if s.encode() in haystack]
    assert not leaked, leaked[:3]
    assert str(ws / "owners").encode() not in haystack


def test_rerun_is_a_no_op(smoke_workspace):
    ws, _ = smoke_workspace
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("consort").experiment_id
    before = client.search_runs([experiment], max_results=1000)
    again = run_consort("run", "--preset", "smoke", "--workspace", str(ws), "--params", str(ws.parent / "params.yaml"),
                        cwd=ws.parent)
    assert "0 stages ran, 0 restored" in again.stdout, again.stdout[-2000:]
    # A run with nothing to do says so in a few lines besides the report's tables: no tracebacks
    # of Prefect's server shutting down.
    assert "Traceback" not in again.stdout + again.stderr and "CancelledError" not in again.stderr, again.stderr[-3000:]
    prose = [line for line in (again.stdout + again.stderr).splitlines() if line.strip() and not line.startswith("|")]
    assert len(prose) < 15, prose
    assert len(client.search_runs([experiment], max_results=1000)) == len(before)  # nothing new to trace


def _git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(ws), *args], capture_output=True, text=True, check=True).stdout


def _experiment(ws: Path, setting: str) -> set[str]:
    """`dvc exp run --temp -S setting` in the workspace: the stages it ran."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    exp = subprocess.run(["dvc", "exp", "run", "--temp", "-S", setting], cwd=ws, env=env, capture_output=True,
                         text=True, timeout=900)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    return set(re.findall(r"^Running stage '([^']+)'", exp.stdout, re.M))


def _experiments_shown(ws: Path) -> tuple[dict, list[dict]]:
    """`dvc exp show --json`: (the baseline, its experiments)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=ws, env=env, capture_output=True,
                                      text=True, check=True).stdout)
    baseline = next(r for r in shown if r["rev"] == _git(ws, "rev-parse", "HEAD").strip())
    return baseline, [e["revs"][0] for e in baseline["experiments"] or []]


def test_dvc_experiments_run_in_a_copy_of_the_workspace_rerun_only_their_branch_and_show(smoke_workspace):
    """`dvc exp run --temp` reproduces in a Git checkout under .dvc/tmp/exps/, which holds the
    DVC-tracked data and nothing Git ignores (the owners' signing keys, the fetched packages): before
    the workspace was Git-backed and named those by absolute path, it failed there. A dep recorded
    differently there would re-run its stage in every experiment (the keyring once re-ran the merge)."""
    ws, _ = smoke_workspace
    tracked = _git(ws, "ls-files").split()
    assert {"dvc.yaml", "dvc.lock", "params.yaml", "metrics/eval.json", "keyring/news.pub"} <= set(tracked)
    assert not [t for t in tracked if re.match(r"owners/[^/]+/(corpus|keys|trace|index)/|mlflow\.db|cache/", t)]
    assert _git(ws, "status", "--porcelain", "--untracked-files=no") == ""  # the run committed its baseline
    # Only code's trace page (and the report, which reads the evaluations folder the page is in, when the page
    # changed); not the evaluation, nothing before the merge, nor another owner's stage.
    assert _experiment(ws, "owners.code.trace.snippet_chars=80") - {"report"} == {"trace_page@code"}
    baseline, experiments = _experiments_shown(ws)
    policy = [e["data"]["params"]["params.yaml"]["data"]["owners"]["code"]["trace"]["snippet_chars"] for e in experiments]
    assert 80 in policy and baseline["data"]["params"]["params.yaml"]["data"]["owners"]["code"]["trace"][
        "snippet_chars"] != 80
    assert "evaluations/code.json" in baseline["data"]["metrics"]


@pytest.mark.slow  # re-trains an expert in the experiment's copy and re-runs the 20 stages after it
def test_a_dvc_experiment_retrains_an_expert_in_its_copy_signing_its_package(smoke_workspace):
    """The copy lacks what Git ignores: the owner's signing key and the fetched packages are named by
    absolute path, so an expert trains, signs its package and the safety probe reads cache/ there."""
    ws, _ = smoke_workspace
    steps = yaml.safe_load((ws / "params.yaml").read_text())["owners"]["news"]["train"]["steps"]
    ran = _experiment(ws, f"owners.news.train.steps={steps + 2}")
    assert {"train_expert@news", "merge_experts", "evaluate_safety", "report"} <= ran
    assert not {s for s in ran if s.startswith(("prepare", "train_tokenizer", "train_anchor", "train_expert@code"))}

    def news_steps_and_loss(rev: dict) -> tuple[int, float]:
        data = rev["data"]
        loss = data["metrics"]["evaluations/news.json"]["data"]["models"]["merged"]["loss"]
        return data["params"]["params.yaml"]["data"]["owners"]["news"]["train"]["steps"], loss

    baseline, experiments = _experiments_shown(ws)
    (longer,) = [e for e in experiments if news_steps_and_loss(e)[0] == steps + 2]
    assert news_steps_and_loss(baseline)[0] == steps
    assert news_steps_and_loss(longer)[1] != news_steps_and_loss(baseline)[1]  # the expert trained longer
    assert yaml.safe_load((ws / "params.yaml").read_text())["owners"]["news"]["train"]["steps"] == steps


@pytest.mark.slow  # re-trains an expert and re-runs all that follows it
@pytest.mark.changes_smoke_workspace
def test_a_param_change_reruns_only_its_branch(smoke_workspace, tmp_path):
    ws, _ = smoke_workspace
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("consort").experiment_id
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["presets"]["smoke"]["owners"]["news"]["train"] = {"steps": 5}  # the preset has the last word
    changed = tmp_path / "params.yaml"
    changed.write_text(yaml.safe_dump(params))
    proc = run_consort("run", "--preset", "smoke", "--workspace", str(ws), "--params", str(changed), cwd=ws.parent)
    ran = {line.split()[1] for line in proc.stdout.splitlines() if line.strip().startswith("ran ")}
    # News's synthetic set comes from its expert; the safety probe asks the merged model.
    expected = ({"train_expert@news", "train_dp_baseline@news", "synthesize@news", "train_unrestricted", "merge_experts",
                 "tune_router", "tune_router_oracle", "evaluate_public", "evaluate_safety", "report"}
                | {f"{s}@{o}" for s in ("evaluate_owner", "trace_page", "audit") for o in OWNERS})
    assert ran == expected, (sorted(ran ^ expected), proc.stdout[-3000:])
    manifest = json.loads((ws / "published" / "news" / "expert" / "consort_expert.json").read_text())
    assert manifest["training"]["steps"] == 5
    # Lineage of the partial run: a child run for each stage that ran, the others listed on the
    # parent, and the new merge linked to the new news expert and to the earlier runs of the others.
    parent = client.search_runs([experiment], "tags.`consort.kind` = 'pipeline'", order_by=["attributes.start_time DESC"])[0]
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=500)
    assert {r.data.tags["consort.stage"] for r in children} == expected
    assert set(parent.data.tags["consort.cached_stages"].split(",")) == set(stage_graph(ws)) - expected
    merge = next(r for r in children if r.data.tags["consort.stage"] == "merge_experts")
    news_run = next(r for r in children if r.data.tags["consort.stage"] == "train_expert@news")
    assert merge.data.tags["consort.expert_run.news"] == news_run.info.run_id
    for o in set(OWNERS) - {"news"}:
        linked = client.get_run(merge.data.tags[f"consort.expert_run.{o}"])
        assert linked.data.tags["consort.stage"] == f"train_expert@{o}" and linked.info.run_id not in {
            r.info.run_id for r in children}


def test_report_shows_every_baseline_and_the_optout_matrix(smoke_workspace):
    ws, _ = smoke_workspace
    reports = ws / "reports"
    for name in ("report.html", "loss_by_domain.png", "bpb_by_domain.png", "optout_heatmap.png", "loss_curves.png",
                 "routing.png", "eval_table.md"):
        assert (reports / name).stat().st_size > 500, name
    summary = json.loads((ws / "metrics" / "eval.json").read_text())
    assert set(summary) == {"public", *OWNERS}
    # xz -9e of the same held-out text, the floor a model must beat; the side-by-side continuations.
    html = (reports / "report.html").read_text()
    assert "xz -9e, same bytes" in html and "compresses every owner's text better than xz -9e" in html
    for domain in summary:
        xz = summary[domain].pop("xz")["bits_per_byte"]
        evaluation = json.loads((ws / "evaluations" / f"{domain}.json").read_text())
        assert 0.5 < xz < 8 and evaluation["xz_bits_per_byte"] == xz
        assert summary[domain].pop("xz_split")["bits_per_byte"] == evaluation["xz_split_bits_per_byte"]
        # Every comparison the report states, with its paired interval; every mean with its own.
        compared = {k: summary[domain].pop(k) for k in list(summary[domain]) if " vs " in k}
        assert {"merged vs anchor", "merged vs btm", "merged vs soup"} <= set(compared), sorted(compared)
        assert all(c["low"] <= c["value"] <= c["high"] for c in compared.values())
        assert all(m["loss_low"] <= m["loss"] <= m["loss_high"] for m in summary[domain].values())
        scored = evaluation["scored"]
        assert scored["tokens"] >= 1000 or scored["tokens"] >= scored["split_bytes"] / 8, scored
        g = evaluation["generations"]
        assert set(g) == {"prompt", "anchor", "merged"} | ({f"without/{domain}"} if domain != "public" else set())
        assert f"<code>{g['prompt']}</code>" in html and all(isinstance(v, str) for v in g.values())
    # The smoke preset turns on everything the study has: reference, router tuning, ablations.
    routers = {f"router/{m}" for m in ("none", "public_lm", "synthetic_lm", "synthetic_ridge", "oracle")}
    expected = ({"anchor", "merged", "soup", "btm", "unrestricted", "top_k/1", "top_k/2", f"top_k/{1 + len(OWNERS)}",
                 "router_bias/keep"} | routers | {f"alone/{o}" for o in OWNERS} | {f"without/{o}" for o in OWNERS})
    for domain, models in summary.items():
        # Shipped: the router the smoke preset's router_tuning.method fitted.
        assert models["router/synthetic_ridge"] == models["merged"] != models["router/none"], domain
        # The DP owner's domain also scores its non-DP twin, alone and merged in its place.
        assert set(models) == expected | ({"dp_baseline/alone", "dp_baseline/merged"} if domain == "math" else set()), domain
        assert all(v["loss"] > 0 for v in models.values())
    html = (reports / "report.html").read_text()
    assert "optout_heatmap.png" in html and "without/news" in html and "<table>" in html
    assert "Targets" in html and "merged beats BTM" in html and "Ablations" in html and "top_k/1" in html
    verdicts = re.findall(r"<td style=\"text-align:center\">(?:<strong>)?([a-z ]+?)(?:</strong>)?</td>", html)
    assert verdicts and set(verdicts) <= {"met", "missed", "cannot tell at this budget"}, verdicts
    assert "Router tuning: every method side by side" in html and "(e) oracle" in html
    # The owners' privacy audits (numbers only), with the canaries they planted.
    assert "Privacy audit" in html and "canaries 16x found, exposure" in html
    for o in OWNERS:
        audit = json.loads((ws / "audits" / f"{o}.json").read_text())
        assert set(audit["models"]) == {"merged", "opted_out", "anchor"}
        assert set(audit["models"]["merged"]["canaries"]) == {"0", "1", "4", "16"}  # 0: the held-out control
        assert 0 <= audit["models"]["merged"]["mia"]["loss"]["auc"] <= 1
        # Opted out, every extraction and canary rate falls back to the anchor's, within its interval.
        out, anchor = audit["models"]["opted_out"], audit["models"]["anchor"]
        rates = [k for k in anchor if k.startswith("extraction_")]
        assert len(rates) == 4
        pairs = [(out[k], anchor[k]) for k in rates]
        pairs += [(out["canaries"][r]["extracted"], anchor["canaries"][r]["extracted"]) for r in anchor["canaries"]]
        for mine, base in pairs:
            assert mine["low"] <= base["rate"] <= mine["high"], (o, mine, base)
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    report_run = client.search_runs([client.get_experiment_by_name("consort").experiment_id],
                                    filter_string="tags.`consort.stage` = 'report'")[0]
    logged = {a.path for a in client.list_artifacts(report_run.info.run_id, "report")}
    assert {"report/report.html", "report/optout_heatmap.png", "report/routing.png"} <= logged
    # Each router tuning method's yardstick, in the tuning stage's run; each router's score, in the evaluations'.
    tune_run = client.search_runs([client.get_experiment_by_name("consort").experiment_id],
                                  filter_string="tags.`consort.stage` = 'tune_router'")[0]
    recorded = json.loads((ws / "metrics" / "router_tuning.json").read_text())
    for method in ("none", "public_lm", "synthetic_lm", "synthetic_ridge"):
        assert tune_run.data.metrics[f"{method}.held_out_loss"] == recorded[method]["held_out_loss"] > 0
    # Each owner's trace page traced generated samples in its own index; the page is in its run.
    news_run = client.search_runs([client.get_experiment_by_name("consort").experiment_id],
                                  filter_string="tags.`consort.stage` = 'trace_page@news'")[0]
    assert [a.path for a in client.list_artifacts(news_run.info.run_id, "trace")] == ["trace/news.trace.html"]
    assert "traced in news" in (ws / "evaluations" / "news.trace.html").read_text()


def test_the_results_page_is_generated_from_the_run_and_its_report(smoke_workspace, tmp_path):
    from flows.results_page import results_page, time_split
    from stages.io import file_digest

    ws, _ = smoke_workspace
    run = json.loads((ws / ".consort" / "run_times.json").read_text())  # the workspace's last run: any test's
    assert run["preset"] == "smoke" and not run["failed"] and run["wall_seconds"] > 0
    assert run["stages"] and set(run["stages"]) <= set(dvc_state(ws, with_status=False)[0]) and len(run["commit"]) >= 7
    page = results_page(ws, tmp_path / "results" / "smoke.md")
    for stage, r in run["stages"].items():
        assert f"| {stage} | {r['outcome']} | {r['seconds']:.1f} |" in page
    assert (ws / "reports" / "eval_table.md").read_text().strip() in page
    for plot in ("loss_by_domain.png", "optout_heatmap.png", "routing.png"):  # the heat map and routing map
        assert (tmp_path / "results" / "smoke" / plot).stat().st_size > 500
        assert f"![{plot}](smoke/{plot})" in page
    for section in ("| target | verdict |", "| owner | published | stage-2 subset |", "| configuration | refusal"):
        assert section in page  # the targets, the curriculum and the safety tables
    assert f"commit {run['commit']}" in page and file_digest(ws / "params.yaml")[:16] in page
    for domain, models in json.loads((ws / "metrics" / "eval.json").read_text()).items():
        merged = models["merged"]  # the numbers are the run's metrics, with their intervals
        assert f"{merged['loss']:.3f} [{merged['loss_low']:.3f}, {merged['loss_high']:.3f}]" in page, domain
    split = time_split(ws)
    assert split.startswith(f"wall {run['wall_seconds']:.0f} s")
    ran = {s.partition("@")[0] for s, r in run["stages"].items() if r["outcome"] != "cached"}
    assert all(f"{name} " in split for name in ran)


def test_an_evaluation_in_bf16_weights_scores_within_half_a_percent_of_fp32(smoke_workspace):
    """The device rule's bf16 inference weights (stages/device.py) move no loss the report states by 0.5 %."""
    from stages import params as P
    from stages.evaluate import evaluate_domain

    ws, _ = smoke_workspace
    params = P.load(ws / "params.yaml")
    e = params.evaluate.model_copy(update={"precision": "bf16", "baselines": False, "ablations": False,
                                           "continuation_tokens": 0})
    models = ws / "models"
    got, _ = evaluate_domain("code", ws / "owners" / "code" / "corpus" / "val.jsonl", models / "anchor",
                                models / "merged", e, params.inference, tuned_dir=models / "merged_tuned")
    fp32 = json.loads((ws / "evaluations" / "code.json").read_text())["models"]
    assert params.evaluate.precision == "fp32" and set(got.models) >= {"anchor", "merged"}
    for name, score in got.models.items():
        assert score.loss == pytest.approx(fp32[name]["loss"], rel=0.005), name
        assert score.loss != fp32[name]["loss"]  # it did score in bf16


def test_curriculum_stages_and_safety_reach_the_report_mlflow_and_consort_experts(smoke_workspace):
    ws, _ = smoke_workspace
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("consort")
    html = (ws / "reports" / "report.html").read_text()
    table = (ws / "reports" / "eval_table.md").read_text()
    assert "Curriculum: one training stage or two" in html and "Safety: refusals per configuration" in html
    assert (ws / "reports" / "safety.png").stat().st_size > 500
    for o in OWNERS:
        metrics = json.loads((ws / "published" / o / "train_metrics.json").read_text())
        manifest = json.loads((ws / "published" / o / "expert" / MANIFEST).read_text())
        if o == "math":  # the DP owner trains one stage: a second would spend more of its budget
            assert "curriculum" not in metrics and "curriculum" not in manifest
            continue
        c = metrics["curriculum"]
        assert c["shipped"] == "two_stage" and manifest["curriculum"]["stage2_steps"] == 2
        assert c["selection"]["method"] == "anchor_bpb_band" and c["selection"]["documents"] >= 2
        # Both recipes on the same held-out documents: the paired interval of two stages against one.
        two_vs_one = c["compared"]["two_stage vs one_stage"]["own_loss"]
        assert two_vs_one["low"] <= two_vs_one["value"] <= two_vs_one["high"]
        assert two_vs_one["value"] == pytest.approx(c["two_stage"]["own_loss"] / c["one_stage"]["own_loss"] - 1)
        assert f"| {o} | two stage |" in table and f"<td>{o}</td>\n<td>two stage</td>" in html
        # One MLflow child run per curriculum stage, under the expert's run, with its held-out losses.
        expert_run = client.search_runs([exp.experiment_id], f"tags.`consort.stage` = 'train_expert@{o}'")[0]
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{expert_run.info.run_id}'")
        assert {r.data.tags["consort.curriculum"] for r in children} == {"stage_1", "one_stage", "two_stage"}
        for r in children:
            recipe = r.data.tags["consort.curriculum"]
            assert r.data.tags["consort.expert_stage"] == f"train_expert@{o}" and "consort.stage" not in r.data.tags
            assert r.data.metrics["own_loss"] == pytest.approx(c[recipe]["own_loss"])
            change = c["compared"][f"{recipe} vs anchor"]["public_loss"]
            assert [r.data.metrics[f"public_loss_vs_anchor{end}"] for end in ("_low", "", "_high")] == pytest.approx(
                [change["low"], change["value"], change["high"]])
            assert r.data.metrics["forgetting_vs_anchor"] == pytest.approx(c[recipe]["public_loss"]
                                                                           - c["anchor"]["public_loss"])
    safety = json.loads((ws / "safety" / "results.json").read_text())
    configs = safety["configurations"]
    assert set(configs) == {"anchor", "merged", *(f"without/{o}" for o in OWNERS)}
    assert safety["prompts"]["advbench"] == 8 == safety["prompts"]["benign"]
    assert all(c["refusal"]["n"] == 8 and 0 <= c["refusal"]["rate"] <= 1 for c in configs.values())
    replies = [json.loads(line) for line in (ws / "safety" / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 16 * len(configs) and {r["kind"] for r in replies} == {"harmful", "benign"}
    safety_run = client.search_runs([exp.experiment_id], "tags.`consort.stage` = 'evaluate_safety'")[0]
    assert safety_run.data.metrics["configurations.merged.refusal.rate"] == configs["merged"]["refusal"]["rate"]
    listing = run_consort("experts", "--workspace", str(ws), cwd=ws.parent).stdout
    assert "refusal of 8 harmful prompts" in listing and all(f"without/{o}" in listing for o in OWNERS)
    assert listing.count("FLAGGED") == sum(c["flagged"] for c in configs.values())


def test_the_safety_probe_without_each_owner_off_asks_the_anchor_and_the_merged_model_only(smoke_workspace, tmp_path):
    """The default run's probe (safety.without_each_owner: false), on the smoke run's models."""
    from stages.evaluate_safety import evaluate_safety

    ws, _ = smoke_workspace
    params = P.load(ws / "params.yaml")
    probe = params.safety.model_copy(update={"prompts": 2, "max_new_tokens": 4, "without_each_owner": False})
    result = evaluate_safety(ws / "models" / "anchor", ws / "models", ws / "public" / "corpus" / "val.jsonl",
                             ws / "cache", probe, {}, tmp_path / "results.json", tmp_path / "replies.jsonl")
    assert set(result["configurations"]) == {"anchor", "merged"}
    assert len((tmp_path / "replies.jsonl").read_text().splitlines()) == 2 * 4

@pytest.mark.slow  # re-runs every evaluation and audit; slicing itself is tested in test_experts
@pytest.mark.changes_smoke_workspace
def test_opting_an_expert_out_reruns_only_what_follows_the_merge(smoke_workspace, tmp_path):
    ws, _ = smoke_workspace
    # The workspace's own resolved params (whatever earlier tests changed): only the opt-out differs.
    params = tmp_path / "params.yaml"
    params.write_text((ws / "params.yaml").read_text())
    run_consort("experts", "disable", "news", "--params", str(params), cwd=ws.parent)
    proc = run_consort("run", "--workspace", str(ws), "--params", str(params), cwd=ws.parent)
    listing = run_consort("experts", "--workspace", str(ws), cwd=ws.parent).stdout
    assert any(line.split()[1:3] == ["news", "disabled"] for line in listing.splitlines() if line.strip()[:1].isdigit())
    assert any(line.split()[1:3] == ["code", "enabled"] for line in listing.splitlines() if line.strip()[:1].isdigit())
    ran = {line.split()[1] for line in proc.stdout.splitlines() if line.strip().startswith("ran ")}
    assert ran == ({"evaluate_public", "report"}
                   | {f"{s}@{o}" for s in ("evaluate_owner", "trace_page", "audit") for o in OWNERS}), proc.stdout[-3000:]
    running = proc.stdout.split("experts of:")[1].splitlines()[0]
    assert "news" not in running and "code" in running
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    latest = client.search_runs([client.get_experiment_by_name("consort").experiment_id],
                                "tags.`consort.kind` = 'pipeline'", order_by=["attributes.start_time DESC"])[0]
    assert latest.info.run_name.startswith("default without news "), latest.info.run_name
    # The run registered a version without news, now the current one; none of news's tensors is in it.
    from urllib.parse import urlparse

    from test_export import expert_digests, shipped_checkpoint, stored_digests

    current = client.get_model_version_by_alias("consort-merged", "current")
    assert current.tags["left_out"] == "news" and current.run_id == latest.info.run_id
    owners = [e["owner"] for e in json.loads((ws / "models" / "merged" / "consort_merged.json").read_text())["experts"]]
    shipped = shipped_checkpoint(ws, tmp_path / "shipped")
    registered = stored_digests(Path(urlparse(current.source).path) / "model" / "model.safetensors")
    assert not expert_digests(shipped, owners.index("news")) & registered
    assert expert_digests(shipped, owners.index("code")) <= registered
    news = json.loads((ws / "evaluations" / "news.json").read_text())
    assert "news" not in news["experts"] and "without/news" not in news["models"] and "without/code" in news["models"]
    bad = run_consort("generate", "--prompt", "The", "--experts", "news,legal", "--workspace", str(ws),
                      cwd=ws.parent, check=False)
    assert bad.returncode == 2 and "legal" in bad.stderr
    gen = run_consort("generate", "--prompt", "The", "--experts", "code", "--max-new-tokens", "5",
                      "--workspace", str(ws), cwd=ws.parent)
    assert gen.stdout.startswith("The") and "experts: public, code]" in gen.stderr
    default = run_consort("generate", "--prompt", "The", "--max-new-tokens", "2", "--workspace", str(ws),
                          "--params", str(params), cwd=ws.parent)
    assert "code" in default.stderr and "news" not in default.stderr  # the opt-out holds without --experts


def test_cpu_scheduler_serves_the_costliest_ready_stage_first():
    graph = {"train_anchor": [], "train_expert@x": ["train_anchor"], "train_expert@y": ["train_anchor"],
             "train_expert@z": ["train_anchor"], "merge_experts": ["train_expert@x", "train_expert@y", "train_expert@z"]}
    cost = {"train_anchor": 1.0, "train_expert@x": 1.0, "train_expert@y": 3.0, "train_expert@z": 2.0, "merge_experts": 1.0}
    cpu = CpuScheduler(1, graph, cost)
    order, threads = [], {}

    def run(stage):
        with cpu.hold(stage) as n:
            order.append(stage)
            threads[stage] = n
            time.sleep(0.05)
        cpu.finished(stage)

    run("train_anchor")
    workers = []
    for stage in ("train_expert@x", "train_expert@z", "train_expert@y"):  # the cheap one asks first
        workers.append(threading.Thread(target=run, args=(stage,)))
        workers[-1].start()
        time.sleep(0.02)
    for w in workers:
        w.join(timeout=10)
    run("merge_experts")
    assert order == ["train_anchor", "train_expert@y", "train_expert@z", "train_expert@x", "merge_experts"]

    # Two cores: a cheaper stage that asked first starts as soon as the costlier one has its core.
    lanes = CpuScheduler(2, {"a": [], "train_expert@x": ["a"], "train_expert@y": ["a"]},
                         {"train_expert@x": 1.0, "train_expert@y": 3.0})
    lanes.finished("a")
    got_core = threading.Event()

    def cheap():
        with lanes.hold("train_expert@x"):
            got_core.set()

    waiter = threading.Thread(target=cheap)
    waiter.start()
    assert not got_core.wait(0.1)  # y is ready and costlier: x lets it go first
    with lanes.hold("train_expert@y"):
        assert got_core.wait(2.0)  # and then takes the other core at once
    waiter.join(2.0)
    assert threads == {"train_anchor": 1, "train_expert@x": 1, "train_expert@y": 1, "train_expert@z": 1, "merge_experts": 1}
    two = CpuScheduler(2, graph, cost)
    with two.hold("train_anchor") as n_anchor:
        assert n_anchor == 2 and two.free == 0
    with two.hold("prepare_public") as n_light:
        assert n_light == 0 and two.free == 2


def test_cores_nobody_waits_for_are_lent_to_a_running_stage_and_taken_back(tmp_path, monkeypatch):
    import torch

    from stages.runtime import follow_granted_threads, granted_threads_file

    graph = {"train_expert@x": [], "train_expert@y": [], "merge_experts": ["train_expert@x", "train_expert@y"],
             "synthesize@x": ["train_expert@x"]}
    cpu = CpuScheduler(2, graph, {"train_expert@x": 1.0, "train_expert@y": 3.0, "synthesize@x": 1.0,
                                  "merge_experts": 1.0}, grants=tmp_path)
    grant = granted_threads_file(tmp_path, "train_expert@y")
    with cpu.hold("train_expert@y") as n:
        assert n == 1 and grant.read_text() == "1"
        with cpu.hold("train_expert@x"):
            assert cpu.free == 0
        cpu.finished("train_expert@x")
        assert grant.read_text() == "2" and cpu.free == 0  # x's core, which nobody asked for, went to y
        # The stage takes its grant up at its next step.
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("DVC_STAGE", "dvc.yaml:train_expert@y")
        before = torch.get_num_threads()
        try:
            follow_granted_threads()
            assert torch.get_num_threads() == 2
        finally:
            torch.set_num_threads(before)
        with cpu.hold("synthesize@x") as m:  # a stage that asks takes the lent core back
            assert m == 1 and grant.read_text() == "1"
        assert grant.read_text() == "2"
    assert not grant.exists() and cpu.free == 2
    with cpu.hold("merge_experts") as n_merge:
        assert n_merge == 2


def test_a_removed_owner_feeds_no_report_and_prune_deletes_what_is_left(smoke_workspace, tmp_path):
    """An owner dropped from params leaves files behind: the report ignores them, `consort prune` removes them."""
    from stages.report import main as report_main

    ws, _ = smoke_workspace
    copy = tmp_path / "ws"
    for part in ("evaluations", "audits", "published", "keyring", "metrics"):
        shutil.copytree(ws / part, copy / part)
    shutil.copy(ws / "params.yaml", copy / "params.yaml")
    stale = json.loads((copy / "evaluations" / "news.json").read_text()) | {"domain": "clinic"}
    (copy / "evaluations" / "clinic.json").write_text(json.dumps(stale))
    shutil.copy(copy / "audits" / "news.json", copy / "audits" / "clinic.json")
    shutil.copytree(copy / "published" / "news", copy / "published" / "clinic")
    (copy / "owners" / "clinic" / "corpus").mkdir(parents=True)
    shutil.copy(copy / "keyring" / "news.pub", copy / "keyring" / "clinic.pub")
    report_main(["--evaluations", str(copy / "evaluations"), "--published", str(copy / "published"),
                 "--audits", str(copy / "audits"), "--out", str(copy / "reports"),
                 "--metrics", str(copy / "metrics" / "eval.json"), "--params", str(copy / "params.yaml")])
    assert "clinic" not in (copy / "reports" / "eval_table.md").read_text()
    assert "clinic" not in (copy / "reports" / "report.html").read_text()
    assert "news" in (copy / "reports" / "eval_table.md").read_text()
    listed = run_consort("prune", "--workspace", str(copy), cwd=tmp_path, check=False)
    assert listed.returncode == 1 and listed.stdout.startswith("clinic: ") and "--yes" in listed.stderr
    assert (copy / "owners" / "clinic").exists()  # listing deletes nothing
    run_consort("prune", "--workspace", str(copy), "--yes", cwd=tmp_path)
    assert not list(copy.rglob("clinic*")) and (copy / "published" / "news").exists()
    assert "nothing to remove" in run_consort("prune", "--workspace", str(copy), cwd=tmp_path).stdout


def clinic_params(tmp_path: Path, folder: Path) -> Path:
    """The project's params with one owner, `clinic`, reading `folder` (smoke preset budgets)."""
    raw = read_project_params()
    raw["owners"] = {"clinic": {"data": {"sources": [{"kind": "folder", "path": str(folder)}], "max_chars": 100000}}}
    raw["presets"]["smoke"].pop("owners", None)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_missing_data_folder_is_refused_before_anything_is_written(tmp_path):
    ws = tmp_path / "ws"
    proc = run_consort("run", "--preset", "smoke", "--workspace", str(ws), "--params",
                       str(clinic_params(tmp_path, tmp_path / "no-such-folder")), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "owners.clinic.data.sources[0].path" in last and "not a folder" in last, proc.stderr
    assert not ws.exists()  # no params, dvc.yaml, keys or MLflow run of a run that never started


@pytest.mark.slow  # a pipeline of its own
def test_a_failing_stage_ends_the_run_with_its_root_cause(tmp_path):
    folder = tmp_path / "clinic"
    folder.mkdir()
    (folder / "scan.txt").write_bytes(b"\x00\x01\x02" * 1000)  # not text: prepare_owner@clinic refuses it
    ws = tmp_path / "ws"
    proc = run_consort("run", "--preset", "smoke", "--workspace", str(ws), "--params", str(clinic_params(tmp_path, folder)),
                       cwd=tmp_path, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-2:]
    assert last[0].endswith("Cause:") and last[1].startswith("  prepare_owner@clinic: SourceError: folder source"), last
    assert "none of its 1 file(s) is text (scan.txt)" in last[1]
    runs = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").search_runs(
        [MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").get_experiment_by_name("consort").experiment_id],
        "tags.`consort.kind` = 'pipeline'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not [a for a in MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").list_artifacts(runs[0].info.run_id)]


def test_mlflow_says_which_experts_and_anchor_the_model_holds(smoke_workspace):
    ws, _ = smoke_workspace
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("consort")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    version = client.search_model_versions("name='consort-merged'")[0]
    info = json.loads((ws / "models" / "merged" / "consort_merged.json").read_text())
    assert version.tags["anchor.hash"] == info["anchor_hash"] and version.tags["anchor.source.kind"] == "scratch"
    for e in info["experts"][1:]:
        o = e["owner"]
        assert version.tags[f"expert.{o}.data_digest"] == e["data_digest"]
        assert len(version.tags[f"expert.{o}.package_hash"]) == 64
        run = client.get_run(version.tags[f"expert.{o}.run_id"])
        assert run.data.tags["consort.stage"] == f"train_expert@{o}"
        assert f"#/experiments/{exp.experiment_id}/runs/{run.info.run_id}" in version.description
    # Stage runs span the stage's own time, not the moment of recording it.
    for run in client.search_runs([exp.experiment_id], "tags.`consort.kind` = 'stage'"):
        took = run.info.end_time - run.info.start_time
        assert took >= 0.9 * run.data.metrics["stage_seconds"] * 1000, (run.data.tags["consort.stage"], took)
    parents = client.search_runs([exp.experiment_id], "tags.`consort.kind` = 'pipeline'")
    # Named by the preset the run was given (an earlier test re-runs with a resolved params file,
    # so under the default preset), then its opt-outs and the time.
    named = re.compile(r"(?P<preset>[\w-]+)( without [\w,]+)? \d{4}-\d\d-\d\d \d\d:\d\d( \(failed\))?")
    names = [(named.fullmatch(r.info.run_name), r.data.tags["consort.preset"]) for r in parents]
    assert names and all(m and m["preset"] == preset for m, preset in names), [r.info.run_name for r in parents]
    assert any(m["preset"] == "smoke" for m, _ in names)
