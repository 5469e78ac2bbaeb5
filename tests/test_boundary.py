"""The raw-data boundary: no byte the coordinator can see holds an owner's planted secret.

The smoke preset plants secrets (canaries) in every owner's training documents. After the real
smoke run, every file on the coordinator's side is scanned: published expert packages, models,
the MLflow store (database and artifacts), Prefect's state and logs, the DVC cache entries of
coordinator stages' outputs, reports, evaluations, metrics. The unrestricted reference is left
out by name: it is the off-by-default model trained on all owners' data (test_pipeline checks
that no other coordinator stage reads an owner's folder).
"""
import json
import shutil
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from conftest import PROJECT

COORDINATOR_DIRS = ("published", "models", "reports", "evaluations", "metrics", "mlartifacts", ".prefect", "public",
                    "tracing", "keyring")
REFERENCE_ONLY = ("models/unrestricted", "metrics/unrestricted")


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
    files += [p for p in ws.glob("mlflow.db*") if p.is_file()]
    return files + dvc_cache_files(ws, coordinator_stage_outputs(ws))


def planted_secrets(ws: Path) -> list[str]:
    return [c["secret"] for f in sorted(ws.glob("owners/*/corpus/canaries.json")) for c in json.loads(f.read_text())]


def leaks(files: list[Path], secrets: list[str]) -> list[tuple[str, str]]:
    needles = [s.encode() for s in secrets]
    found = []
    for f in files:
        data = f.read_bytes()
        found += [(str(f), n.decode()) for n in needles if n in data]
    return found


def test_no_planted_secret_reaches_the_coordinator(smoke_workspace):
    ws, _ = smoke_workspace
    secrets = planted_secrets(ws)
    assert len(secrets) == 5 * 3  # five owners, one secret at each of 1x, 4x, 16x
    # The secrets are in the owners' training data (the scan below looks for something real).
    assert all(s.encode() in b"".join(p.read_bytes() for p in ws.glob("owners/*/corpus/train.jsonl")) for s in secrets)
    files = coordinator_visible_files(ws)
    kinds = {str(p.relative_to(ws)).split("/")[0] for p in files}
    assert {"published", "models", "mlartifacts", ".prefect", ".dvc", "reports", "mlflow.db"} <= kinds, kinds
    assert len(files) > 50
    assert leaks(files, secrets) == []


def test_owners_signing_keys_stay_with_the_owners(smoke_workspace):
    """Only the public halves reach the coordinator's side (its keyring); the private keys never do."""
    import base64

    ws, _ = smoke_workspace
    private = sorted(ws.glob("owners/*/keys/signing_key.pem"))
    assert len(private) == 5 and sorted(p.name for p in (ws / "keyring").iterdir()) == [f"{o}.pub" for o in
                                                                                           sorted(p.parts[-3] for p in private)]
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
