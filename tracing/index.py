"""An owner's infini-gram index: written in the engine's on-disk format by us, suffix-sorted by libdivsufsort.

infini-gram's own indexing CLI knows only three hub tokenizers, so we write its files with the
project's tokenizer (DESIGN.md section 4): `tokenized.0` (each document is a separator of 0xFF
bytes, then its token ids little-endian), `offset.0` (u64 byte offset of each document),
`metadata.0` + `metaoff.0` (one JSON line per document holding only its id, and their offsets),
`unigram.0` ("id count" lines) and `bow_ids.txt` (the tokens that begin a word). The suffix array
`table.0` is what infini-gram's `build_sa` writes (the byte offsets of the token-aligned suffixes in
byte order, each in `ceil(log2(bytes) / 8)` bytes little-endian; tests compare the two), sorted by
libdivsufsort (pydivsufsort) in this process: `build_sa`'s parallel sort and merge crawled at
100M tokens on 2 cores.

The engine's C++ has its asserts compiled out, so every crash case we know of is checked here
before the engine sees the files.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARD = 0
BOW_IDS = "bow_ids.txt"
INDEX_INFO = "consort_index.json"
INDEX_FILES = ("tokenized", "offset", "metadata", "metaoff", "unigram", "table")
# The engine finds its files by string replacement on the path: a folder whose path holds one of
# these words makes it open the wrong file and crash.
ENGINE_PATH_WORDS = ("tokenized", "table", "offset", "metadata", "metaoff", "unigram")


class IndexBuildError(ValueError):
    """An index folder cannot be built or opened safely."""


def token_dtype(vocab_size: int) -> str:
    """u16 while every id and the 0xFFFF separator fit, else u32 (u8 mis-parses unigram files)."""
    if vocab_size <= 0:
        raise IndexBuildError(f"vocabulary size {vocab_size} must be positive")
    return "u16" if vocab_size < 0xFFFF else "u32"


def check_index_path(path: Path) -> None:
    text = str(Path(path).resolve())
    bad = [w for w in ENGINE_PATH_WORDS if w in text]
    if bad:
        raise IndexBuildError(f"index folder {text} contains the word {bad[0]!r}, which the infini-gram engine "
                          "mistakes for one of its own file names; choose a folder path without it")


def bow_token_ids(tokenizer) -> list[int]:
    """Tokens that begin a word in byte-level BPE: those starting with an encoded space, newline or tab."""
    starts = ("Ġ", "Ċ", "ĉ")
    return sorted(i for t, i in tokenizer.get_vocab().items() if t.startswith(starts))


@dataclass(frozen=True)
class IndexStats:
    documents: int
    tokens: int
    seconds_write: float
    seconds_sort: float


def write_suffix_table(tokenized: Path, width: int, table: Path) -> None:
    """Write the suffix array of `tokenized`'s token-aligned suffixes, as infini-gram's `table` file."""
    from pydivsufsort import divsufsort

    data = np.fromfile(tokenized, dtype=np.uint8)  # writable: pydivsufsort hands the buffer to C
    pointer_bytes = int(np.ceil(np.log2(data.size) / 8))
    order = divsufsort(data)  # every byte's suffix in byte order (int32, or int64 past 2 GiB)
    aligned = order[order % width == 0].astype("<i8")
    del order
    # Each pointer is its offset's pointer_bytes low bytes, little-endian.
    aligned.view(np.uint8).reshape(-1, 8)[:, :pointer_bytes].tofile(table)


def write_index(docs: Iterable[tuple[str, list[int]]], vocab_size: int, bow_ids: list[int], out_dir: Path,
                eos_token_id: int) -> IndexStats:
    """Write the index of `docs` (document id, token ids) to out_dir, atomically.

    Token ids must lie in [0, vocab_size); a document id is stored as the only metadata.
    """
    out_dir = Path(out_dir)
    check_index_path(out_dir)
    dtype = np.dtype({"u16": "<u2", "u32": "<u4"}[token_dtype(vocab_size)])
    width = dtype.itemsize
    sep = b"\xff" * width
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # The building folder's name adds only digits to a checked path (a random suffix could spell
    # one of the engine's words).
    tmp = (out_dir.parent / f".{out_dir.name}.building-{os.getpid()}").resolve()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        counts = np.zeros(vocab_size, dtype=np.int64)
        n_docs = n_tokens = 0
        with (open(tmp / f"tokenized.{SHARD}", "wb") as ds, open(tmp / f"offset.{SHARD}", "wb") as od,
              open(tmp / f"metadata.{SHARD}", "wb") as mt, open(tmp / f"metaoff.{SHARD}", "wb") as om):
            ds_pos = mt_pos = 0
            for doc_id, ids in docs:
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                    bad = int(arr.max() if arr.max() >= vocab_size else arr.min())
                    raise IndexBuildError(f"document {doc_id!r}: token id {bad} "
                                      f"outside the vocabulary [0, {vocab_size})")
                body = sep + arr.astype(dtype).tobytes()
                od.write(np.uint64(ds_pos).tobytes())
                ds.write(body)
                ds_pos += len(body)
                line = (json.dumps({"doc_id": str(doc_id)}) + "\n").encode()
                om.write(np.uint64(mt_pos).tobytes())
                mt.write(line)
                mt_pos += len(line)
                counts += np.bincount(arr, minlength=vocab_size)
                n_docs += 1
                n_tokens += int(arr.size)
        if n_tokens == 0:
            raise IndexBuildError("no token to index: the corpus is empty")
        with open(tmp / f"unigram.{SHARD}", "w") as ug:
            ug.writelines(f"{i} {int(c)}\n" for i, c in enumerate(counts) if c)
        (tmp / BOW_IDS).write_text("".join(f"{i}\n" for i in bow_ids if 0 <= i < vocab_size))
        t1 = time.perf_counter()
        write_suffix_table(tmp / f"tokenized.{SHARD}", width, tmp / f"table.{SHARD}")
        t2 = time.perf_counter()
        info = {"documents": n_docs, "tokens": n_tokens, "vocab_size": vocab_size,
                "token_dtype": token_dtype(vocab_size), "eos_token_id": eos_token_id, "version": 4}
        (tmp / INDEX_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IndexStats(n_docs, n_tokens, t1 - t0, t2 - t1)


def read_index_info(index_dir: Path) -> dict:
    """The index's description, after checking every file the engine will open is there."""
    index_dir = Path(index_dir)
    check_index_path(index_dir)
    info_path = index_dir / INDEX_INFO
    if not info_path.exists():
        raise IndexBuildError(f"{index_dir} is not an index written by consort ({INDEX_INFO} is missing); "
                          "run the build_index stage")
    missing = [f"{name}.{SHARD}" for name in INDEX_FILES if not (index_dir / f"{name}.{SHARD}").exists()]
    if missing or not (index_dir / BOW_IDS).exists():
        raise IndexBuildError(f"index {index_dir} is incomplete (missing {', '.join(missing) or BOW_IDS}); rebuild it")
    return json.loads(info_path.read_text())


def open_engine(index_dir: Path):
    """An InfiniGramEngine over a checked index (version 4, the dtype the index was written with)."""
    from infini_gram.engine import InfiniGramEngine

    info = read_index_info(index_dir)
    return InfiniGramEngine(index_dir=str(Path(index_dir).resolve()), eos_token_id=info["eos_token_id"],
                            vocab_size=info["vocab_size"], version=4, token_dtype=info["token_dtype"],
                            bow_ids_path=str(Path(index_dir).resolve() / BOW_IDS), precompute_unigram_logprobs=True)
