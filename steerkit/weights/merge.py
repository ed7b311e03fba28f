"""Merge task vectors into a checkpoint, and bake a steering vector into weights; one tensor at a time.

Both write a plain Hugging Face checkpoint (``transformers`` loads it without steerkit): every tensor of
the base, in the base's dtype, computed in float32, validated before a byte is written and checked for
NaN/inf after each tensor, into a temporary directory renamed only when complete.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steerkit import arch
from steerkit._checks import finite
from steerkit.vector import SteeringVector
from steerkit.weights.checkpoint import CheckpointWriter
from steerkit.weights.taskvec import TaskVector, _Deltas, _reader, layer_of

METHODS = ("task_arithmetic", "ties", "dare")


def _shape(deltas: Mapping, name: str) -> tuple[int, ...]:
    """A delta's shape, from file headers where the deltas are lazy."""
    return deltas.shape(name) if callable(getattr(deltas, "shape", None)) else tuple(deltas[name].shape)


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES' trim step)."""
    k = int(round(delta.numel() * (1 - density)))
    if k <= 0:
        return delta
    threshold = delta.abs().flatten().kthvalue(k).values
    return torch.where(delta.abs() > threshold, delta, torch.zeros_like(delta))


CHUNK = 1 << 22  # elements per float32 temporary (16 MB): memory follows this, not the largest tensor


def _row_slices(shape: torch.Size):
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, CHUNK // max(per_row, 1))
    rows = shape[0] if len(shape) else 1
    for start in range(0, rows, step):
        yield slice(start, start + step) if len(shape) else slice(None)


def _source(deltas: Mapping, name: str):
    """A function ``rows -> float32 delta rows``; lazy deltas read A and B once, in their stored dtype."""
    if isinstance(deltas, _Deltas):
        ta, tb = deltas.raw(name)
        return lambda rows: ta[rows].float() - tb[rows].float()
    delta = deltas[name]
    return lambda rows: delta[rows].float()


def combine(base: torch.Tensor, parts: list, method: str, density: float, generator=None) -> torch.Tensor:
    """``base`` plus weighted deltas, in ``base``'s dtype: task arithmetic, TIES (trim, elect sign, disjoint
    mean) or DARE (drop with probability 1 − density, rescale). ``parts``: ``(rows -> float32 delta, α)``.
    Task arithmetic and DARE run over row chunks, so float32 temporaries stay small for any tensor."""
    if method == "ties":
        weighted = torch.stack([alpha * _trim(source(slice(None)), density) for source, alpha in parts])
        sign = torch.sign(weighted.sum(0))
        agree = (torch.sign(weighted) == sign) & (weighted != 0)
        merged = (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)
        return (base.float() + merged).to(base.dtype)
    out = torch.empty_like(base)
    for rows in _row_slices(base.shape):
        acc = base[rows].float()
        for source, alpha in parts:
            delta = source(rows)
            if method == "dare":
                delta = delta * (torch.rand(delta.shape, generator=generator) < density) / density
            acc += alpha * delta
        out[rows] = acc.to(base.dtype)
    return out


def _steerkit_version() -> str:
    import steerkit

    return steerkit.__version__


def _card(title: str, lines: list[str]) -> str:
    stamp = datetime.date.today().isoformat()
    body = "\n".join(f"- {line}" for line in lines)
    return f"# {title}\n\nWritten by steerkit {_steerkit_version()} on {stamp}.\n\n{body}\n"


def merge(
    base: str | os.PathLike,
    vectors: Sequence[tuple[TaskVector | str | os.PathLike, float]],
    out: str | os.PathLike,
    method: str = "task_arithmetic",
    alpha_by_layer: Mapping[int, float] | None = None,
    density: float = 0.5,
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write ``base + Σ α_i·v_i`` (or TIES / DARE) as a checkpoint in ``out``.

    ``vectors``: ``(TaskVector or task-vector directory, α)`` pairs. ``alpha_by_layer`` multiplies every α
    for the tensors of a layer (``{0: 0.5, ...}``; unlisted layers and non-layer tensors keep α). ``density``
    is the kept fraction for TIES and DARE. Tensors no vector touches are copied bit for bit.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    if not 0 < density <= 1:
        raise ValueError(f"density={density!r}: expected a fraction in (0, 1]")
    if not vectors:
        raise ValueError("no vectors to merge")
    reader = _reader(base)
    config = reader.config()
    loaded = []
    for vec, alpha in vectors:
        tv = vec if isinstance(vec, TaskVector) else TaskVector.load(vec)
        loaded.append((tv, finite(alpha)))
    scales = {int(k): finite(v, f"alpha_by_layer[{k}]") for k, v in (alpha_by_layer or {}).items()}
    # Validate everything before a byte is written.
    for tv, _ in loaded:
        source = tv.metadata.get("a") or "a task vector"
        vec_type, base_type = tv.metadata.get("model_type"), config.get("model_type")
        if vec_type and base_type and vec_type != base_type:
            raise ValueError(f"{source}: a {vec_type} task vector cannot merge into a {base_type} model")
        for name in tv.deltas:
            if name not in reader:
                raise ValueError(f"{source}: tensor {name!r} is missing from the base {reader.path}")
            if _shape(tv.deltas, name) != reader.shape(name):
                raise ValueError(
                    f"{source}: {name} has shape {_shape(tv.deltas, name)} but the base has {reader.shape(name)} "
                    "(a vector computed from another base?)"
                )
    generator = torch.Generator().manual_seed(seed)
    with CheckpointWriter(out, max_shard_size=max_shard_size, source=reader.path, force=force) as writer:
        for name in tqdm(reader, desc="merge", disable=(not progress) if progress is not None else None):
            tensor = reader[name]
            scale = scales.get(layer_of(name), 1.0)
            parts = [(tv.deltas, alpha * scale) for tv, alpha in loaded if name in tv.deltas and alpha * scale != 0]
            if not parts or not tensor.is_floating_point():
                writer.add(name, tensor)
                continue
            merged = combine(tensor, [(_source(d, name), a) for d, a in parts], method, density, generator)
            if not torch.isfinite(merged).all():
                raise ValueError(f"{name}: NaN or inf after merging; nothing was written")
            writer.add(name, merged)
        lines = [
            f"base: `{base}`",
            f"method: {method}" + (f" (density {density})" if method != "task_arithmetic" else ""),
        ]
        for tv, alpha in loaded:
            lines.append(f"added α = {alpha:g} × (`{tv.metadata.get('a')}` − `{tv.metadata.get('b')}`)")
        if scales:
            lines.append(f"per-layer α multipliers: {scales}")
        writer.add_file("README.md", _card("Merged checkpoint", lines))
    return Path(out)


def bake(
    base: str | os.PathLike,
    vector: SteeringVector,
    alpha: float,
    out: str | os.PathLike,
    layers: Sequence[int] | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
) -> Path:
    """Write a checkpoint whose plain forward equals hook steering ``h += α·v`` at every position.

    The vector becomes the bias of each steered block's last residual-writing projection (the MLP output):
    Llama-family models through ``mlp_bias`` (zero gate/up/down biases elsewhere), GPT-2 and GPT-NeoX
    through the biases they already have. Architectures that cannot carry it raise an error.
    """
    alpha = finite(alpha)
    reader = _reader(base)
    config = reader.config()
    model_type = config.get("model_type")
    spec = arch.ARCHS.get(model_type)
    llama_like = spec is not None and spec.mlp_out == "mlp.down_proj" and not spec.norm_after_writers
    if llama_like:
        from transformers import AutoConfig

        llama_like = hasattr(AutoConfig.for_model(model_type), "mlp_bias")
    if spec is None or spec.norm_after_writers or (spec.mlp_out == "mlp.down_proj" and not llama_like):
        raise ValueError(
            f"cannot bake a steering vector into a {model_type!r} checkpoint: its MLP output projection has no "
            "bias (or a norm follows it). Export a llama.cpp control vector (vec.to_gguf / steerkit export-gguf) "
            "or steer with hooks (steerkit.steer) instead"
        )
    hidden = config.get("hidden_size") or config.get("n_embd")
    n_layers = config.get("num_hidden_layers") or config.get("n_layer")
    vector.check_model(hidden, n_layers)
    chosen = vector.layers if layers is None else list(layers)
    missing = [layer for layer in chosen if layer not in vector]
    if missing:
        raise ValueError(f"layers {missing} are not in the vector (it has {vector.layers})")
    prefix = spec.blocks
    if f"{prefix}.0.{spec.mlp_out}.weight" not in reader:
        raise ValueError(
            f"{reader.path} has no tensor {prefix}.0.{spec.mlp_out}.weight: not a {model_type} checkpoint?"
        )
    dtype = reader[f"{prefix}.0.{spec.mlp_out}.weight"].dtype
    steer = {f"{prefix}.{i}.{spec.mlp_out}.bias": alpha * vector[i] for i in chosen}
    new_biases = {}
    if llama_like and not config.get("mlp_bias"):
        inter = config["intermediate_size"]
        for i in range(n_layers):
            for proj, width in (("gate_proj", inter), ("up_proj", inter), ("down_proj", hidden)):
                new_biases[f"{prefix}.{i}.mlp.{proj}.bias"] = torch.zeros(width, dtype=dtype)
    record = {"layers": chosen, "alpha": alpha, "method": vector.metadata.get("method"), "norms": vector.norms()}
    updates = {"steerkit_bake": record}
    if llama_like:
        updates["mlp_bias"] = True
    with CheckpointWriter(
        out, max_shard_size=max_shard_size, source=reader.path, force=force, config_updates=updates
    ) as writer:
        for name in reader:
            tensor = reader[name]
            if name in steer:
                tensor = (tensor.float() + steer.pop(name)).to(tensor.dtype)
            writer.add(name, tensor)
        for name, tensor in new_biases.items():
            if name in steer:
                tensor = (tensor.float() + steer.pop(name)).to(dtype)
            writer.add(name, tensor)
        if steer:
            raise ValueError(f"the checkpoint has no bias tensor {next(iter(steer))!r} to carry the vector")
        lines = [
            f"base: `{base}`",
            f"steering vector ({record['method']}) baked at layers {chosen}, α = {alpha:g}",
            "the vector is the bias of each steered block's MLP output projection",
        ]
        writer.add_file("README.md", _card("Steered checkpoint", lines))
    return Path(out)
