"""The workspace a pipeline runs in: a DVC repo holding dvc.yaml, the resolved params and all data.

The project's dvc.yaml is copied in and params.yaml is written with the chosen preset applied, so
DVC sees exactly the values a run uses and re-runs only the stages whose inputs changed.
"""
from __future__ import annotations

import io
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages import params as P

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def params_path(self) -> Path:
        return self.root / "params.yaml"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def merged_model(self) -> Path:
        return self.root / "models" / "merged"

    def params(self) -> P.Params:
        return P.load(self.params_path)


def read_project_params(path: Path | None = None) -> dict:
    path = path or PROJECT_ROOT / "params.yaml"
    if not path.exists():
        raise P.ParamsError(f"{path}: no such params file")
    raw = yaml.safe_load(path.read_text())
    return raw


def set_expert_enabled(owner: str, enabled: bool, params_file: Path | None = None) -> bool:
    """Opt an owner's expert in or out in the params file (comments kept); True if the file changed.

    The result is validated before it is written, so a typo in the owner's name changes nothing.
    """
    from ruamel.yaml import YAML

    from stages.io import write_text

    path = params_file or PROJECT_ROOT / "params.yaml"
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(path.read_text())
    owners = list((doc.get("owners") or {}).keys())
    if owner not in owners:
        raise P.ParamsError(f"{path}: no owner {owner!r}; owners are {', '.join(owners)}")
    inference = doc.setdefault("inference", {})
    disabled = inference.get("disabled") or []
    wanted = [o for o in owners if (o in disabled and o != owner) or (o == owner and not enabled)]
    if list(disabled) == wanted:
        return False
    inference["disabled"] = wanted
    P.resolve(yaml.safe_load(_dump(rt, doc)), origin=str(path))
    write_text(path, _dump(rt, doc))
    return True


def _dump(rt, doc) -> str:
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()


def prepare_workspace(root: Path, preset: str, params_file: Path | None = None, owners_remote: bool = False) -> Workspace:
    """Create or update the workspace: dvc.yaml, resolved params.yaml and a DVC repo (no Git needed).

    With `owners_remote` it is a coordinator's workspace whose owners run their stages on their own
    machines (flows/remote.py): only the coordinator's stages, and no owner keys of its own.
    """
    root = root.resolve()
    source = params_file or PROJECT_ROOT / "params.yaml"
    resolved = P.resolve(read_project_params(source), preset, origin=str(source))
    root.mkdir(parents=True, exist_ok=True)
    if owners_remote:
        from flows.remote import coordinator_dvc_yaml, write_reference_stub

        (root / "dvc.yaml").write_text(yaml.safe_dump(coordinator_dvc_yaml(PROJECT_ROOT / "dvc.yaml"), sort_keys=False))
        write_reference_stub(root)
    else:
        shutil.copyfile(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    text = (f"# Written by `consort run --preset {preset}` from {source.name}; edit that file, not this one.\n"
            + yaml.safe_dump(resolved, sort_keys=False))
    if not owners_remote:
        enrol_demo_owners(root, resolved["owners"])
    params_path = root / "params.yaml"
    if not params_path.exists() or params_path.read_text() != text:
        params_path.write_text(text)
    init_dvc_repo(root)
    return Workspace(root)


def init_dvc_repo(root: Path) -> None:
    """Make `root` a DVC repo without Git (kept if it is one), ignoring what is no stage's input.

    With CONSORT_CACHE set, its `cache/` of fetched packages is that shared folder.
    """
    # An expert's resumable checkpoint comes and goes while it trains, a trace service keeps its
    # key, tokens and audit log, and the owner's signing key is an identity, not data: a stage
    # reading the whole owners/ folder (the unrestricted reference) must see none as input.
    (root / ".dvcignore").write_text("owners/*/checkpoint.pt*\nowners/*/dp_baseline_checkpoint.pt*\n"
                                     "owners/*/trace/\nowners/*/keys/\n")
    shared_cache = os.environ.get("CONSORT_CACHE")
    if shared_cache and not (root / "cache").exists():
        # Several workspaces (tests, presets) can share one folder of fetched packages.
        Path(shared_cache).mkdir(parents=True, exist_ok=True)
        (root / "cache").symlink_to(Path(shared_cache).resolve(), target_is_directory=True)
    if not (root / ".dvc").exists():
        from dvc.repo import Repo

        Repo.init(str(root), no_scm=True)
        # Analytics would try to reach the internet on every command.
        (root / ".dvc" / "config").write_text("[core]\n    no_scm = True\n    analytics = false\n")


def enrol_demo_owners(root: Path, owners) -> None:
    """Each owner's signing key pair in its folder, and its public key in the coordinator's keyring.

    On one machine the demo plays every owner, so joining is this: the owner creates its key, and
    the coordinator enrols the public half (on separate machines the key travels out of band).
    """
    from stages.package import create_owner_key, enrol_owner_key

    for owner in owners:
        enrol_owner_key(create_owner_key(root / "owners" / owner / "keys"), root / "keyring", owner)


def use_project_python() -> None:
    """DVC runs stage commands through the shell: make their `python` this interpreter (the venv's)."""
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
