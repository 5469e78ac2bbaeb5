"""The workspace a pipeline runs in: a DVC repo holding dvc.yaml, the resolved params and all data.

The project's dvc.yaml is copied in and params.yaml is written with the chosen preset applied, so
DVC sees exactly the values a run uses and re-runs only the stages whose inputs changed.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages import params as P
from stages import registry
from stages.artifacts import shipped_model

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
    def as_merged(self) -> Path:
        """The merge's output, with the router as merged (what the merge's lineage registers)."""
        return self.root / "models" / "merged"

    @property
    def merged_model(self) -> Path:
        """The merged model as shipped: with the tuned router once stage tune_router made one."""
        return shipped_model(self.root / "models")

    @property
    def safety_results(self) -> Path:
        """Stage evaluate_safety's refusal rates per configuration (a stub when it is off)."""
        return self.root / "safety" / "results.json"

    def params(self) -> P.Params:
        return P.load(self.params_path)

    @property
    def source_record(self) -> Path:
        return self.root / SOURCE_RECORD

    def source(self) -> tuple[Path, str] | None:
        """(the params file, the preset) the workspace was last built from; None before one was recorded."""
        if not self.source_record.exists():
            return None
        record = yaml.safe_load(self.source_record.read_text())
        return Path(record["params"]), record["preset"]


# Which params file and preset built the workspace: where its opt-outs are edited (Git-ignored: a path of this machine).
SOURCE_RECORD = Path(".consort") / "source.yaml"


def record_source(root: Path, source: Path, preset: str) -> None:
    from stages.io import write_text

    write_text(root / SOURCE_RECORD, yaml.safe_dump({"params": str(source.resolve()), "preset": preset}))


def _check_params_file(ws: Workspace, params_file: Path | None) -> tuple[Path, str] | None:
    """The recorded source; refuse a --params that names another file (its opt-outs are not this workspace's)."""
    recorded = ws.source()
    if params_file is not None and recorded and params_file.resolve() not in (recorded[0], ws.params_path):
        raise P.ParamsError(f"{ws.root} was built from {recorded[0]} (preset {recorded[1]}), not {params_file}: "
                            "its opt-outs are that file's and the workspace's. Drop --params, or rebuild the "
                            f"workspace from {params_file} with `consort run --params {params_file} --workspace "
                            f"{ws.root}` (`consort coordinate` for a coordinator)")
    return recorded


def opted_out(root: Path, params_file: Path | None = None) -> list[str]:
    """The owners opted out in the workspace at `root`: its own params.yaml's `inference.disabled`,
    and any its source file disables since (a hand edit not yet run: an opt-out never waits for a run).

    Without a workspace there, the params file's (the project's by default), as the default preset has it."""
    ws = Workspace(root)
    if not ws.params_path.exists():
        return P.disabled_owners(params_file or PROJECT_ROOT / "params.yaml", "default")
    recorded = _check_params_file(ws, params_file)
    disabled = P.disabled_owners(ws.params_path, "default")
    if recorded and recorded[0].exists():
        pending = [o for o in P.disabled_owners(*recorded) if o not in disabled]
        if pending:
            print(f"consort: {recorded[0]} opts out {', '.join(pending)} since {root} was last run; left out "
                  "here too (`consort run` brings the evaluations up to date)", file=sys.stderr)
        disabled += pending
    return disabled


def set_workspace_expert_enabled(root: Path, owner: str, enabled: bool, params_file: Path | None = None) -> list[Path]:
    """Opt an owner in or out where the workspace at `root` reads it: the params file it was built from
    (so the next run keeps the choice) and its own params.yaml (so it holds at once). Without a
    workspace there, only the params file (the project's by default). Returns the files changed."""
    ws = Workspace(root)
    recorded = _check_params_file(ws, params_file) if ws.params_path.exists() else None
    source = recorded[0] if recorded else params_file or PROJECT_ROOT / "params.yaml"
    files = [source] + ([ws.params_path] if ws.params_path.exists() else [])
    for path in files:  # every file is checked before any is written: a bad name changes none
        doc = yaml.safe_load(path.read_text()) or {}
        if owner not in (doc.get("owners") or {}):
            raise P.ParamsError(f"{path}: no owner {owner!r}; owners are {', '.join(doc.get('owners') or {})}")
    return [path for path in files if set_expert_enabled(owner, enabled, path)]


def read_project_params(path: Path | None = None) -> dict:
    path = path or PROJECT_ROOT / "params.yaml"
    if not path.exists():
        raise P.ParamsError(f"{path}: no such params file")
    raw = yaml.safe_load(path.read_text())
    return raw


def set_expert_enabled(owner: str, enabled: bool, params_file: Path | None = None) -> bool:
    """Opt an owner's expert in or out in the params file; True if the file changed.

    Only the value of `inference.disabled` is rewritten, in place: every other byte of the user's
    file (comments, layout, flow mappings) stays, so disable then enable gives the file back. The
    result is validated before it is written, so a typo in the owner's name changes nothing.
    """
    from stages.io import write_text

    path = params_file or PROJECT_ROOT / "params.yaml"
    text = path.read_text()
    doc = yaml.safe_load(text) or {}
    owners = list((doc.get("owners") or {}).keys())
    if owner not in owners:
        raise P.ParamsError(f"{path}: no owner {owner!r}; owners are {', '.join(owners)}")
    disabled = (doc.get("inference") or {}).get("disabled") or []
    wanted = [o for o in owners if (o in disabled and o != owner) or (o == owner and not enabled)]
    if list(disabled) == wanted:
        return False
    new_text = replace_yaml_value(text, ("inference", "disabled"), "[" + ", ".join(wanted) + "]")
    P.resolve(yaml.safe_load(new_text), origin=str(path))
    write_text(path, new_text)
    return True


def replace_yaml_value(text: str, keys: tuple[str, str], flow_value: str) -> str:
    """`text` with the value of the mapping entry keys[0].keys[1] replaced by `flow_value`.

    The node positions come from ruamel's round-trip parser; the edit itself is on the text, so
    nothing outside the value moves. A missing entry is added (a missing section at the end).
    """
    from ruamel.yaml import YAML

    top, key = keys
    doc = YAML().load(text) or {}
    lines = text.splitlines(keepends=True)
    section = doc.get(top)
    if not section:  # no section, `top:` with nothing under it, or `top: {}`
        if top not in doc:
            return text + ("" if not text or text.endswith("\n") else "\n") + f"{top}:\n  {key}: {flow_value}\n"
        line = doc.lc.key(top)[0]
        if section is not None:  # the empty flow mapping gives way to a block one (a comment stays)
            lines[line] = re.sub(r"\{\s*\}", "", lines[line], count=1)
        lines.insert(line + 1, f"  {key}: {flow_value}\n")
        return "".join(lines)
    if key not in section:
        line, col = section.lc.key(next(iter(section)))
        lines.insert(line, " " * col + f"{key}: {flow_value}\n")
        return "".join(lines)
    key_line, key_col = section.lc.key(key)
    value_line, value_col = section.lc.value(key)
    if value_line != key_line or lines[key_line][value_col:value_col + 1] not in ("[", "{"):
        # Empty, or a block list over several lines: it becomes one flow list on the key's line.
        end = key_line + 1
        while end < len(lines) and (not lines[end].strip() or lines[end].lstrip().startswith("#")
                                     or len(lines[end]) - len(lines[end].lstrip()) > key_col):
            end += 1
        while end > key_line + 1 and not lines[end - 1].strip():
            end -= 1  # blank lines after the list belong to the layout, not to the value
        head = lines[key_line]
        colon = head.index(":", key_col)
        comment = re.match(r"\s*(#.*)?", head[colon + 1:]).group(1)  # a comment after `key:` stays
        tail = f"  {comment.rstrip()}" if comment else ""
        lines[key_line:end] = [head[:colon + 1] + " " + flow_value + tail + "\n"]
        return "".join(lines)
    line = lines[key_line]
    close = _flow_end(line, value_col)
    lines[key_line] = line[:value_col] + flow_value + line[close:]
    return "".join(lines)


def _flow_end(line: str, start: int) -> int:
    """Index just past the flow collection that opens at line[start] (quotes and nesting respected)."""
    depth, quote = 0, None
    for i in range(start, len(line)):
        ch = line[i]
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise P.ParamsError(f"a flow list that does not close on its line: {line.strip()!r}")


def check_local_sources(params: P.Params, origin: str) -> None:
    """Refuse, naming the key, an owner source that points at a folder that is not there or is empty."""
    for owner, o in params.owners.items():
        for i, source in enumerate(o.data.sources):
            if not isinstance(source, (P.FolderSource, P.HFDatasetSource)):
                continue
            path = Path(source.path).expanduser()
            key = f"owners.{owner}.data.sources[{i}].path"
            if not path.is_dir():
                raise P.ParamsError(f"{origin}: {key}: {source.path} is not a folder; point it at the owner's "
                                    "folder of documents (nothing was changed)")
            if not any(path.iterdir()):
                raise P.ParamsError(f"{origin}: {key}: {source.path} is empty; put the owner's documents "
                                    "in it (nothing was changed)")


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


# Besides LOCAL_STATE, what Git never holds: the lineage store and its artifacts, Prefect's state,
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
