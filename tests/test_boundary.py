"""The raw-data boundary: nothing the coordinator can see holds an owner's text.

The smoke preset plants secrets (canaries) in every owner's training *and* held-out documents.
After the real smoke run, every file on the coordinator's side is scanned: published expert
packages, models, the MLflow store (database and artifacts), Prefect's state and logs, the DVC
cache entries of coordinator stages' outputs, reports, evaluations, audits, metrics, the
workspace's own files. Two scans: the secrets themselves, and every distinctive run of 8 words of
every owner document (train and held-out), allowing exactly what each owner's policy discloses
(snippets of at most `snippet_chars` in trace pages of owners whose policy is `snippets`). The
unrestricted reference is left out by name: it is the off-by-default model trained on all owners'
data (test_pipeline checks that no other coordinator stage reads an owner's folder).
"""
import html
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import yaml
from conftest import PROJECT
from mlflow.tracking import MlflowClient

from stages import params as P
from stages.io import read_jsonl

COORDINATOR_DIRS = ("published", "models", "reports", "evaluations", "audits", "metrics", "mlartifacts", ".prefect",
                    "public", "tracing", "keyring", "checkpoints")
REFERENCE_ONLY = ("models/unrestricted", "metrics/unrestricted", "checkpoints/unrestricted")
RUN_WORDS = 8
WORD = re.compile(r"\w+")


def coordinator_stage_outputs(ws: Path) -> list[str]:
    """Output paths of the stages that are not per owner (no `foreach`), the reference excepted."""
    dvc = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    outs = []
    for name, stage in dvc["stages"].items():
        if "foreach" in stage or name == "train_unrestricted":
            continue
        for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            outs.append(next(iter(out)) if isinstance(out, dict) else out)
    return outs


def dvc_cache_files(ws: Path, outputs: list[str]) -> list[Path]:
    """The DVC cache files holding those outputs, from dvc.lock (directories through their .dir manifest)."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    cache = ws / ".dvc" / "cache" / "files" / "md5"
    files = []
    for stage in lock.values():
        for out in stage.get("outs", []):
            if out["path"] not in outputs or "md5" not in out:
                continue
            md5 = out["md5"]
            entry = cache / md5[:2] / md5[2:]
            if entry.exists():
                files.append(entry)
            if md5.endswith(".dir") and entry.exists():
                for item in json.loads(entry.read_text()):
                    f = cache / item["md5"][:2] / item["md5"][2:]
                    if f.exists():
                        files.append(f)
    return files


def coordinator_visible_files(ws: Path) -> list[Path]:
    files = [p for d in COORDINATOR_DIRS if (ws / d).exists() for p in (ws / d).rglob("*") if p.is_file()
             and not str(p.relative_to(ws)).startswith(REFERENCE_ONLY)]
    files += [p for p in ws.iterdir() if p.is_file()]  # mlflow.db, params.yaml, dvc.yaml, dvc.lock
    return files + dvc_cache_files(ws, coordinator_stage_outputs(ws))


def planted(ws: Path) -> list[dict]:
    return [c for f in sorted(ws.glob("owners/*/corpus/canaries.json")) for c in json.loads(f.read_text())]


def planted_secrets(ws: Path) -> list[str]:
    return [c["secret"] for c in planted(ws)]


def readable_text(data: bytes) -> str:
    """The text a reader of the file would see: JSON escapes and HTML entities undone."""
    text = data.decode("utf-8", "ignore")
    text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
    text = re.sub(r"\\[nrt\"\\/]", " ", text)
    return html.unescape(text)


def word_runs(text: str) -> set[str]:
    words = WORD.findall(text.lower())
    return {" ".join(words[i:i + RUN_WORDS]) for i in range(len(words) - RUN_WORDS + 1)}


def distinctive_runs(ws: Path) -> dict[str, str]:
    """{run of 8 words: owner} for runs in exactly one owner document (train or held-out) and not in
    the public corpus: text that could only have come from that owner."""
    per_doc = Counter()
    owner_of = {}
    for corpus in sorted(ws.glob("owners/*/corpus")):
        for split in ("train", "val"):
            for row in read_jsonl(corpus / f"{split}.jsonl"):
                for run in word_runs(row["text"]):
                    per_doc[run] += 1
                    owner_of[run] = corpus.parent.name
    public = set()
    for split in ("train", "val"):
        for row in read_jsonl(ws / "public" / "corpus" / f"{split}.jsonl"):
            public |= word_runs(row["text"])
    # A run of short tokens ("0 0 0 ...", "x y z ...") is no evidence of where it came from.
    return {r: owner_of[r] for r, n in per_doc.items() if n == 1 and r not in public and len(r) >= 40}


def without_disclosed_snippets(text: str, policies: dict[str, P.TracePolicy]) -> str:
    """A trace page minus the snippets its owner's policy allows; a snippet it does not allow stays in."""
    owner = re.search(r"<title>traced samples: ([^<]*)</title>", text)
    policy = policies.get(html.unescape(owner.group(1))) if owner else None
    if policy is None or policy.disclosure != "snippets":
        return text

    def cut(m: re.Match) -> str:
        return "" if len(html.unescape(m.group(1))) <= policy.snippet_chars else m.group(0)

    return re.sub(r"<span class=snip>(.*?)</span>", cut, text, flags=re.S)


def owner_policies(ws: Path) -> dict[str, P.TracePolicy]:
    owners = yaml.safe_load((ws / "params.yaml").read_text())["owners"]
    return {o: P.TracePolicy(**(p.get("trace") or {})) for o, p in owners.items()}


def owner_text_found(files: list[Path], runs: dict[str, str], policies: dict[str, P.TracePolicy]) -> list[tuple]:
    """(file, owner, run) for every distinctive owner run a coordinator-visible file holds."""
    found = []
    for f in files:
        raw = f.read_bytes()
        if f.suffix == ".html":
            raw = without_disclosed_snippets(raw.decode("utf-8", "ignore"), policies).encode()
        found += [(str(f), runs[r], r) for r in word_runs(readable_text(raw)) & runs.keys()]
    return found


def leaks(files: list[Path], secrets: list[str]) -> list[tuple[str, str]]:
    needles = [s.encode() for s in secrets]
    found = []
    for f in files:
        data = f.read_bytes()
        found += [(str(f), n.decode()) for n in needles if n in data]
    return found


def test_no_planted_secret_reaches_the_coordinator(smoke_workspace):
    ws, _ = smoke_workspace
    canaries = planted(ws)
    secrets = [c["secret"] for c in canaries]
    # Three owners, one secret at each of 1x, 4x, 16x in training documents and one in a held-out one.
    assert sorted(Counter(c["repeats"] for c in canaries).items()) == [(0, 3), (1, 3), (4, 3), (16, 3)]
    # The secrets are in the owners' data, each in its split (the scan below looks for something real).
    for c in canaries:
        split = "train" if c["repeats"] else "val"
        assert c["secret"].encode() in b"".join(p.read_bytes() for p in ws.glob(f"owners/*/corpus/{split}.jsonl"))
    files = coordinator_visible_files(ws)
    kinds = {str(p.relative_to(ws)).split("/")[0] for p in files}
    assert {"published", "models", "mlartifacts", ".prefect", ".dvc", "reports", "mlflow.db"} <= kinds, kinds
    assert len(files) > 50
    # Every owner's synthetic proxy set is among them (written by a model trained on the secrets).
    synthetic = {p.parts[-3] for p in files if p.name == "samples.jsonl" and p.parent.name == "synthetic"}
    assert synthetic == {"code", "math", "news"}, synthetic
    assert leaks(files, secrets) == []


def test_owners_signing_keys_stay_with_the_owners(smoke_workspace):
    """Only the public halves reach the coordinator's side (its keyring); the private keys never do."""
    import base64

    ws, _ = smoke_workspace
    private = sorted(ws.glob("owners/*/keys/signing_key.pem"))
    owners = sorted(p.parts[-3] for p in private)
    assert owners == ["code", "math", "news"]
    assert sorted(p.name for p in (ws / "keyring").iterdir()) == [f"{o}.pub" for o in owners]
    # The PEM body and the raw key bytes inside it: neither may appear in any coordinator-visible file.
    needles = []
    for p in private:
        body = "".join(p.read_text().splitlines()[1:-1])
        needles += [body, base64.b64decode(body)[-32:].hex()]
    assert leaks(coordinator_visible_files(ws), needles) == []


def test_the_scan_finds_a_secret_that_does_leak(smoke_workspace, tmp_path):
    ws, _ = smoke_workspace
    secret = planted_secrets(ws)[0]
    # A copy of the coordinator's MLflow store, into which a careless stage logs a secret.
    copy = tmp_path / "ws"
    copy.mkdir()
    shutil.copy(ws / "mlflow.db", copy / "mlflow.db")
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    run = client.create_run(client.get_experiment_by_name("consort").experiment_id)
    client.log_param(run.info.run_id, "note", f"prompt was: {secret}")
    (copy / "reports").mkdir()
    (copy / "reports" / "clean.md").write_text("nothing here")
    found = leaks([copy / "mlflow.db", copy / "reports" / "clean.md"], planted_secrets(ws))
    assert found == [(str(copy / "mlflow.db"), secret)]


def test_no_owner_text_reaches_the_coordinator_beyond_its_policy(smoke_workspace):
    """Every distinctive 8-word run of every owner document, train and held-out, is looked for."""
    ws, _ = smoke_workspace
    runs = distinctive_runs(ws)
    owners = set(runs.values())
    assert owners == {"code", "math", "news"} and len(runs) > 6_000, (owners, len(runs))
    policies = owner_policies(ws)
    files = coordinator_visible_files(ws)
    assert any(f.name.endswith(".trace.html") for f in files)  # the lineage pages are among them
    found = owner_text_found(files, runs, policies)
    assert found == [], found[:20]


def test_the_text_scan_finds_held_out_text_where_it_leaks(smoke_workspace, tmp_path):
    """The lineage page as it was: prompts taken from held-out openings; and a snippet beyond policy."""
    ws, _ = smoke_workspace
    runs = distinctive_runs(ws)
    policies = owner_policies(ws)
    held_out = next(r for r in read_jsonl(ws / "owners" / "news" / "corpus" / "val.jsonl")
                    if any(run in runs for run in word_runs(" ".join(r["text"].split()[:12]))))
    opening = " ".join(held_out["text"].split()[:12])
    page = tmp_path / "news.trace.html"
    page.write_text(f"<title>traced samples: news</title><p class=prompt>{html.escape(opening)}</p>")
    assert {o for _, o, _ in owner_text_found([page], runs, policies)} == {"news"}
    # In JSON (an MLflow param, a Prefect result) the same words are found through the escapes.
    blob = tmp_path / "result.json"
    blob.write_text(json.dumps({"prompt": opening.replace(" ", "\n")}, ensure_ascii=True))
    assert owner_text_found([blob], runs, policies)
    # code discloses snippets of at most snippet_chars: within it allowed, beyond it found.
    code_doc = next(r["text"] for r in read_jsonl(ws / "owners" / "code" / "corpus" / "train.jsonl")
                    if len(r["text"]) > 2 * policies["code"].snippet_chars
                    and any(run in runs for run in word_runs(r["text"][:policies["code"].snippet_chars])))
    for chars, expect_found in ((policies["code"].snippet_chars, False), (2 * policies["code"].snippet_chars, True)):
        page.write_text(f"<title>traced samples: code</title><span class=snip>{html.escape(code_doc[:chars])}</span>")
        assert bool(owner_text_found([page], runs, policies)) == expect_found, chars
