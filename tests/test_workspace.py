"""A workspace's Git side, on a real DVC repo and real Git: what the baseline commit holds."""
import subprocess
import sys
from pathlib import Path

import yaml
from dvc.repo import Repo

from flows.repository import commit_baseline, init_dvc_repo


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout


def test_a_dvc_only_workspace_gains_git_and_commits_its_pipeline_but_never_its_data(tmp_path, monkeypatch):
    # The layout an older consort left: `dvc init --no-scm`, one stage whose cached output is the
    # owner's data and whose metrics DVC leaves to Git.
    root = tmp_path / "ws"
    (root / "owners" / "news" / "keys").mkdir(parents=True)
    (root / "owners" / "news" / "keys" / "signing_key.pem").write_text("secret")
    (root / "mlflow.db").write_text("lineage")
    script = tmp_path / "make.py"  # the stages' code lives in the project, outside the workspace
    script.write_text("import json, pathlib\n"
                                  "pathlib.Path('owners/news/corpus').mkdir()\n"
                                  "pathlib.Path('owners/news/corpus/train.jsonl').write_text('private text')\n"
                                  "pathlib.Path('metrics.json').write_text(json.dumps({'loss': 1.5}))\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": {
        "cmd": f"{sys.executable} {script}", "deps": [str(script)], "outs": ["owners/news/corpus"],
        "metrics": [{"metrics.json": {"cache": False}}]}}}))
    (root / "params.yaml").write_text("seed: 0\n")
    Repo.init(str(root), no_scm=True)
    monkeypatch.chdir(root)  # DVC resolves the targets of `reproduce` against the working directory
    with Repo(str(root)) as repo:
        repo.reproduce()
    assert not (root / ".git").exists()

    init_dvc_repo(root)
    assert "no_scm" not in (root / ".dvc" / "config").read_text()
    commit = commit_baseline(root, "baseline")
    assert commit and _git(root, "rev-parse", "HEAD").strip() == commit
    tracked = set(_git(root, "ls-files").split())
    assert {"dvc.yaml", "dvc.lock", "params.yaml", "metrics.json", ".gitignore", "owners/news/.gitignore"} <= tracked
    assert not {t for t in tracked if t.startswith(("owners/news/corpus", "owners/news/keys")) or t == "mlflow.db"}
    assert _git(root, "status", "--porcelain") == ""  # nothing left over for `dvc exp` to warn of
    assert commit_baseline(root, "again") is None  # nothing changed, no empty commit


def test_preparing_a_workspace_again_keeps_a_dvc_remote_added_to_it(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    init_dvc_repo(root)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "shared", str(tmp_path / "remote")], cwd=root,
                   check=True, capture_output=True)
    init_dvc_repo(root)
    config = (root / ".dvc" / "config").read_text()
    assert "shared" in config and "analytics = false" in config and "no_scm" not in config
