"""The shared store, as a folder and as a DVC remote: what one side puts, the other gets."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flows.store import Store, StoreError
from flows.workspace import init_dvc_repo


def _workspace(path, remote_url=None):
    path.mkdir(parents=True)
    init_dvc_repo(path)
    if remote_url is not None:  # as a user would: dvc's own command, in that workspace
        subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "shared", str(remote_url)], cwd=path,
                       check=True, capture_output=True)
    return path


def _package(folder, weights: bytes):
    (folder / "nested").mkdir(parents=True)
    (folder / "expert.safetensors").write_bytes(weights)
    (folder / "nested" / "manifest.json").write_text('{"owner": "news"}')
    return folder


@pytest.mark.parametrize("kind", ["folder", "dvc remote"])
def test_what_one_side_puts_the_other_gets(tmp_path, kind):
    shared = tmp_path / "shared"
    owner = _workspace(tmp_path / "owner", shared if kind == "dvc remote" else None)
    coordinator = _workspace(tmp_path / "coordinator", shared if kind == "dvc remote" else None)
    spec = "dvc:shared" if kind == "dvc remote" else str(shared)
    sender, receiver = Store.open(spec, owner), Store.open(spec, coordinator)
    assert not receiver.exists("experts/news/expert")

    sender.put(_package(tmp_path / "v1", b"\x00\x01" * 1000), "experts/news/expert")
    sender.write_json("runs/news/train.json", {"stages": [{"stage": "train_expert@news", "ran": True}]})
    assert receiver.exists("experts/news/expert") and receiver.exists("runs/news/train.json")
    receiver.get("experts/news/expert", coordinator / "published" / "news" / "expert")
    got = coordinator / "published" / "news" / "expert"
    assert (got / "expert.safetensors").read_bytes() == b"\x00\x01" * 1000
    assert json.loads((got / "nested" / "manifest.json").read_text()) == {"owner": "news"}
    assert receiver.read_json("runs/news/train.json")["stages"][0]["ran"] is True
    assert receiver.read_json("runs/math/train.json") is None
    # The files are in the store's one layout, whichever way it is reached.
    assert (shared / "experts" / "news" / "expert" / "expert.safetensors").exists()

    # A new version replaces the old one whole: a file it no longer has is gone on both sides.
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "expert.safetensors").write_bytes(b"new")
    sender.put(v2, "experts/news/expert")
    receiver.get("experts/news/expert", got)
    assert (got / "expert.safetensors").read_bytes() == b"new" and not (got / "nested").exists()
    assert not (shared / "experts" / "news" / "expert" / "nested").exists()
    assert sorted(p.name for p in got.parent.iterdir()) == ["expert"]  # no temporary copy left beside it


def test_a_remote_that_is_not_there_is_named(tmp_path):
    ws = _workspace(tmp_path / "ws", tmp_path / "shared")
    with pytest.raises(StoreError, match=r"has no DVC remote 'bucket' \(it has: shared\).*dvc remote add bucket URL"):
        Store.open("dvc:bucket", ws)
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="is no DVC repository"):
        Store.open("dvc:shared", tmp_path / "plain")
