"""The workspace's dvc.yaml: the project's, with each stage's code as deps, the `owners.*` params
spelled out per owner, local state by absolute path, and one side's stages for a coordinator or an
owner; and the stubs that stand in for the reference stages on a coordinator."""
from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import yaml

from flows.layout import PROJECT_ROOT
from stages import registry


def code_files(module: str) -> list[Path]:
    """The source files of a stage module and of every project module it imports, transitively
    (imports inside functions too): the code whose change changes the stage's outputs."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = PROJECT_ROOT / Path(*name.split(".")).with_suffix(".py")
        if name in seen or not path.exists():
            continue
        seen[name] = path
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from stages import params` names a module; `from stages.io import x` a package member.
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    return sorted(seen.values())


def with_code_deps(dvc: dict) -> dict:
    """Each stage's source files added to its deps (DVC's own convention), so a change to the code
    re-runs exactly the stages that run it, and what depends on them."""
    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        module = re.search(r"python -m ([\w.]+)", body["cmd"])
        if module:
            body["deps"] = [*body.get("deps", []), *(str(f) for f in code_files(module.group(1)))]
    return dvc


def with_owner_params(dvc: dict, owners: list[str]) -> dict:
    """Each params key `owners.*.<field>` spelled out once per owner: DVC has no wildcard, and a
    stage that tracked the whole `owners` section would re-run when any owner changed anything
    (one owner's trace policy re-ran the merge and all after it)."""
    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        keys = body.get("params", [])
        body["params"] = [expanded for k in keys
                          for expanded in ([k.replace("*", o, 1) for o in owners]
                                           if isinstance(k, str) and k.startswith("owners.*.") else [k])]
    return dvc


# What a workspace holds besides pipeline data, and keeps out of Git: fetched packages and each
# owner's signing key. No stage lists them as deps: DVC records a dep inside the workspace by its
# relative path whatever dvc.yaml says, so an absolute one reads as changed in an experiment's copy.
LOCAL_STATE = ("cache", "owners/${key}/keys")


def with_local_state_paths(dvc: dict, root: Path) -> dict:
    """LOCAL_STATE named by absolute path in the stages' commands: `dvc exp run --temp` and
    `--queue` run the stages in a copy of the Git checkout under .dvc/tmp/exps/, which has the
    DVC-tracked data but nothing Git ignores (the signing key was missing there)."""
    def local(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in LOCAL_STATE)

    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        body["cmd"] = " ".join(shlex.quote(str(root / t)) if local(t) else t for t in body["cmd"].split())
    return dvc


def side_dvc_yaml(side: registry.Side | None, project_dvc: Path = PROJECT_ROOT / "dvc.yaml",
                  owners: list[str] | None = None, root: Path | None = None) -> dict:
    """The project's dvc.yaml with its stages' code as deps, and only one side's stages
    (stages/registry.py) if `side` is given: an owner's workspace runs the per-owner stages; a
    coordinator's runs none of them, nor the reference trained on all owners' data.

    A workspace's copy also gets, given `owners`, its `owners.*` params spelled out for them and,
    given its `root`, absolute paths to its LOCAL_STATE; without, it is the DAG as written."""
    dvc = yaml.safe_load(project_dvc.read_text())
    dvc = with_code_deps({"stages": {n: stage for n, stage in dvc["stages"].items()
                                     if side is None or registry.spec(n).side == side}})
    if owners is not None:
        dvc = with_owner_params(dvc, owners)
    return dvc if root is None else with_local_state_paths(dvc, root)


def write_reference_stubs(root: Path) -> None:
    """The reference stages (the unrestricted model, the oracle router) need every owner's data in one
    place, so a coordinator never runs them: their stubs stand where the owners' evaluation, which
    fetches them from the store, and the report look for them."""
    from stages.io import write_json

    for folder, info in registry.reference_stubs():
        if not (root / folder / info).exists():
            (root / folder).mkdir(parents=True, exist_ok=True)
            write_json(root / folder / info, {"enabled": False})
    (root / "metrics").mkdir(parents=True, exist_ok=True)
    (root / "metrics" / "unrestricted_log.jsonl").touch()
