"""Erasure requests beyond the corpus: the registry withdraws model versions that hold an expert
trained on documents taken down since, and the commands refuse an expert whose takedown is pending."""
import json

import pytest
import yaml
from conftest import PROJECT
from mlflow.tracking import MlflowClient

from flows.commands_erasure import pending_takedown, takedown_lines
from flows.layout import Workspace
from flows.registration import REGISTERED_MODEL, withdraw_stale
from stages import params as P
from stages.artifacts import MANIFEST


def test_a_new_version_withdraws_the_versions_holding_an_expert_trained_before_a_takedown(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model(REGISTERED_MODEL)
    holds = [{"news": "0", "code": "0"}, {"code": "0"}, {"news": "1", "code": "0"}]  # v1, v2, v3 (current)
    for experts in holds:
        client.create_model_version(REGISTERED_MODEL, str(tmp_path), tags={
            **{f"expert.{o}.data_digest": "d" for o in experts}, **{f"expert.{o}.takedowns": n for o, n in experts.items()}})
    assert withdraw_stale(client, "3", ["news", "code"]) == ["1"]  # v2 never held news's expert
    tags = {str(v.version): v.tags for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'")}
    assert tags["1"]["withdrawn"] == "true" and "news" in tags["1"]["withdrawn_reason"]
    assert "withdrawn" not in tags["2"] and "withdrawn" not in tags["3"]
    assert withdraw_stale(client, "3", ["news", "code"]) == []  # once


def test_an_owner_that_leaves_has_every_version_holding_its_expert_withdrawn(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model(REGISTERED_MODEL)
    for experts in (["news", "code"], ["code"], ["code", "math"]):  # v3 (current): news left, math joined
        client.create_model_version(REGISTERED_MODEL, str(tmp_path),
                                    tags={f"expert.{o}.data_digest": "d" for o in experts})
    assert withdraw_stale(client, "3", ["code", "math", "literature"]) == ["1"]
    v1 = client.get_model_version(REGISTERED_MODEL, "1").tags
    assert v1["withdrawn_reason"] == "holds the expert of news, who left the consortium"
    assert "withdrawn" not in client.get_model_version(REGISTERED_MODEL, "2").tags


def test_a_pending_takedown_is_listed_and_refused_until_the_expert_retrains(tmp_path):
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["owners"]["news"]["data"]["exclude"] = ["news-0123456789abcdef"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(P.resolve(raw)))
    ws = Workspace(tmp_path)
    package = tmp_path / "published" / "news" / "expert"
    package.mkdir(parents=True)
    (package / MANIFEST).write_text(json.dumps({"owner": "news"}))
    assert takedown_lines(ws, ["code", "news"]) == [
        "takedown news: 1 document id(s) (pending: the published expert was trained without 0; "
        "`consort run` retrains it)"]
    assert "news" in pending_takedown(ws, ["code", "news"]) and pending_takedown(ws, ["code"]) is None
    (package / MANIFEST).write_text(json.dumps({"owner": "news", "takedown": {"requested": 1}}))
    assert takedown_lines(ws, ["news"]) == ["takedown news: 1 document id(s) (done)"]
    assert pending_takedown(ws, ["code", "news"]) is None


def test_forget_adds_the_ids_to_the_owners_exclude_list_and_changes_nothing_else(tmp_path):
    import difflib

    from flows.params_file import forget_documents

    original = (PROJECT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(original)
    assert forget_documents("news", ["news-6ef6817f9422cc62", "news-6ef6817f9422cc62"], path) == ["news-6ef6817f9422cc62"]
    assert forget_documents("news", ["news-6ef6817f9422cc62", "news-00000000000000ff"], path) == ["news-00000000000000ff"]
    changed = [d for d in difflib.ndiff(original.splitlines(), path.read_text().splitlines()) if d[:2] in ("+ ", "- ")]
    assert changed == ["+       exclude: [news-6ef6817f9422cc62, news-00000000000000ff]"]
    assert P.parse(P.resolve(yaml.safe_load(path.read_text()))).owners["news"].data.exclude == [
        "news-6ef6817f9422cc62", "news-00000000000000ff"]
    with pytest.raises(P.ParamsError, match="no owner 'clinic'"):
        forget_documents("clinic", ["x"], path)
    resolved = tmp_path / "resolved.yaml"  # a workspace's own params.yaml, as yaml.safe_dump writes it
    resolved.write_text(yaml.safe_dump(P.resolve(yaml.safe_load(original)), sort_keys=False))
    forget_documents("code", ["code-1"], resolved)
    assert P.parse(yaml.safe_load(resolved.read_text())).owners["code"].data.exclude == ["code-1"]


def test_the_reports_erasure_section_shows_what_each_owner_published_and_no_id(tmp_path):
    """The report's "Erasure requests" rows come from the published manifests and the owners' audits."""
    from stages.report import takedown_markdown

    record = {"requested": 2, "documents_removed": 1, "ids_digest": "ab" * 32, "applied": "2026-12-07"}
    (tmp_path / "news" / "expert").mkdir(parents=True)
    (tmp_path / "news" / "expert" / MANIFEST).write_text(json.dumps({"owner": "news", "takedown": record}))
    (tmp_path / "code" / "expert").mkdir(parents=True)
    (tmp_path / "code" / "expert" / MANIFEST).write_text(json.dumps({"owner": "code"}))
    audits = [{"owner": "news", "models": {"merged": {
        "mia": {"loss": {"auc": 0.81, "auc_interval": {"value": 0.81, "low": 0.72, "high": 0.89, "se": 0.04}}},
        "mia_taken_down": {"loss": {"auc": 0.5312,
                                    "auc_interval": {"value": 0.5312, "low": 0.31, "high": 0.54, "se": 0.06}}},
        "extraction_greedy_taken_down": {"rate": 0.0, "low": 0.0, "high": 0.79, "n": 1},
        "extraction_greedy_held_out": {"rate": 0.25, "low": 0.05, "high": 0.7, "n": 4}}}}]
    rows = [line for line in takedown_markdown(tmp_path, ["code", "news", "math"], audits).splitlines()
            if line.startswith("| news") or line.startswith("| code")]
    assert rows == ["| news | 2026-12-07 | 2 | 1 | `abababababababab` | 0.53 [0.31, 0.54] | 0.81 [0.72, 0.89] | met | "
                    "0.00 [0.00, 0.79] | 0.25 [0.05, 0.70] |"]
    assert takedown_markdown(tmp_path, ["code"], audits) == ""


def test_withdraw_removes_the_owner_from_both_params_files_and_the_trace_registry_and_nothing_else(tmp_path):
    """`consort withdraw news` on a workspace: its section leaves the source params and the workspace's,
    every other byte stays, its trace service leaves the registry; an unknown owner changes nothing."""
    import difflib

    from conftest import run_consort

    from flows.params_file import record_source
    from tracing.coordinator import load_registry, write_registry

    source, ws = tmp_path / "params.yaml", tmp_path / "ws"
    source.write_text((PROJECT / "params.yaml").read_text())
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump(P.resolve(yaml.safe_load(source.read_text()), "smoke"),
                                                   sort_keys=False))
    record_source(ws, source, "smoke")
    write_registry(ws, {"news": {"url": "http://127.0.0.1:8801"}, "code": {"url": "http://127.0.0.1:8802"}})
    before = {p: p.read_text() for p in (source, ws / "params.yaml")}
    refused = run_consort("withdraw", "clinic", "--workspace", str(ws), cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "no owner 'clinic'" in refused.stderr
    assert {p: p.read_text() for p in before} == before
    done = run_consort("withdraw", "news", "--workspace", str(ws), cwd=tmp_path)
    assert "news: removed from" in done.stdout and "consort prune" in done.stdout
    removed = [d for d in difflib.ndiff(before[source].splitlines(), source.read_text().splitlines()) if d[:2] == "- "]
    assert removed[0] == "-   news:" and not [d for d in difflib.ndiff(before[source].splitlines(),
                                                                        source.read_text().splitlines()) if d[:2] == "+ "]
    for path in before:
        resolved = P.resolve(yaml.safe_load(path.read_text()), "smoke") if path == source else \
            yaml.safe_load(path.read_text())
        assert "news" not in resolved["owners"] and {"code", "math"} <= set(resolved["owners"]), path
    assert list(load_registry(ws)) == ["code"]


def longest_news_span(ws, text: str) -> int:
    """The longest span of `text` that news's own trace service finds in its index (characters)."""
    from tracing.coordinator import load_registry, start_services, stop_services, trace_everywhere

    services = start_services(ws, ["news"])
    try:
        answer = trace_everywhere(load_registry(ws), "", text)
    finally:
        stop_services(services)
    assert answer["owners"]["news"]["status"] == "ok", answer["owners"]
    return max((sp["end"] - sp["start"] for seg in answer["segments"] for sp in seg["spans"] if sp["owner"] == "news"),
               default=0)


@pytest.mark.changes_smoke_workspace  # retrains news's expert there: after every test that reads the workspace
def test_a_document_taken_down_leaves_the_index_the_expert_and_the_registry(smoke_workspace, tmp_path):
    """The whole chain on the smoke run: a news document is in the index; `consort forget` makes the
    commands refuse the old expert; the run re-runs news's stages and the coordinator's only; the index
    no longer holds the document, the new package records one takedown and no id, the old registered
    version is withdrawn, and the owner's audit scores the document against the held-out ones."""
    from conftest import run_consort
    from transformers import AutoTokenizer

    from stages.io import read_jsonl
    from tracing.index import open_engine

    ws, _ = smoke_workspace
    params = Workspace(ws).source()[0]  # `consort forget` edits the file the workspace was built from
    assert params != PROJECT / "params.yaml", "the shared smoke workspace must be built from a copy of the params"
    doc = next(read_jsonl(ws / "owners" / "news" / "corpus" / "train.jsonl"))
    tokenizer = AutoTokenizer.from_pretrained(ws / "models" / "anchor")
    tokens = tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
    span, passage = tokens[10:26], tokenizer.decode(tokens[10:42])
    assert open_engine(ws / "owners" / "news" / "index").count(input_ids=span)["count"] >= 1
    assert longest_news_span(ws, passage) >= 0.9 * len(passage)  # traced, as a user would, to news
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    before = client.get_model_version_by_alias("consort-merged", "current").version
    run_consort("forget", "news", doc["id"], "--workspace", str(ws), "--params", str(params), cwd=ws.parent)
    refused = run_consort("export", str(tmp_path / "out"), "--workspace", str(ws), cwd=ws.parent, check=False)
    assert refused.returncode == 2 and "news asked to take documents down" in refused.stderr
    assert "pending" in run_consort("experts", "--workspace", str(ws), cwd=ws.parent).stdout

    proc = run_consort("run", "--preset", "smoke", "--workspace", str(ws), "--params", str(params), cwd=ws.parent)
    ran = {line.split()[1] for line in proc.stdout.splitlines() if line.strip().startswith("ran ")}
    assert {"prepare_owner@news", "build_index@news", "train_expert@news", "merge_experts"} <= ran
    # The other owners (the smoke preset's code and math) re-run only what follows the merge.
    assert not any(s.endswith(("@code", "@math")) and not s.startswith(("evaluate", "trace_page", "audit"))
                   for s in ran), ran
    assert open_engine(ws / "owners" / "news" / "index").count(input_ids=span)["count"] == 0
    assert longest_news_span(ws, passage) < 0.9 * len(passage)  # what remains is phrases other documents share
    manifest = (ws / "published" / "news" / "expert" / "consort_expert.json").read_text()
    assert json.loads(manifest)["takedown"]["requested"] == 1 and doc["id"] not in manifest
    assert doc["id"] not in "".join(p.read_text(errors="ignore") for p in (ws / "published").rglob("*.json"))
    old = client.get_model_version("consort-merged", before)
    assert old.tags["withdrawn"] == "true" and "news" in old.tags["withdrawn_reason"]
    assert client.get_model_version_by_alias("consort-merged", "current").version != before
    audit = json.loads((ws / "audits" / "news.json").read_text())
    # At smoke scale the experts barely learn their documents, so the proof cannot be made ("cannot tell"); what
    # must never show is the removed document still told apart from held-out ones.
    from stages.report import forgotten_verdict

    assert audit["taken_down_documents"] == 1 and "auc_interval" in audit["models"]["merged"]["mia_taken_down"]["loss"]
    assert forgotten_verdict(audit["models"]["merged"]) != "missed"
    assert audit["models"]["merged"]["extraction_greedy_taken_down"]["n"] == 1
    assert "takedown news: 1 document id(s) (done)" in run_consort("experts", "--workspace", str(ws),
                                                                   cwd=ws.parent).stdout
    erasures = (ws / "reports" / "report.html").read_text().split("<h2>Erasure requests</h2>")[1].split("<h2>")[0]
    assert "<td>news</td>" in erasures and json.loads(manifest)["takedown"]["ids_digest"][:16] in erasures



@pytest.mark.parametrize("trained_on, removed, verdict", [
    ((0.72, 0.89), (0.31, 0.54), "met"),  # the test tells trained-on documents apart, not the removed ones
    ((0.72, 0.89), (0.61, 0.80), "missed"),  # the removed ones are still told apart
    ((0.45, 0.62), (0.31, 0.54), "cannot tell at this budget"),  # it cannot even tell the trained-on ones
    ((0.72, 0.89), (0.40, 0.70), "cannot tell at this budget"),  # too few removed documents to say
])
def test_removed_documents_are_at_the_held_out_level_only_where_the_audit_could_have_seen_them(
        trained_on, removed, verdict):
    from stages.report import forgotten_verdict

    def entry(low, high):
        return {"loss": {"auc": (low + high) / 2, "auc_interval": {"value": (low + high) / 2, "low": low, "high": high,
                                                                   "se": 0.05}}}

    assert forgotten_verdict({"mia": entry(*trained_on), "mia_taken_down": entry(*removed)}) == verdict
    assert forgotten_verdict({"mia": entry(*trained_on)}) == "cannot tell at this budget"
