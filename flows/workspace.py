"""The workspace a pipeline runs in: a DVC repo holding dvc.yaml, the resolved params and all data.

The project's dvc.yaml is copied in (flows/workspace_dvc.py) and params.yaml is written with the
chosen preset applied, so DVC sees exactly the values a run uses and re-runs only the stages whose
inputs changed. Where things are inside it: flows/layout.py; the params file it is built from and
its editor: flows/params_file.py; its Git and DVC repositories: flows/repository.py.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from flows.layout import PROJECT_ROOT, Workspace
from flows.params_file import check_local_sources, read_project_params, record_source
from flows.repository import enrol_demo_owners, init_dvc_repo
from flows.workspace_dvc import side_dvc_yaml, write_reference_stubs
from stages import params as P


def prepare_workspace(root: Path, preset: str, params_file: Path | None = None, owners_remote: bool = False) -> Workspace:
    """Create or update the workspace: dvc.yaml, resolved params.yaml and a DVC repo (no Git needed).

    With `owners_remote` it is a coordinator's workspace whose owners run their stages on their own
    machines (flows/remote.py): only the coordinator's stages, and no owner keys of its own.
    """
    root = root.resolve()
    source = params_file or PROJECT_ROOT / "params.yaml"
    resolved = P.resolve(read_project_params(source), preset, origin=str(source))
    if not owners_remote:  # a coordinator's owners keep their folders on their own machines
        check_local_sources(P.parse(resolved, origin=str(source)), str(source))  # before the workspace is touched
    root.mkdir(parents=True, exist_ok=True)
    if owners_remote:
        (root / "dvc.yaml").write_text(yaml.safe_dump(side_dvc_yaml("coordinator", owners=list(resolved["owners"]),
                                                                    root=root), sort_keys=False))
        write_reference_stubs(root)
    else:
        (root / "dvc.yaml").write_text(yaml.safe_dump(side_dvc_yaml(None, owners=list(resolved["owners"]), root=root),
                                                      sort_keys=False))
    text = (f"# Written by `consort run --preset {preset}` from {source.name}; edit that file, not this one.\n"
            + yaml.safe_dump(resolved, sort_keys=False))
    if not owners_remote:
        enrol_demo_owners(root, resolved["owners"])
    params_path = root / "params.yaml"
    if not params_path.exists() or params_path.read_text() != text:
        params_path.write_text(text)
    record_source(root, source, preset)
    init_dvc_repo(root)
    return Workspace(root)


def removed_owner_paths(root: Path, owners: list[str]) -> dict[str, list[Path]]:
    """Per owner no longer in params: what the workspace still holds of it (private data included)."""
    found: dict[str, list[Path]] = {}
    for pattern in ("owners/*", "published/*", "keyring/*.pub", "evaluations/*.json", "evaluations/*.trace.html",
                    "audits/*.json"):
        for path in sorted(Path(root).glob(pattern)):
            name = path.name.split(".")[0]
            if name not in owners and name != "public" and not path.name.startswith("."):
                found.setdefault(name, []).append(path)
    return dict(sorted(found.items()))
