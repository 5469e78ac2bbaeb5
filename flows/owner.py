"""An owner on its own machine: its workspace, its stages, what it publishes, its Prefect worker.

The owner's workspace holds only that owner's private data and what the coordinator made public
(the anchor, the tokenizer, the public corpus and embedding; later the merged model), fetched
from the shared store. It runs the owner stages of dvc.yaml in two phases:

- `train`: prepare its corpus, train its expert (and the non-DP twin if it uses DP), build its
  trace index; then it publishes the signed expert package and its training numbers;
- `evaluate` (after the merge): its held-out evaluation and privacy audit; it publishes numbers.

The store (flows/store.py: a folder both sides reach, or a DVC remote) holds `models/`, `public/`
from the coordinator; `experts/<owner>/` and `results/<owner>/` from owners. Nothing under the
owner's `owners/<name>/` folder is ever copied there.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from flows import stage_server
from flows.layout import PROJECT_ROOT
from flows.params_file import read_project_params
from flows.repository import init_dvc_repo, quiet_dvc
from flows.store import Store
from flows.workspace_dvc import side_dvc_yaml
from stages import params as P
from stages import registry
from stages.artifacts import PUBLIC_KEY
from stages.runtime import log_file

OWNER_FILE = "consort_owner.json"
WORKSPACE_VARIABLE = "CONSORT_OWNER_WORKSPACE"  # how a worker tells the owner flow where its workspace is


class OwnerError(RuntimeError):
    """An owner workspace or store that cannot be used as asked."""


def pool_name(owner: str) -> str:
    return f"consort-{owner}"


@dataclass(frozen=True)
class OwnerWorkspace:
    root: Path

    @property
    def owner(self) -> str:
        path = self.root / OWNER_FILE
        if not path.exists():
            raise OwnerError(f"{self.root} is not an owner workspace ({OWNER_FILE} is missing); "
                             "create one with `consort owner init NAME --workspace DIR`")
        return json.loads(path.read_text())["owner"]

    @property
    def keys(self) -> Path:
        return self.root / "owners" / self.owner / "keys"


def init_owner(owner: str, root: Path, preset: str = "default", params_file: Path | None = None) -> OwnerWorkspace:
    """Create an owner's workspace (params for that owner only, its stages, a DVC repo, its key pair).

    Running it again keeps the key and updates the params and stages.
    """
    from stages.package import create_owner_key

    source = params_file or PROJECT_ROOT / "params.yaml"
    resolved = P.resolve(read_project_params(source), preset, origin=str(source))
    if owner not in resolved["owners"]:
        raise OwnerError(f"{source}: no owner {owner!r} (owners are {', '.join(resolved['owners'])}); add its "
                         "section under owners: first")
    root = root.resolve()
    existing = root / OWNER_FILE
    if existing.exists() and json.loads(existing.read_text())["owner"] != owner:
        raise OwnerError(f"{root} is already the workspace of owner {json.loads(existing.read_text())['owner']!r}")
    resolved["owners"] = {owner: resolved["owners"][owner]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(f"# Owner {owner}'s params (preset {preset}, from {source.name}).\n"
                                      + yaml.safe_dump(resolved, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump(side_dvc_yaml("owner", root=root), sort_keys=False))
    init_dvc_repo(root)
    (root / OWNER_FILE).write_text(json.dumps({"owner": owner}) + "\n")
    ws = OwnerWorkspace(root)
    create_owner_key(ws.keys)
    return ws


def check_phase(phase: str) -> None:
    if phase not in registry.OWNER_PHASES:
        raise OwnerError(f"unknown phase {phase!r}: choose {' or '.join(registry.OWNER_PHASES)}")


def fetch_public(ws: OwnerWorkspace, store: Store, phase: str) -> None:
    check_phase(phase)
    missing = [p for p in registry.public_inputs(phase) if not store.exists(p)]
    if missing:
        raise OwnerError(f"store {store} lacks {', '.join(missing)}: the coordinator publishes them before the "
                         f"{phase!r} phase (consort coordinate)")
    for rel in registry.public_inputs(phase):
        store.get(rel, ws.root / rel)


def run_phase(ws: OwnerWorkspace, phase: str) -> list[dict]:
    """Run the phase's stages in the workspace (DVC skips those up to date): [{stage, ran, seconds}]."""
    from dvc.repo import Repo

    check_phase(phase)
    quiet_dvc()
    out = []
    # DVC resolves stage paths against the working directory (a Prefect worker runs flows elsewhere).
    with contextlib.chdir(ws.root), Repo(str(ws.root)) as repo, \
            stage_server.running(ws.root, log_file(ws.root, "stage_server")):  # stages fork from it
        for stage in registry.in_phase(phase, "owner"):
            target = f"{ws.root / 'dvc.yaml'}:{stage}@{ws.owner}"
            t0 = time.perf_counter()
            ran = repo.reproduce(target, single_item=True)
            out.append({"stage": f"{stage}@{ws.owner}", "ran": bool(ran), "seconds": round(time.perf_counter() - t0, 1)})
    return out


def publish(ws: OwnerWorkspace, store: Store, phase: str) -> list[str]:
    """Copy what the phase produced to the store (the expert package is checked for its signature first)."""
    owner, done = ws.owner, []
    if phase == "train":
        from stages.package import verify_package

        package = ws.root / "published" / owner / "expert"
        if not package.exists():
            raise OwnerError(f"no expert package in {package.parent} yet: train it first "
                             f"(consort owner run --workspace {ws.root} --phase train)")
        # The owner checks its own package against its own key before anything leaves the machine.
        verify_package(package, owner, ws.keys / PUBLIC_KEY)
    for store_rel, ws_rel in registry.published_paths(owner, phase).items():
        if (ws.root / ws_rel).exists():
            store.put(ws.root / ws_rel, store_rel)
            done.append(store_rel)
    return done
