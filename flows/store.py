"""The shared store: where the coordinator and the owners exchange what they publish.

Two kinds, named the same way on every command (`--store`, `consort owner publish STORE`):

- a folder both sides can reach (a shared volume, a synced directory): `/mnt/consort-store`.
  Each copy is written beside its target and renamed into place, so a reader never sees half of it;
- a DVC remote of the workspace: `dvc:NAME`, after `dvc remote add NAME URL` (S3, GCS, Azure,
  SSH, WebDAV, a path...; credentials with `dvc remote modify --local`). The store's files go
  under the remote's URL in the same layout as in a folder, moved by DVC's filesystem for that
  remote. Object stores have no rename: a package is uploaded file by file, and a half-uploaded
  one fails its signature check at the merge rather than being merged.

Each side resolves `dvc:NAME` in its own workspace's DVC configuration, so the coordinator and
each owner can reach the same remote with their own credentials.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REMOTE_PREFIX = "dvc:"
# A remote's transient failures (a dropped connection, a timeout) are retried this many times,
# waiting BACKOFF_S, then twice as long each time; anything else fails at once.
RETRIES = 4
BACKOFF_S = 0.5
TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EAGAIN,
                    errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN}


def is_transient(err: BaseException) -> bool:
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, PermissionError)) \
        and err.errno in TRANSIENT_ERRNOS


class StoreError(RuntimeError):
    """A store that cannot be opened or lacks what is asked of it."""


def replace_tree(source: Path, target: Path) -> None:
    """Copy a file or folder over `target`: the copy is made beside it and renamed into place, so a
    reader never sees a half-copied package (a crash leaves the old copy, or the new one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (target.with_name(f".{target.name}.{what}-{os.getpid()}") for what in ("incoming", "old"))
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    shutil.copytree(source, tmp) if source.is_dir() else shutil.copy2(source, tmp)
    if target.is_dir() and not target.is_symlink():
        os.replace(target, old)  # a folder cannot be replaced in one rename: the old one steps aside
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


@dataclass(frozen=True)
class Store:
    spec: str            # as the user wrote it: an absolute folder, or dvc:NAME
    fs: object | None    # DVC's filesystem of the remote; None for a folder
    root: str            # the folder, or the path under the remote's URL

    @classmethod
    def open(cls, spec: str | Path, workspace: Path) -> Store:
        """The store `spec` names; `dvc:NAME` is looked up in `workspace`'s DVC configuration."""
        spec = str(spec)
        if not spec.startswith(REMOTE_PREFIX):
            folder = Path(spec).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            return cls(str(folder), None, str(folder))
        name = spec[len(REMOTE_PREFIX):]
        from dvc.config import Config
        from dvc.exceptions import DvcException
        from dvc.fs import get_cloud_fs

        dvc_dir = workspace / ".dvc"
        if not dvc_dir.is_dir():
            raise StoreError(f"store {spec}: {workspace} is no DVC repository to look the remote up in")
        config = Config(dvc_dir=str(dvc_dir))
        if name not in config.get("remote", {}):
            known = ", ".join(sorted(config.get("remote", {}))) or "none"
            raise StoreError(f"store {spec}: {workspace} has no DVC remote {name!r} (it has: {known}); "
                             f"add it with `dvc remote add {name} URL` in {workspace}")
        try:
            fs_class, fs_config, root = get_cloud_fs(config, name=name)
            fs = fs_class(**fs_config)
        except DvcException as e:
            raise StoreError(f"store {spec}: DVC cannot open remote {name!r}: {e}") from e
        return cls(spec, fs, root)

    def __str__(self) -> str:
        return self.spec

    def _path(self, rel: str) -> str:
        return self.fs.join(self.root, *Path(rel).parts)

    def _remote(self, what: str, call, *args, **kwargs):
        """One call to the remote's filesystem, retried with backoff while it fails transiently."""
        for attempt in range(RETRIES + 1):
            try:
                return call(*args, **kwargs)
            except Exception as err:
                if not is_transient(err):
                    raise
                if attempt == RETRIES:
                    raise StoreError(f"store {self.spec}: {what} failed {RETRIES + 1} times, the last with "
                                     f"{type(err).__name__}: {err}; check the connection and run the command again "
                                     "(what was uploaded in part is refused at the merge)") from err
                time.sleep(BACKOFF_S * 2 ** attempt)

    def exists(self, rel: str) -> bool:
        if self.fs is None:
            return (Path(self.root) / rel).exists()
        return self._remote(f"looking up {rel}", self.fs.exists, self._path(rel))

    def put(self, source: Path, rel: str) -> None:
        """Publish a local file or folder as `rel`, replacing what was there."""
        if self.fs is None:
            return replace_tree(source, Path(self.root) / rel)
        target = self._path(rel)
        if self._remote(f"looking up {rel}", self.fs.exists, target):
            self._remote(f"removing the old {rel}", self.fs.rm, target, recursive=True)
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        remote = [self._path(str(Path(rel) / p.relative_to(source))) for p in files] if source.is_dir() else [target]
        for path in {self.fs.parent(r) for r in remote}:
            self._remote(f"creating {path}", self.fs.makedirs, path, exist_ok=True)
        for local, there in zip(files, remote):  # file by file: a retry re-sends one file, not the package
            self._remote(f"uploading {local.name} to {rel}", self.fs.put_file, str(local), there)

    def get(self, rel: str, target: Path) -> None:
        """Fetch `rel` to a local file or folder, replacing what was there."""
        if self.fs is None:
            return replace_tree(Path(self.root) / rel, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            local = Path(tmp) / target.name
            self._remote(f"downloading {rel}", self.fs.get, self._path(rel), str(local))
            replace_tree(local, target)

    def read_json(self, rel: str) -> dict | None:
        if not self.exists(rel):
            return None
        if self.fs is None:
            return json.loads((Path(self.root) / rel).read_text())
        return json.loads(self._remote(f"reading {rel}", self.fs.cat_file, self._path(rel)))

    def write_json(self, rel: str, value: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(rel).name
            local.write_text(json.dumps(value, indent=2) + "\n")
            self.put(local, rel)
