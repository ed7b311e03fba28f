"""llama.cpp control-vector GGUF files: ``direction.{i}`` float32 tensors, ``controlvector.*`` metadata.

Layer *i* is the output of block *i*, steerkit's numbering; llama.cpp cannot steer block 0 (its loader refuses a
``direction.0``).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from steerkit._io import atomic_path


def write(
    path: str | os.PathLike,
    directions: Mapping[int, torch.Tensor],
    model_hint: str,
    force: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``directions`` (layers >= 1) as a control-vector GGUF, atomically."""
    import gguf

    with atomic_path(path, force=force, inputs=inputs) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", model_hint)
        writer.add_uint32("controlvector.layer_count", len(directions))
        for layer, v in directions.items():
            writer.add_tensor(f"direction.{layer}", v.numpy().astype("float32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # GGUF type


class _Walk:
    """A cursor over a GGUF file's bytes that refuses to read past the end, naming what it was reading."""

    def __init__(self, path, blob: bytes):
        self.path, self.blob, self.at = path, blob, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.at + n > len(self.blob):
            raise ValueError(f"{self.path}: {what} needs {n} bytes at offset {self.at}, past the file's end "
                             f"({len(self.blob)} bytes)")  # fmt: skip
        self.at += n
        return self.blob[self.at - n : self.at]

    def number(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        return self.take(self.number("Q", what), what).decode("utf-8", errors="replace")

    def value(self, kind: int, what: str) -> None:
        """Step over one metadata value of GGUF type ``kind`` (arrays: their declared bytes checked first)."""
        if kind in _SCALARS:
            self.take(struct.calcsize(_SCALARS[kind]), what)
        elif kind == 8:
            self.string(what)
        elif kind == 9:
            inner, count = self.number("I", what), self.number("Q", what)
            if inner in _SCALARS:
                self.take(count * struct.calcsize(_SCALARS[inner]), what)
            else:
                for _ in range(count):
                    self.value(inner, what)
        else:
            raise ValueError(f"{self.path}: {what} has an unknown value type {kind}")


def check_layout(path: str | os.PathLike) -> None:
    """Walk a GGUF file's header, metadata and tensor table with every declared count and size compared with the
    bytes the file has, before a reader sizes anything from them; ValueError naming the first that does not fit."""
    import gguf

    with open(path, "rb") as f:
        walk = _Walk(path, f.read())
    if walk.take(4, "the magic") != b"GGUF":
        raise ValueError(f"{path}: no GGUF magic at the start")
    version, n_tensors = walk.number("I", "the version"), walk.number("Q", "the tensor count")
    n_kv = walk.number("Q", "the key count")
    if version not in (2, 3) or n_tensors > len(walk.blob) // 24 or n_kv > len(walk.blob) // 13:
        raise ValueError(f"{path}: version {version}, {n_tensors} tensors, {n_kv} keys: more than the file can hold")
    alignment = 32
    for i in range(n_kv):
        key = walk.string(f"key {i}")
        kind, start = walk.number("I", f"the type of {key!r}"), walk.at
        walk.value(kind, f"value of {key!r}")
        if key == "general.alignment" and kind == 4:
            alignment = struct.unpack("<I", walk.blob[start : start + 4])[0] or 32
    tensors = []
    for _ in range(n_tensors):
        name = walk.string("a tensor's name")
        dims = [walk.number("Q", f"{name}'s shape") for _ in range(walk.number("I", f"{name}'s rank"))]
        kind, offset = walk.number("I", f"{name}'s type"), walk.number("Q", f"{name}'s offset")
        if not 1 <= len(dims) <= 4 or min(dims) < 1 or kind not in gguf.GGML_QUANT_SIZES:
            raise ValueError(f"{path}: tensor {name!r} has shape {dims} and type {kind}: not a GGUF tensor")
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        tensors.append((name, offset, math.prod(dims) // block * size))
    data = (walk.at + alignment - 1) // alignment * alignment
    for name, offset, nbytes in tensors:
        if data + offset + nbytes > len(walk.blob):
            raise ValueError(f"{path}: tensor {name!r} declares {nbytes} bytes at offset {offset}, past the file's end")


def read(path: str | os.PathLike) -> tuple[dict[int, torch.Tensor], dict]:
    """``({layer: direction}, metadata)`` from a llama.cpp / repeng control-vector GGUF; ValueError if it is not."""
    import gguf

    try:
        check_layout(path)
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, struct.error) as err:
        detail = str(err).removeprefix(f"{path}: ")
        raise ValueError(f"{path} is not a readable GGUF file: {detail}") from None
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if arch != "controlvector":
        raise ValueError(f"{path} is a GGUF of architecture {arch!r}, not a control vector ('controlvector')")
    directions = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise ValueError(f"{path}: tensor {tensor.name!r} is not named 'direction.{{i}}' with a block index i")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ValueError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, expected F32")
        if len([d for d in tensor.shape if d != 1]) > 1:
            raise ValueError(f"{path}: tensor {tensor.name} has shape {list(tensor.shape)}, expected 1-D")
        directions[int(index)] = torch.tensor(tensor.data.copy()).flatten()
    if not directions:
        raise ValueError(f"{path} is a control-vector GGUF with no direction.{{i}} tensors")
    count = reader.fields.get("controlvector.layer_count")
    if count is not None and int(count.contents()) != len(directions):
        raise ValueError(
            f"{path}: controlvector.layer_count is {int(count.contents())} but the file holds "
            f"{len(directions)} direction tensors"
        )
    hint = reader.fields.get("controlvector.model_hint")
    return directions, {"method": "gguf", "model_hint": hint.contents() if hint is not None else None}
