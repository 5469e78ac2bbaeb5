import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import params as P
from stages.data.sources import SourceError
from stages.io import read_jsonl
from stages.prepare_data import prepare_corpus

# doc_chars just above one paragraph: every record becomes its own document
DATA = P.DataParams(seed=0, val_fraction=0.2, doc_chars=200, min_doc_chars=20)


def paragraph(i: int) -> str:
    return f"Document number {i} talks about topic {i % 7}. " * 4


def make_folder(root):
    root.mkdir()
    for i in range(6):
        (root / f"doc{i}.txt").write_text(paragraph(i) + "\r\n\r\n\r\n\r\nend  \n")
    (root / "dup.md").write_text(paragraph(0) + "\r\n\r\n\r\n\r\nend  \n")  # same text as doc0.txt
    (root / "more.jsonl").write_text("\n".join(json.dumps({"body": paragraph(i)}) for i in range(6, 10)) + "\n")
    pq.write_table(pa.table({"body": [paragraph(i) for i in range(10, 14)]}), root / "rows.parquet")
    return root


def test_folder_source_is_normalised_deduplicated_and_split(tmp_path):
    folder = make_folder(tmp_path / "mine")
    corpus = P.CorpusParams(max_chars=10**6, sources=[P.FolderSource(kind="folder", path=str(folder), text_field="body")])
    stats = prepare_corpus(corpus, DATA, "clinic", tmp_path / "out", tmp_path / "cache")
    train = list(read_jsonl(tmp_path / "out" / "train.jsonl"))
    val = list(read_jsonl(tmp_path / "out" / "val.jsonl"))
    docs = train + val
    texts = [d["text"] for d in docs]
    assert len(texts) == len(set(texts)) == 14, "dup.md repeats doc0.txt and must be dropped"
    assert stats["documents"] == {"train": len(train), "val": len(val)} and len(val) >= 1
    assert all("\r" not in t and "\n\n\n" not in t and not t.endswith(" ") for t in texts)
    assert all(d["id"].startswith("clinic-") for d in docs)
    # all 14 distinct paragraphs made it in, whatever file type they came from
    assert all(any(f"Document number {i} " in t for t in texts) for i in range(14))

    again = prepare_corpus(corpus, DATA, "clinic", tmp_path / "out2", tmp_path / "cache")
    assert again == stats
    assert (tmp_path / "out" / "val.jsonl").read_text() == (tmp_path / "out2" / "val.jsonl").read_text()


def test_hf_dataset_source(tmp_path):
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": [paragraph(i) for i in range(8)]})})
    ds.save_to_disk(str(tmp_path / "ds"))
    source = P.HFDatasetSource(kind="hf_dataset", path=str(tmp_path / "ds"), text_field="content", split="train")
    stats = prepare_corpus(P.CorpusParams(max_chars=10**6, sources=[source]), DATA, "lab", tmp_path / "out", tmp_path / "c")
    assert stats["documents"]["train"] + stats["documents"]["val"] >= 2


def test_bad_source_names_itself_and_leaves_no_output(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "x.jsonl").write_text('{"text": "fine"}\nnot json\n')
    corpus = P.CorpusParams(max_chars=10**6, sources=[P.FolderSource(kind="folder", path=str(folder))])
    with pytest.raises(SourceError, match=r"x.jsonl:2: not valid JSON"):
        prepare_corpus(corpus, DATA, "clinic", tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())

    missing = P.CorpusParams(max_chars=10**6, sources=[P.FolderSource(kind="folder", path=str(tmp_path / "nope"))])
    with pytest.raises(SourceError, match="not a folder"):
        prepare_corpus(missing, DATA, "clinic", tmp_path / "out", tmp_path / "cache")


def test_missing_wheel_member_is_reported(tmp_path):
    # a real wheel from the index, a member that does not exist in it
    from conftest import SHARED_CACHE

    source = P.WheelSource(kind="wheel", package="gensim", version="4.4.0", files=["gensim/no/such/file.txt"])
    with pytest.raises(SourceError, match=r"wheel gensim==4.4.0: no member .* matches"):
        prepare_corpus(P.CorpusParams(max_chars=100, sources=[source]), DATA, "x", tmp_path / "o", SHARED_CACHE)


def test_files_that_are_not_text_are_skipped_and_named(tmp_path):
    folder = make_folder(tmp_path / "mine")
    elf = (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 40)
    (folder / "program.md").write_bytes(elf)  # a binary renamed .md
    (folder / "noise.txt").write_bytes(bytes((i * 7919) % 251 + 1 for i in range(20000)))  # random bytes, no NUL
    (folder / "rows.jsonl").write_bytes(b'{"body": "' + bytes(range(128, 256)) * 50 + b'"}\n')  # not UTF-8
    corpus = P.CorpusParams(max_chars=10**6, sources=[P.FolderSource(kind="folder", path=str(folder), text_field="body")])
    stats = prepare_corpus(corpus, DATA, "clinic", tmp_path / "out", tmp_path / "cache")
    texts = [d["text"] for split in ("train", "val") for d in read_jsonl(tmp_path / "out" / f"{split}.jsonl")]
    assert len(texts) == 14 and not any("\ufffd" in t for t in texts)
    assert sorted(next(iter(stats["files_not_text"].values()))) == ["noise.txt", "program.md", "rows.jsonl"]


def test_files_of_other_kinds_are_skipped_and_named(tmp_path, capsys):
    folder = make_folder(tmp_path / "mine")
    (folder / "firmware.bin").write_bytes(bytes(range(256)))
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.rst").write_text("Some notes\n==========\n")
    corpus = P.CorpusParams(max_chars=10**6, sources=[P.FolderSource(kind="folder", path=str(folder), text_field="body")])
    stats = prepare_corpus(corpus, DATA, "clinic", tmp_path / "out", tmp_path / "cache")
    assert sorted(next(iter(stats["files_not_text"].values()))) == ["firmware.bin", "sub/notes.rst"]
    assert "firmware.bin, sub/notes.rst" in capsys.readouterr().err


def test_a_folder_of_only_binary_files_is_refused_by_name(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"\x00\x01\x02" * 1000)
    corpus = P.CorpusParams(max_chars=10**6, sources=[P.FolderSource(kind="folder", path=str(folder))])
    with pytest.raises(SourceError, match=r"none of its 1 file\(s\) is text \(a.txt\)"):
        prepare_corpus(corpus, DATA, "clinic", tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_an_erasure_request_drops_exactly_those_documents_and_keeps_every_other_where_it_was(tmp_path):
    """owners.<o>.data.exclude: the documents leave train and val, every other stays in its split,
    stats say how many and a digest of the ids (never the ids), and the owner keeps the removed ones
    privately for its proof; an id no document has is refused by name, with nothing written."""
    import hashlib

    from stages.artifacts import TAKEN_DOWN

    folder = make_folder(tmp_path / "mine")
    source = P.FolderSource(kind="folder", path=str(folder), text_field="body")
    prepare_corpus(P.CorpusParams(max_chars=10**6, sources=[source]), DATA, "clinic", tmp_path / "before", tmp_path / "c")
    before = {split: list(read_jsonl(tmp_path / "before" / f"{split}.jsonl")) for split in ("train", "val")}
    gone = [before["train"][0]["id"], before["val"][0]["id"]]
    corpus = P.CorpusParams(max_chars=10**6, sources=[source], exclude=gone)
    stats = prepare_corpus(corpus, DATA, "clinic", tmp_path / "after", tmp_path / "c")
    for split, docs in before.items():
        after = list(read_jsonl(tmp_path / "after" / f"{split}.jsonl"))
        assert after == [d for d in docs if d["id"] not in gone]
    assert stats["takedown"] == {"requested": 2, "documents_removed": 2,
                                 "ids_digest": hashlib.sha256("\n".join(sorted(gone)).encode()).hexdigest()}
    assert not any(i in json.dumps(stats) for i in gone)
    assert {d["id"] for d in read_jsonl(tmp_path / "after" / TAKEN_DOWN)} == set(gone)
    typo = P.CorpusParams(max_chars=10**6, sources=[source], exclude=["clinic-0000000000000000"])
    with pytest.raises(ValueError, match="data.exclude.*clinic-0000000000000000"):
        prepare_corpus(typo, DATA, "clinic", tmp_path / "typo", tmp_path / "c")
    assert not (tmp_path / "typo").exists()
