"""What lineage reads of DVC: dvc.lock's entries (re-parsed only when DVC rewrote the file), each
stage's hash, and the params, metrics and plots each stage declares in dvc.yaml."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import yaml

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML has it


def stage_hash(lock_entry: dict) -> str:
    return hashlib.md5(json.dumps(lock_entry, sort_keys=True).encode()).hexdigest()


class DvcState:
    """A workspace's dvc.lock and dvc.yaml as lineage needs them. Safe to share between threads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._stages: tuple[int, dict] | None = None
        self._files: dict[str, tuple[list[str], list[str], list[str]]] | None = None

    def stages(self) -> dict:
        """dvc.lock's stages ({} before the first run)."""
        lock = self.root / "dvc.lock"
        if not lock.exists():
            return {}
        with self._lock:
            stamp = lock.stat().st_mtime_ns
            if self._stages is None or self._stages[0] != stamp:
                self._stages = (stamp, (yaml.load(lock.read_text(), Loader=_YAML_LOADER) or {}).get("stages", {}))
            return self._stages[1]

    def entry(self, stage: str) -> dict:
        return self.stages().get(stage, {})

    def stage_hash(self, stage: str) -> str:
        return stage_hash(self.entry(stage))

    def declared(self, stage: str) -> tuple[list[str], list[str], list[str]]:
        """(params keys, metric files, plot files) of a stage, read from dvc.yaml once."""
        with self._lock:
            if self._files is None:
                from dvc.repo import Repo

                with Repo(str(self.root), _wait_for_lock=True) as repo:
                    self._files = {
                        s.name: ([k for d in s.deps if hasattr(d, "params") for k in (d.params or [])],
                                 [str(o.def_path) for o in s.outs if o.metric],
                                 [str(o.def_path) for o in s.outs if o.plot])
                        for s in repo.index.stages}
            return self._files[stage]
