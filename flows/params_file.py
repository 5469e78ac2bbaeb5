"""The params file a workspace is built from, and its editor: which file and preset built the
workspace, the opt-outs read from both, and edits that change one value and every other byte not."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from flows.layout import PROJECT_ROOT, SOURCE_RECORD, Workspace
from stages import params as P


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


def replace_yaml_value(text: str, keys: tuple[str, ...], flow_value: str) -> str:
    """`text` with the value of the mapping entry at the path `keys` replaced by `flow_value`.

    The node positions come from ruamel's round-trip parser; the edit itself is on the text, so
    nothing outside the value moves. A missing entry is added (a missing top-level section at the
    end); the sections above a deeper entry must be there, in block style.
    """
    from ruamel.yaml import YAML

    *path, top, key = keys
    doc = YAML().load(text) or {}
    for part in path:
        doc = doc.get(part) if hasattr(doc, "get") else None
        if doc is None or doc.fa.flow_style():
            raise P.ParamsError(f"no block-style section {'.'.join(keys[:-1])} to edit; write {'.'.join(keys)} by hand")
    lines = text.splitlines(keepends=True)
    section = doc.get(top)
    if not section:  # no section, `top:` with nothing under it, or `top: {}`
        if top not in doc:
            if path:
                raise P.ParamsError(f"no section {'.'.join(keys[:-1])} to edit; write {'.'.join(keys)} by hand")
            return text + ("" if not text or text.endswith("\n") else "\n") + f"{top}:\n  {key}: {flow_value}\n"
        line, col = doc.lc.key(top)
        if section is not None:  # the empty flow mapping gives way to a block one (a comment stays)
            lines[line] = re.sub(r"\{\s*\}", "", lines[line], count=1)
        lines.insert(line + 1, " " * (col + 2) + f"{key}: {flow_value}\n")
        return "".join(lines)
    if key not in section:
        if section.fa.flow_style():
            raise P.ParamsError(f"{'.'.join(keys[:-1])} is written in flow style ({{...}}); add {key} to it by hand")
        line, col = section.lc.key(next(iter(section)))
        lines.insert(line, " " * col + f"{key}: {flow_value}\n")
        return "".join(lines)
    key_line, key_col = section.lc.key(key)
    value_line, value_col = section.lc.value(key)
    if value_line != key_line or lines[key_line][value_col:value_col + 1] not in ("[", "{"):
        # Empty, or a block list over several lines: it becomes one flow list on the key's line.
        end = _block_end(lines, key_line, key_col)
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


def _block_end(lines: list[str], key_line: int, key_col: int) -> int:
    """The line just past the block value of the entry at (key_line, key_col): the lines indented deeper
    (comments and blank lines among them), but the blank lines after it, which belong to the layout."""
    end = key_line + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].lstrip().startswith("#")
                                 or len(lines[end]) - len(lines[end].lstrip()) > key_col):
        end += 1
    while end > key_line + 1 and not lines[end - 1].strip():
        end -= 1
    return end


def remove_yaml_entry(text: str, keys: tuple[str, ...]) -> str:
    """`text` without the mapping entry at the path `keys` (its key line and its block); the sections
    above it must be in block style. Every other byte stays."""
    from ruamel.yaml import YAML

    *path, key = keys
    doc = YAML().load(text) or {}
    for part in path:
        doc = doc.get(part) if hasattr(doc, "get") else None
        if doc is None or doc.fa.flow_style():
            raise P.ParamsError(f"no block-style section {'.'.join(path)} to edit; remove {'.'.join(keys)} by hand")
    if key not in doc:
        raise P.ParamsError(f"no entry {'.'.join(keys)} to remove")
    lines = text.splitlines(keepends=True)
    key_line, key_col = doc.lc.key(key)
    del lines[key_line:_block_end(lines, key_line, key_col)]
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


def forget_documents(owner: str, ids: list[str], path: Path) -> list[str]:
    """Add document ids to `owners.<owner>.data.exclude` in the params file at `path` (only that value
    changes; validated before it is written). Returns the ids not listed before."""
    import json

    from stages.io import write_text

    text = path.read_text()
    owners = (yaml.safe_load(text) or {}).get("owners") or {}
    if owner not in owners:
        raise P.ParamsError(f"{path}: no owner {owner!r}; owners are {', '.join(owners)}")
    listed = ((owners[owner] or {}).get("data") or {}).get("exclude") or []
    new = [i for i in dict.fromkeys(ids) if i not in listed]
    if not new:
        return []
    value = "[" + ", ".join(i if re.fullmatch(r"[\w.-]+", i) else json.dumps(i) for i in [*listed, *new]) + "]"
    new_text = replace_yaml_value(text, ("owners", owner, "data", "exclude"), value)
    P.resolve(yaml.safe_load(new_text), origin=str(path))
    write_text(path, new_text)
    return new


def withdraw_owner(owner: str, path: Path) -> None:
    """Remove the owner's section from `owners` in the params file at `path` (validated before it is
    written): it leaves the consortium, and the presets' settings for it no longer apply."""
    from stages.io import write_text

    text = path.read_text()
    new_text = remove_yaml_entry(text, ("owners", owner))
    raw = yaml.safe_load(new_text)
    if "presets" in raw:
        P.resolve(raw, origin=str(path))
    else:  # a workspace's params.yaml is resolved already
        P.parse(raw, origin=str(path))
    write_text(path, new_text)


def in_workspace(root: Path, owner: str, edit, params_file: Path | None = None) -> dict[Path, object]:
    """`edit(path)` on each params file the workspace at `root` reads the owner from: the one it was built
    from (so the next run has the change) and its own params.yaml (so the commands see it at once).
    Every file is checked to hold the owner before any is edited. Returns each file's result."""
    ws = Workspace(root)
    recorded = _check_params_file(ws, params_file) if ws.params_path.exists() else None
    files = [recorded[0] if recorded else params_file or PROJECT_ROOT / "params.yaml"]
    files += [ws.params_path] if ws.params_path.exists() else []
    for path in files:
        if owner not in ((yaml.safe_load(path.read_text()) or {}).get("owners") or {}):
            raise P.ParamsError(f"{path}: no owner {owner!r}")
    return {path: edit(path) for path in files}
