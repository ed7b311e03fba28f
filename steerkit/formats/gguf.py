"""llama.cpp control-vector GGUF files: ``direction.{i}`` float32 tensors, ``controlvector.*`` metadata.

Layer *i* is the output of block *i*, steerkit's numbering; llama.cpp cannot steer block 0 (its loader refuses a
``direction.0``).
"""

from __future__ import annotations

import os
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


def read(path: str | os.PathLike) -> tuple[dict[int, torch.Tensor], dict]:
    """``({layer: direction}, metadata)`` from a llama.cpp / repeng control-vector GGUF; ValueError if it is not."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as err:
        raise ValueError(f"{path} is not a readable GGUF file: {err}") from None
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
