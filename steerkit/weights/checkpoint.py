"""Hugging Face checkpoint directories, one tensor at a time: a lazy reader and an atomic sharded writer.

The reader never loads a model: it opens the safetensors shards and hands out tensors by name. The writer
fills shards up to a byte limit in a temporary directory, writes ``model.safetensors.index.json`` and the
files a checkpoint needs besides weights (config, tokenizer, chat template, generation config), and renames
the directory into place only when everything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Everything of a checkpoint but its weights: carried over to every checkpoint steerkit writes.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class CheckpointReader(Mapping):
    """Read-only, lazy mapping ``name -> tensor`` over a checkpoint directory (single file or shards)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a checkpoint directory")
        if (self.path / INDEX).is_file():
            try:
                index = json.loads((self.path / INDEX).read_text())
                weight_map = dict(index["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{self.path / INDEX} is not a valid index: {err}") from None
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            raise ValueError(f"{self.path} holds neither {SINGLE} nor {INDEX}: not a safetensors checkpoint")
        if weight_map is None:
            with self._open(SINGLE) as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE)
        for shard in sorted(set(weight_map.values())):
            with self._open(shard) as f:
                names = set(f.keys())
            missing = [n for n, s in weight_map.items() if s == shard and n not in names]
            if missing:
                raise ValueError(f"{self.path / shard} lacks tensors the index lists, e.g. {missing[0]!r}")
        self.weight_map = weight_map

    def _open(self, shard: str):
        """A fresh handle per read: the file is unmapped after it, so memory follows the tensor, not the model."""
        file = self.path / shard
        if not file.is_file():
            raise ValueError(f"shard {shard} listed in {self.path / INDEX} is missing")
        try:
            return safe_open(str(file), "pt")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file} is truncated or not a safetensors file: {err}") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{name!r} is not a tensor of {self.path}")
        try:
            with self._open(self.weight_map[name]) as f:
                return f.get_tensor(name)
        except SafetensorError as err:
            raise ValueError(f"cannot read {name!r} from {self.path / self.weight_map[name]}: {err}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor, read from the header only."""
        with self._open(self.weight_map[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata of the first shard."""
        with self._open(sorted(set(self.weight_map.values()))[0]) as f:
            return dict(f.metadata() or {})

    def config(self) -> dict:
        file = self.path / "config.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    def weight_files(self) -> list[Path]:
        return [self.path / shard for shard in sorted(set(self.weight_map.values()))]

    def content_hash(self) -> str:
        """sha256 over the weight files' bytes (streamed), shortened: identifies the source of a delta."""
        digest = hashlib.sha256()
        for file in self.weight_files():
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"100MB"``, ``"2GB"``, ``"500KiB"``."""
    if isinstance(size, int):
        return size
    text = size.strip().upper().replace("IB", "B")
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"cannot read the size {size!r}: expected bytes or e.g. '100MB', '2GB'") from None


class CheckpointWriter:
    """Write a sharded safetensors checkpoint into ``out``, atomically.

    >>> with CheckpointWriter("out", max_shard_size="2GB", source="base") as w:
    ...     for name in reader: w.add(name, tensor)
    ...     w.add_file("README.md", "...")

    On an exception nothing is left behind; an existing ``out`` is refused unless ``force=True``.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        max_shard_size: int | str = "5GB",
        source: str | os.PathLike | None = None,
        force: bool = False,
        config_updates: dict | None = None,
    ):
        self.out = Path(out)
        if self.out.exists() and not force:
            raise FileExistsError(f"{self.out} already exists; pass force=True (--force) to replace it")
        self.max_bytes = parse_size(max_shard_size)
        self.source = Path(source) if source is not None else None
        self.config_updates = config_updates or {}
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_size = 0
        self._files: dict[str, str] = {}

    def __enter__(self) -> CheckpointWriter:
        self.tmp.mkdir(parents=True)
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; a shard is flushed to disk when the next tensor would overflow it."""
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        number = len(self._shards)
        save_file(self._pending, str(self.tmp / f"shard-{number:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def add_file(self, name: str, text: str) -> None:
        """A text file to write beside the weights (a model card, metadata); it wins over a carried-over one."""
        self._files[name] = text

    def _finish(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.tmp / "shard-00000.tmp", self.tmp / SINGLE)
        else:
            weight_map = {}
            for i, names in enumerate(self._shards):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(self.tmp / f"shard-{i:05d}.tmp", self.tmp / final)
                weight_map.update(dict.fromkeys(names, final))
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if self.source is not None:
            for name in SIDE_FILES:
                if (self.source / name).is_file():
                    shutil.copy2(self.source / name, self.tmp / name)
        for name, text in self._files.items():
            (self.tmp / name).write_text(text)
        if self.config_updates:
            config_file = self.tmp / "config.json"
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
            config.update(self.config_updates)
            config_file.write_text(json.dumps(config, indent=2) + "\n")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
                if self.out.exists():
                    shutil.rmtree(self.out)
                os.replace(self.tmp, self.out)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
