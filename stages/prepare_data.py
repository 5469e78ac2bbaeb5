"""Stage: assemble one corpus (the public one or an owner's) into train/val JSON-lines files.

Documents are normalised, packed or cut to about `data.doc_chars`, deduplicated, given a stable
content-derived id and split train/val by document with a fixed seed.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from stages import params as P
from stages.artifacts import CANARIES, TAKEN_DOWN
from stages.data.canaries import plant_canaries
from stages.data.sources import describe, read_records
from stages.io import atomic_dir, text_digest, write_json, write_jsonl
from stages.runtime import start_stage

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\ufeff]")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _cut(text: str, size: int) -> Iterator[str]:
    """Cut a long text at paragraph (else line) boundaries into pieces of at most about `size`."""
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind("\n\n", start + size // 2, end)
        if cut < 0:
            cut = text.rfind("\n", start + size // 2, end)
        if cut < 0:
            cut = end
        yield text[start:cut].strip()
        start = cut
    if text[start:].strip():
        yield text[start:].strip()


def to_documents(records: Iterable[str], doc_chars: int) -> Iterator[str]:
    """Pack short records together and cut long ones, so documents have comparable sizes."""
    pending: list[str] = []
    size = 0
    for record in records:
        record = normalise(record)
        if not record:
            continue
        if len(record) >= doc_chars:
            yield from _cut(record, doc_chars)
            continue
        if size + len(record) > doc_chars and pending:
            yield "\n\n".join(pending)
            pending, size = [], 0
        pending.append(record)
        size += len(record) + 2
    if pending:
        yield "\n\n".join(pending)


def prepare_corpus(corpus: P.CorpusParams, data: P.DataParams, name: str, out_dir: Path, cache_dir: Path) -> dict:
    """Write `out_dir/{train,val}.jsonl` ({"id", "text"} per line) and `out_dir/stats.json`."""
    seen: set[str] = set()
    docs: list[dict] = []
    per_source: dict[str, int] = {}
    skipped: dict[str, list[str]] = {}
    for source in corpus.sources:
        count = 0
        not_text: list[str] = []
        for text in to_documents(read_records(source, cache_dir, not_text), data.doc_chars):
            if len(text) < data.min_doc_chars:
                continue
            digest = text_digest(text)
            if digest in seen:
                continue
            seen.add(digest)
            docs.append({"id": f"{name}-{digest[:16]}", "text": text})
            count += 1
        per_source[describe(source)] = count
        if not_text:
            skipped[describe(source)] = not_text
        if count == 0:
            raise ValueError(f"corpus {name}: source {describe(source)} yielded no document of at least "
                             f"{data.min_doc_chars} characters; check its `files` and `format`")

    rng = random.Random(f"{data.seed}-{name}")
    docs.sort(key=lambda d: d["id"])  # a seeded shuffle of a sorted list is stable across runs
    rng.shuffle(docs)
    kept, chars = [], 0
    for doc in docs:
        if chars >= corpus.max_chars:
            break
        kept.append(doc)
        chars += len(doc["text"])
    n_val = max(1, round(len(kept) * data.val_fraction))
    if len(kept) < 2:
        raise ValueError(f"corpus {name}: only {len(kept)} document(s); need at least 2 to split train/val")
    val, train = kept[:n_val], kept[n_val:]
    # Taken down after the split, so that every other document stays where it was (train or val).
    gone = set(corpus.exclude)
    unknown = sorted(gone - {d["id"] for d in docs})
    if unknown:
        raise ValueError(f"corpus {name}: data.exclude names {len(unknown)} id(s) no document of its sources has, "
                         f"e.g. {unknown[0]!r}; the ids are those in owners/{name}/corpus/*.jsonl (nothing was changed)")
    taken_down = [d for d in kept if d["id"] in gone]
    train, val = [d for d in train if d["id"] not in gone], [d for d in val if d["id"] not in gone]
    canaries = plant_canaries(train, val, corpus.canaries, name) if corpus.canaries else []
    stats = {
        "corpus": name,
        "documents": {"train": len(train), "val": len(val)},
        "chars": {"train": sum(len(d["text"]) for d in train), "val": sum(len(d["text"]) for d in val)},
        "documents_per_source": per_source,
        "documents_available": len(docs),
    }
    if skipped:  # private, like the corpus: file names of the owner's folder
        stats["files_not_text"] = skipped
    if canaries:
        stats["canaries"] = len(canaries)
    if gone:  # what a manifest may say of an erasure request: how many, and a digest of the ids (not the ids)
        stats["takedown"] = {"requested": len(gone), "documents_removed": len(taken_down),
                             "ids_digest": hashlib.sha256("\n".join(sorted(gone)).encode()).hexdigest()}
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "val.jsonl", val)
        write_json(tmp / "stats.json", stats)
        if canaries:  # private, like the corpus: the audit needs them, nobody else may see them
            write_json(tmp / CANARIES, canaries)
        if taken_down:  # private: the owner's proof that the expert no longer knows them
            write_jsonl(tmp / TAKEN_DOWN, taken_down)
    return stats


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("corpus", help="'public' or an owner's name")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=Path("cache"), help="where fetched packages are kept")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    params = P.load(args.params)
    if args.corpus == "public":
        corpus = params.public
    elif args.corpus in params.owners:
        corpus = params.owners[args.corpus].data
    else:
        raise SystemExit(f"unknown corpus {args.corpus!r}: use 'public' or one of {sorted(params.owners)}")
    stats = prepare_corpus(corpus, params.data, args.corpus, args.out, args.cache)
    print(f"prepare {args.corpus}: {stats['documents']['train']} train / {stats['documents']['val']} val documents, "
          f"{stats['chars']['train'] / 1e6:.2f}M train characters")
    for source, names in stats.get("files_not_text", {}).items():
        print(f"prepare {args.corpus}: skipped {len(names)} file(s) of {source} that are not text or of another "
              f"kind: {', '.join(names)}")


if __name__ == "__main__":
    main()
