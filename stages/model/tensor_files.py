"""Checkpoints tensor by tensor: read a model folder's safetensors lazily, write one in shards.

A merge of a 7B anchor with 7 experts is hundreds of GB; holding the anchor, every package and the
result at once (as building the model does) needs three times that. Reading a tensor when it is
needed and writing shards as they fill keeps one shard and one layer in memory. The layout written
is the Hugging Face one (`model.safetensors`, or `model-0000k-of-0000n.safetensors` shards and
`model.safetensors.index.json`), which `from_pretrained` and serving tools load.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3  # as large as a shard in memory may be


def stored_experts(prefix: str, gate_up: torch.Tensor, down: torch.Tensor, per_expert: bool):
    """(name, tensor) pairs of one layer's experts as a checkpoint stores them: one FFN per expert
    (`<prefix>experts.<k>.gate_proj.weight`, the Hugging Face layout of FlexOlmo and Qwen2Moe), or
    the packed (experts, ...) tensors a model holds in memory (a class without that conversion)."""
    if not per_expert:
        yield prefix + "experts.gate_up_proj", gate_up
        yield prefix + "experts.down_proj", down
        return
    inter = gate_up.shape[1] // 2  # packed gate rows first, then up rows
    for k in range(gate_up.shape[0]):
        yield f"{prefix}experts.{k}.gate_proj.weight", gate_up[k, :inter].clone()
        yield f"{prefix}experts.{k}.up_proj.weight", gate_up[k, inter:].clone()
        yield f"{prefix}experts.{k}.down_proj.weight", down[k].clone()


class TensorFiles(contextlib.ExitStack):
    """The tensors of a model folder (one safetensors file or shards with their index), or of one
    .safetensors file, read on demand."""

    def __init__(self, where: Path) -> None:
        super().__init__()
        where = Path(where)
        index = where / INDEX_FILE
        if index.exists():
            self.where = {name: where / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            file = where if where.suffix == ".safetensors" else where / SINGLE_FILE
            if not file.exists():
                raise FileNotFoundError(f"{where}: neither {SINGLE_FILE} nor {INDEX_FILE}; is it a saved model?")
            with safe_open(file, framework="pt") as f:
                self.where = dict.fromkeys(f.keys(), file)
        self._open: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def _file(self, name: str):
        path = self.where[name]
        if path not in self._open:
            self._open[path] = self.enter_context(safe_open(path, framework="pt"))
        return self._open[path]


class ShardWriter:
    """Writes tensors into `folder` as they come, a shard whenever `shard_bytes` would be exceeded;
    `close()` names the shards and writes the index (one shard: plain `model.safetensors`)."""

    def __init__(self, folder: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.folder, self.shard_bytes = Path(folder), shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, self.folder / f".shard-{len(self.shards)}.safetensors", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / ".shard-0.safetensors").rename(self.folder / SINGLE_FILE)
            return
        weight_map = {}
        for k, names in enumerate(self.shards):
            file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f".shard-{k}.safetensors").rename(self.folder / file)
            weight_map |= dict.fromkeys(names, file)
        (self.folder / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
