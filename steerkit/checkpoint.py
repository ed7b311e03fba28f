"""Hugging Face checkpoint directories, one tensor at a time: a lazy reader and a streaming, atomic writer.

The reader never loads a model: it opens the safetensors shards and hands out tensors by name; shard and
side-file names from the checkpoint must stay inside its folder. The writer is told every tensor's name,
shape and dtype up front, so it lays out the shards and writes their safetensors headers first; each tensor
then goes straight to its offset on disk when added, and memory follows the largest tensor, not the shard
size. It writes ``model.safetensors.index.json`` and the files a checkpoint needs besides weights (config,
tokenizer, chat template, generation config) into a temporary directory renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from steerkit._io import atomic_path, check_output, confined

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
# safetensors' dtype names
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
Spec = tuple[tuple[int, ...], torch.dtype]
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|embed_in)\.weight$")


def layer_of(name: str) -> int | None:
    """The block index in a tensor name (``model.layers.12.mlp...`` -> 12), or None for embeddings etc."""
    match = _LAYER.search(f".{name}")
    return int(match.group(1)) if match else None


class CheckpointReader(Mapping):
    """Read-only, lazy mapping ``name -> tensor`` over a checkpoint directory (single file or shards)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a checkpoint directory")
        if (self.path / INDEX).is_file():
            try:
                index = json.loads((self.path / INDEX).read_text(encoding="utf-8"))
                weight_map = dict(index["weight_map"])
                if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                    raise TypeError("weight_map must map tensor names to shard file names")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
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
        file = confined(self.path, shard, "shard")
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
        return self.spec(name)[0]

    def spec(self, name: str) -> Spec:
        """(shape, dtype) of a tensor, read from the header only."""
        with self._open(self.weight_map[name]) as f:
            view = f.get_slice(name)
            return tuple(view.get_shape()), DTYPES[view.get_dtype()]

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata of the first shard."""
        with self._open(sorted(set(self.weight_map.values()))[0]) as f:
            return dict(f.metadata() or {})

    def config(self) -> dict:
        file = confined(self.path, "config.json", "config")
        if not file.is_file():
            return {}
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file} is not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{file} is not a JSON object")
        return config

    def checked_config(self) -> dict:
        """``config()``, its sizes compared with the tensors present before anything is sized from them: the
        number of blocks with the highest block index, the width and vocabulary with the embedding's shape. A
        config that declares more than the tensors hold is a ValueError naming the field."""
        config = self.config()
        blocks = {layer_of(name) for name in self} - {None}
        sizes = {"num_hidden_layers": len(blocks) and max(blocks) + 1}
        embedding = next((name for name in self if _EMBEDDING.search(name)), None)
        if embedding is not None and len(self.shape(embedding)) == 2:
            sizes["vocab_size"], sizes["hidden_size"] = self.shape(embedding)
        for field, found in sizes.items():
            aliases = {"num_hidden_layers": ("num_hidden_layers", "n_layer"), "hidden_size": ("hidden_size", "n_embd"),
                       "vocab_size": ("vocab_size",)}[field]  # fmt: skip
            for key in aliases:
                value = config.get(key)
                if value is None or not found:
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value != found:
                    where = "blocks" if field == "num_hidden_layers" else f"{embedding} {list(self.shape(embedding))}"
                    raise ValueError(f"{self.path / 'config.json'}: {key} is {value!r} but the tensors hold {found} "
                                     f"({where})")  # fmt: skip
        return config

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


def shard_layout(specs: Mapping[str, Spec], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards in order, each up to ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _header(names: list[str], specs: Mapping[str, Spec]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A safetensors header (length prefix + JSON, padded to 8 bytes) and each tensor's (start, nbytes) in the file."""
    header: dict = {"__metadata__": {"format": "pt"}}
    spans, offset = {}, 0
    for name in names:
        shape, dtype = specs[name]
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        spans[name] = (offset, nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, {name: (len(prefix) + start, nbytes) for name, (start, nbytes) in spans.items()}


class CheckpointWriter:
    """Write a sharded safetensors checkpoint into ``out``, atomically, streaming each tensor to disk.

    >>> specs = {name: reader.spec(name) for name in reader}
    >>> with CheckpointWriter("out", specs, max_shard_size="2GB", source="base") as w:
    ...     for name in reader: w.add(name, tensor)
    ...     w.add_file("README.md", "...")

    ``specs`` maps every tensor to write to its (shape, dtype), in the order of the shards. Tensors may be
    added in any order; each must match its spec, and all must be added. On an exception nothing is left
    behind; ``out`` follows the output rules of ``steerkit._io`` (``force`` to replace, never an input).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        specs: Mapping[str, Spec],
        max_shard_size: int | str = "5GB",
        source: str | os.PathLike | None = None,
        force: bool = False,
        inputs: Iterable[str | os.PathLike] = (),
    ):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this machine is not")
        self.specs = {name: (tuple(int(d) for d in shape), dtype) for name, (shape, dtype) in specs.items()}
        if not self.specs:
            raise ValueError("a checkpoint needs at least one tensor")
        unknown = [dtype for _, dtype in self.specs.values() if dtype not in DTYPE_NAMES]
        if unknown:
            raise ValueError(f"dtype {unknown[0]} cannot be stored in safetensors")
        self.source = Path(source) if source is not None else None
        self.inputs = [*inputs, *([self.source] if self.source else [])]
        self.out = check_output(out, force=force, inputs=self.inputs, directory=True)
        self.force = force
        self.max_bytes = parse_size(max_shard_size)
        self.shards = shard_layout(self.specs, self.max_bytes)
        self.total_size = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.specs.values())
        self._files: dict[str, str | bytes] = {}
        self._added: set[str] = set()
        self._places: dict[str, tuple[str, int, int]] = {}  # name -> (shard file, offset, nbytes)
        self._stack = contextlib.ExitStack()

    def shard_name(self, index: int) -> str:
        n = len(self.shards)
        return SINGLE if n == 1 else f"model-{index + 1:05d}-of-{n:05d}.safetensors"

    def __enter__(self) -> CheckpointWriter:
        with self._stack:  # on a failure here the temporary directory goes at once
            self.tmp = self._stack.enter_context(
                atomic_path(self.out, force=self.force, inputs=self.inputs, directory=True)
            )
            self.tmp.mkdir()
            for i, names in enumerate(self.shards):
                prefix, places = _header(names, self.specs)
                file = self.shard_name(i)
                with open(self.tmp / file, "wb") as handle:
                    handle.write(prefix)
                    handle.truncate(max([len(prefix)] + [start + nbytes for start, nbytes in places.values()]))
                self._places.update({name: (file, start, nbytes) for name, (start, nbytes) in places.items()})
            self._stack = self._stack.pop_all()
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor at its place in its shard (its shape and dtype must match its spec)."""
        if name not in self.specs:
            raise KeyError(f"{name!r} is not among the tensors this checkpoint was planned with")
        if name in self._added:
            raise ValueError(f"{name!r} was already written")
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        file, start, nbytes = self._places[name]
        if nbytes:
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            with open(self.tmp / file, "r+b") as handle:
                handle.seek(start)
                handle.write(memoryview(data))
        self._added.add(name)

    def add_file(self, name: str, content: str | bytes) -> None:
        """A file to write beside the weights (a model card, metadata); it wins over a carried-over one."""
        self._files[name] = content

    def _finish(self) -> None:
        missing = [name for name in self.specs if name not in self._added]
        if missing:
            raise ValueError(f"{len(missing)} planned tensor(s) were never written, e.g. {missing[0]!r}")
        if len(self.shards) > 1:
            weight_map = {name: self.shard_name(i) for i, names in enumerate(self.shards) for name in names}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if self.source is not None:
            for name in SIDE_FILES:
                file = confined(self.source, name, "side file")
                if file.is_file():
                    shutil.copyfile(file, self.tmp / name)
        for name, content in self._files.items():
            target = confined(self.tmp, name, "file")
            target.write_bytes(content if isinstance(content, bytes) else content.encode())

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                if not self._stack.__exit__(*sys.exc_info()):
                    raise
                return False
        return self._stack.__exit__(exc_type, exc, tb)


def specs_of(tensors: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]) -> dict[str, Spec]:
    """(shape, dtype) of tensors held in memory, for ``CheckpointWriter``."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return {name: (tuple(t.shape), t.dtype) for name, t in items}
