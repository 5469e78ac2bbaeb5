"""File helpers shared by the stages: atomic outputs, JSON lines, content digests."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a scratch folder next to `out`; it replaces `out` only if the block succeeds.

    A crash or bad input therefore never leaves a half-written output for DVC or a user to find.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def temp_path(path: Path) -> Path:
    """A sibling scratch path to write before `os.replace(tmp, path)`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text(path: str | Path, text: str) -> None:
    """Write through a temporary file and rename, so readers never see a partial file."""
    path = Path(path)
    tmp = temp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write through a temporary file and rename (as write_text), so a crash leaves no partial file."""
    path, n = Path(path), 0
    tmp = temp_path(path)
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_jsonl(path: str | Path) -> Iterator[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_digest(state_dict: dict) -> str:
    """Hash of a model's tensors by name, shape, dtype and bytes: independent of file layout."""
    import torch  # imported here: data stages use this module and need not pay for torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def add_upcycling_arguments(ap: argparse.ArgumentParser) -> None:
    """The command-line inputs and outputs of a stage that trains experts upcycled from the anchor."""
    ap.add_argument("--public-corpus", type=Path, required=True, help="the public train.jsonl")
    ap.add_argument("--anchor", type=Path, required=True)
    ap.add_argument("--public-embedding", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--train-log", type=Path, required=True, help="the per-step log (JSON lines)")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))


def parse_expert_cli(description: str, argv: list[str] | None):
    """(arguments, params) of a stage that trains one owner's expert and signs its package.

    An owner that params.yaml does not list is refused with the owners it does list.
    """
    from stages import params as P

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("owner")
    ap.add_argument("--corpus", type=Path, required=True, help="the owner's train.jsonl")
    add_upcycling_arguments(ap)
    ap.add_argument("--signing-key", type=Path, required=True, help="the owner's Ed25519 private key (PEM)")
    args = ap.parse_args(argv)
    params = P.load(args.params)
    if args.owner not in params.owners:
        raise SystemExit(f"unknown owner {args.owner!r}: params.yaml lists {sorted(params.owners)}")
    return args, params
