"""Erasure on one machine: an owner's documents taken down (`consort forget`), an owner leaving the
consortium (`consort withdraw`), and what the other commands check before they use an expert still
trained on documents taken down (docs/privacy.md).
"""
from __future__ import annotations

import sys
from pathlib import Path


def takedowns(ws, owners: list[str]) -> dict[str, tuple[int, int]]:
    """Owner -> (document ids its params take down, ids its published expert was trained without), for
    the owners with any: equal once the expert retrained, pending until then."""
    from stages.artifacts import MANIFEST
    from stages.io import read_json

    params, found = ws.params(), {}
    for owner in owners:
        asked = len(set(params.owners[owner].data.exclude)) if owner in params.owners else 0
        manifest = ws.root / "published" / owner / "expert" / MANIFEST
        done = ((read_json(manifest).get("takedown") or {}) if manifest.exists() else {}).get("requested", 0)
        if asked or done:
            found[owner] = (asked, done)
    return found


def takedown_lines(ws, owners: list[str]) -> list[str]:
    return [f"takedown {owner}: {asked} document id(s) (" + ("done" if asked == done else
            f"pending: the published expert was trained without {done}; `consort run` retrains it") + ")"
            for owner, (asked, done) in takedowns(ws, owners).items()]


def pending_takedown(ws, chosen: list[str]) -> str | None:
    """Why the model with the experts `chosen` must not run yet, or None: an expert still trained on
    documents its owner has taken down."""
    pending = [o for o, (asked, done) in takedowns(ws, chosen).items() if asked != done]
    if not pending:
        return None
    return (f"{', '.join(pending)} asked to take documents down and the merged model still holds the expert "
            f"trained on them: run `consort run` first, or leave them out with --experts")


def cmd_forget(owner: str, ids: list[str], workspace: Path, params: Path | None) -> int:
    """An erasure request on one machine: the ids go to `owners.<owner>.data.exclude`; the next run takes
    the documents down (docs/privacy.md)."""
    from flows.params_file import forget_documents, in_workspace
    from stages.params import ParamsError

    try:
        added = in_workspace(workspace.resolve(), owner, lambda path: forget_documents(owner, ids, path), params)
    except (ParamsError, FileNotFoundError) as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    new = sorted({i for got in added.values() for i in got})
    print(f"{owner}: {len(new)} document id(s) added to owners.{owner}.data.exclude in "
          f"{', '.join(map(str, added))}" + ("" if new else " (all were listed already)") + "; `consort run` "
          "takes them down, and until then generate, trace and export refuse the expert trained on them")
    return 0


def cmd_withdraw(owner: str, workspace: Path, params: Path | None) -> int:
    """An owner leaves the consortium: its section leaves the params files, its trace service the
    registry; the next run merges without its expert and withdraws every registered version holding it."""
    from flows.params_file import in_workspace, withdraw_owner
    from stages.params import ParamsError
    from tracing.coordinator import load_registry, write_registry

    ws_root = workspace.resolve()
    try:
        edited = in_workspace(ws_root, owner, lambda path: withdraw_owner(owner, path), params)
    except (ParamsError, FileNotFoundError) as err:
        print(f"consort: {err}", file=sys.stderr)
        return 2
    registry = load_registry(ws_root)
    service = registry.pop(owner, None)
    if service:
        write_registry(ws_root, registry)
    print(f"{owner}: removed from {', '.join(map(str, edited))}"
          + (f"; its trace service ({service['url']}) is no longer asked" if service else "")
          + f". `consort run --workspace {workspace}` merges without its expert and tags every registered "
          f"version holding it withdrawn; `consort prune --workspace {workspace} --yes` then deletes what the "
          "workspace still holds of it")
    return 0
