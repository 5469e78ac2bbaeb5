"""A workspace's repositories: Git (for `dvc exp`) and DVC, what they ignore, the baseline commit,
the demo owners' keys, DVC's console, and the `python` its stage commands run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from stages import registry

# Besides LOCAL_STATE (flows/workspace_dvc.py), what Git never holds: the lineage store and its artifacts, Prefect's state,
# the stage logs, a trace service's key, tokens and audit log, and the stages' scratch files.
GIT_IGNORED = ("/mlflow.db", "/mlartifacts/", "/.prefect/", "/.consort/", "/cache", "/owners/*/keys/",
               "/owners/*/trace/", *(f"/{p}" for p in registry.scratch_files()))
# What the baseline commit holds besides the results DVC leaves to Git (its `cache: false` outs).
# The keyring holds public keys only, and the merge reads it: an experiment's copy needs it.
PIPELINE_FILES = ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "keyring")


def init_dvc_repo(root: Path) -> None:
    """Make `root` a Git-backed DVC repo (kept if it is one; a DVC-only one gains Git), ignoring
    what is no stage's input. Git is what `dvc exp` needs; without `git` on PATH it is DVC-only.

    With CONSORT_CACHE set, its `cache/` of fetched packages is that shared folder.
    """
    # An expert's resumable checkpoint comes and goes while it trains (the stages' scratch files
    # in stages/registry.py), a trace service keeps its key, tokens and audit log, and the owner's
    # signing key is an identity, not data: a stage reading the whole owners/ folder (the
    # unrestricted reference) must see none as input.
    ignored = (*registry.scratch_files(), "owners/*/trace/", "owners/*/keys/")
    (root / ".dvcignore").write_text("".join(f"{path}\n" for path in ignored))
    shared_cache = os.environ.get("CONSORT_CACHE")
    if shared_cache and not (root / "cache").exists():
        # Several workspaces (tests, presets) can share one folder of fetched packages.
        Path(shared_cache).mkdir(parents=True, exist_ok=True)
        (root / "cache").symlink_to(Path(shared_cache).resolve(), target_is_directory=True)
    use_git = shutil.which("git") is not None
    if use_git and not (root / ".git").exists():
        # Its own repository, even inside another one (the project's clone holds workspace/).
        subprocess.run(["git", "init", "-q", str(root)], check=True)
    gitignore = root / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    if use_git and set(GIT_IGNORED) - set(lines):
        gitignore.write_text("".join(f"{line}\n" for line in [*lines, *(g for g in GIT_IGNORED if g not in lines)]))
    config = root / ".dvc" / "config"
    if not (root / ".dvc").exists():
        from dvc.repo import Repo

        Repo.init(str(root), no_scm=not use_git)
        # Analytics would try to reach the internet on every command.
        config.write_text("[core]\n" + ("" if use_git else "    no_scm = True\n") + "    analytics = false\n")
    elif use_git and "    no_scm = True\n" in config.read_text():  # the line an older consort wrote
        config.write_text(config.read_text().replace("    no_scm = True\n", ""))  # keeps a remote added since


def commit_baseline(root: Path, message: str) -> str | None:
    """Commit the workspace's pipeline and the small results DVC leaves to Git to its Git repo: the
    baseline `dvc exp run` and `dvc exp show` compare experiments with. Returns the new commit, or
    None when nothing changed or the workspace has no Git. Everything DVC caches is ignored first:
    a workspace made DVC-only by an older consort has never had its outputs' .gitignore entries."""
    from dvc.output import OutputAlreadyTrackedError
    from dvc.repo import Repo

    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    git_results = []
    with Repo(str(root)) as repo, repo.scm_context(quiet=True):
        for out in repo.index.outs:
            if not out.use_cache:
                git_results += [out.fs_path] if out.exists else []
                continue
            try:
                out.ignore()
            except OutputAlreadyTrackedError:
                print(f"consort: {out} is in Git and in DVC's cache; `git rm -r --cached {out}` leaves it to DVC",
                      file=sys.stderr)

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)

    paths = [p for p in PIPELINE_FILES if (root / p).exists()]
    added = git("add", "-A", "--", *paths, *git_results, ":(glob)**/.gitignore")
    if added.returncode:
        raise RuntimeError(f"{root}: git add failed: {added.stderr.strip()}")
    if git("diff", "--cached", "--quiet").returncode == 0:
        return None
    # A fresh machine often has no Git identity; the workspace's commits are the pipeline's own.
    identity = [] if git("config", "user.email").stdout.strip() else ["-c", "user.name=consort",
                                                                       "-c", "user.email=consort@localhost"]
    committed = git(*identity, "commit", "-q", "-m", message)
    if committed.returncode:
        raise RuntimeError(f"{root}: git commit failed: {committed.stderr.strip()}")
    return git("rev-parse", "HEAD").stdout.strip()


def enrol_demo_owners(root: Path, owners) -> None:
    """Each owner's signing key pair in its folder, and its public key in the coordinator's keyring.

    On one machine the demo plays every owner, so joining is this: the owner creates its key, and
    the coordinator enrols the public half (on separate machines the key travels out of band).
    """
    from stages.package import create_owner_key, enrol_owner_key

    for owner in owners:
        enrol_owner_key(create_owner_key(root / "owners" / owner / "keys"), root / "keyring", owner)


def quiet_dvc() -> None:
    """Importing DVC installs its console handlers; turned down, so that the console shows consort's
    line per stage, not DVC's "Running stage" lines, its Git hints and its warnings (such as "'x' is
    empty" for a stub's file, once per stage reading it). A failing stage raises, and its cause is
    printed. Not propagated: Prefect's root handler would print again."""
    import logging

    import dvc  # noqa: F401  (its logging set-up first, then turned down)

    for name in ("dvc", "dvc_objects", "dvc_data"):
        logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger(name).propagate = False


def use_project_python() -> None:
    """DVC runs stage commands through the shell: make their `python` this interpreter (the venv's)."""
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
