"""The shared store, as a folder and as a DVC remote: what one side puts, the other gets."""
from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

from flows import store as store_module
from flows.repository import init_dvc_repo
from flows.store import Store, StoreError
from stages.package import PackageRefused, create_owner_key, sign_package, verify_package


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


class FlakyFs:
    """A remote's filesystem whose uploads fail: the first `drops` with a dropped connection, or,
    with `dies_after`, every one after that many files (the owner's machine lost its network)."""

    def __init__(self, fs, drops: int = 0, dies_after: int | None = None) -> None:
        self.fs, self.drops, self.dies_after, self.calls, self.uploaded = fs, drops, dies_after, 0, 0

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def put_file(self, local, remote, **kwargs):
        self.calls += 1
        if self.calls <= self.drops or (self.dies_after is not None and self.uploaded >= self.dies_after):
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        self.uploaded += 1
        return self.fs.put_file(local, remote, **kwargs)


def _signed_package(tmp_path):
    package = tmp_path / "package"
    package.mkdir()
    (package / "expert.safetensors").write_bytes(b"\x07" * 4096)
    (package / "consort_expert.json").write_text('{"owner": "news"}')
    key = create_owner_key(tmp_path / "keys")
    sign_package(package, key.with_name("signing_key.pem"), "news")
    return package, key.with_name("signing_key.pub")


def test_transient_upload_failures_are_retried_and_a_cut_upload_is_refused_at_the_merge(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "BACKOFF_S", 0.01)
    shared = tmp_path / "shared"
    owner = _workspace(tmp_path / "owner", shared)
    coordinator = _workspace(tmp_path / "coordinator", shared)
    real = Store.open("dvc:shared", owner)
    package, public_key = _signed_package(tmp_path)

    flaky = FlakyFs(real.fs, drops=3)  # three drops in a row, then the link holds
    Store(real.spec, flaky, real.root).put(package, "experts/news/expert")
    assert flaky.uploaded == 3 and flaky.calls == 6
    got = coordinator / "published" / "news" / "expert"
    Store.open("dvc:shared", coordinator).get("experts/news/expert", got)
    verify_package(got, "news", public_key)  # whole and signed

    cut = FlakyFs(real.fs, dies_after=1)
    with pytest.raises(StoreError, match=r"uploading .* failed 5 times, the last with ConnectionResetError"):
        Store(real.spec, cut, real.root).put(package, "experts/news/expert")
    assert cut.uploaded == 1
    Store.open("dvc:shared", coordinator).get("experts/news/expert", got)
    with pytest.raises(PackageRefused, match="did not finish"):
        verify_package(got, "news", public_key)


def test_a_failure_that_is_not_transient_is_not_retried(tmp_path):
    owner = _workspace(tmp_path / "owner", tmp_path / "shared")
    real = Store.open("dvc:shared", owner)

    class Denied(FlakyFs):
        def put_file(self, local, remote, **kwargs):
            self.calls += 1
            raise PermissionError(errno.EACCES, "Access denied")

    denied = Denied(real.fs)
    with pytest.raises(PermissionError):
        Store(real.spec, denied, real.root).put(_package(tmp_path / "v1", b"x"), "experts/news/expert")
    assert denied.calls == 1
