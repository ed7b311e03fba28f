"""Merge task vectors into a checkpoint, and bake a steering vector into weights; one tensor at a time.

Both write a plain Hugging Face checkpoint (``transformers`` loads it without steerkit): every tensor of
the base, in the base's dtype, computed in float32, validated before a byte is written and checked for
NaN/inf after each tensor, into a temporary directory renamed only when complete.
"""

from __future__ import annotations

import datetime
import importlib.metadata
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
from steerkit.weights.taskvec import TaskVector, _Deltas, _reader, delta_shape, layer_of, sources

METHODS = ("task_arithmetic", "ties", "dare")
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


def magnitude_kth(source, shape: torch.Size, k: int) -> float:
    """The ``k``-th smallest |delta| (1-based), exactly, reading the delta in row chunks.

    A radix select on float32 bit patterns, which order like the values for non-negative floats: count the
    top 16 bits over every chunk, then the low 15 bits inside the bucket holding the k-th value.
    """
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for rows in _row_slices(shape):
        bits = source(rows).abs().reshape(-1).view(torch.int32)
        high += torch.bincount(bits >> 15, minlength=1 << 16)
    cumulative = high.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))
    below = int(cumulative[bucket - 1]) if bucket else 0
    low = torch.zeros(1 << 15, dtype=torch.int64)
    for rows in _row_slices(shape):
        bits = source(rows).abs().reshape(-1).view(torch.int32)
        low += torch.bincount(bits[(bits >> 15) == bucket] & 0x7FFF, minlength=1 << 15)
    rest = int(torch.searchsorted(low.cumsum(0), k - below))
    return torch.tensor([(bucket << 15) | rest], dtype=torch.int32).view(torch.float32).item()


def combine(base: torch.Tensor, parts: list, method: str, density: float, generator=None) -> torch.Tensor:
    """``base`` plus weighted deltas, in ``base``'s dtype: task arithmetic, TIES (trim to the ``density``
    largest magnitudes, elect the sign, disjoint mean) or DARE (drop with probability 1 − density, rescale).
    ``parts``: ``(rows -> float32 delta, α)``. Every method runs over row chunks, so float32 temporaries stay
    small for any tensor (TIES finds each delta's trim threshold exactly in two chunked passes first)."""
    cuts = []
    if method == "ties":
        k = int(round(base.numel() * (1 - density)))
        cuts = [magnitude_kth(source, base.shape, k) if k > 0 else -1.0 for source, _ in parts]
    out = torch.empty_like(base)
    for rows in _row_slices(base.shape):
        acc = base[rows].float()
        if method == "ties":
            weighted = torch.stack(
                [
                    alpha * torch.where(d.abs() > cut, d, 0.0)
                    for (d, alpha), cut in zip(_chunks(parts, rows), cuts, strict=True)
                ]
            )
            sign = torch.sign(weighted.sum(0))
            agree = (torch.sign(weighted) == sign) & (weighted != 0)
            acc += (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)
        else:
            for delta, alpha in _chunks(parts, rows):
                if method == "dare":
                    delta = delta * (torch.rand(delta.shape, generator=generator) < density) / density
                acc += alpha * delta
        out[rows] = acc.to(base.dtype)
    return out


def _chunks(parts: list, rows) -> list[tuple[torch.Tensor, float]]:
    return [(source(rows), alpha) for source, alpha in parts]


def _steerkit_version() -> str:
    try:
        return importlib.metadata.version("steerkit")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _card(title: str, lines: list[str]) -> str:
    stamp = datetime.date.today().isoformat()
    body = "\n".join(f"- {line}" for line in lines)
    return f"# {title}\n\nWritten by steerkit {_steerkit_version()} on {stamp}.\n\n{body}\n"


def merge(
    base: str | os.PathLike,
    vectors: Sequence[tuple[TaskVector | str | os.PathLike, float]],
    out: str | os.PathLike,
    method: str = "task_arithmetic",
    alpha_by_layer: Mapping[int, float] | str | None = None,
    density: float = 0.5,
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write ``base + Σ α_i·v_i`` (or TIES / DARE) as a checkpoint in ``out``.

    ``vectors``: ``(TaskVector or task-vector directory, α)`` pairs. ``alpha_by_layer`` multiplies every α
    for the tensors of a layer (``{0: 0.5, ...}`` or ``"0-9:0.5,10:1.5"``; unlisted layers and non-layer
    tensors keep α). ``density`` is the kept fraction for TIES and DARE. Tensors no vector touches are copied
    bit for bit. Every merged tensor must be finite in the base's dtype; ``out`` may not be an input.
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
    scales = _layer_scales(alpha_by_layer, arch.config_depth(config) or 1 + max((layer_of(n) or 0) for n in reader))
    # Validate everything before a byte is written.
    for tv, _ in loaded:
        source = tv.metadata.get("a") or "a task vector"
        vec_type, base_type = tv.metadata.get("model_type"), config.get("model_type")
        if vec_type and base_type and vec_type != base_type:
            raise ValueError(f"{source}: a {vec_type} task vector cannot merge into a {base_type} model")
        for name in tv.deltas:
            if name not in reader:
                raise ValueError(f"{source}: tensor {name!r} is missing from the base {reader.path}")
            if delta_shape(tv.deltas, name) != reader.shape(name):
                raise ValueError(
                    f"{source}: {name} has shape {delta_shape(tv.deltas, name)} but the base has {reader.shape(name)} "
                    "(a vector computed from another base?)"
                )
    generator = torch.Generator().manual_seed(seed)
    inputs = [path for tv, _ in loaded for path in sources(tv.deltas)]
    specs = {name: reader.spec(name) for name in reader}
    writer = CheckpointWriter(out, specs, max_shard_size, source=reader.path, force=force, inputs=inputs)
    with writer:
        for name in tqdm(reader, desc="merge", disable=(not progress) if progress is not None else None):
            tensor = reader[name]
            scale = scales.get(layer_of(name), 1.0)
            parts = [(tv.deltas, alpha * scale) for tv, alpha in loaded if name in tv.deltas and alpha * scale != 0]
            if not parts or not tensor.is_floating_point():
                writer.add(name, tensor)
                continue
            merged = combine(tensor, [(_source(d, name), a) for d, a in parts], method, density, generator)
            if not torch.isfinite(merged).all():
                alphas = ", ".join(f"{a:g}" for _, a in parts)
                raise ValueError(
                    f"{name}: NaN or inf after merging into {reader.path} (α {alphas}, {tensor.dtype}); "
                    "nothing was written"
                )
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


def _layer_scales(alpha_by_layer, n_layers: int) -> dict[int, float]:
    """Per-layer α multipliers from a dict or a ``"0-9:0.5"`` spec, every layer inside the model."""
    if alpha_by_layer is None:
        return {}
    if isinstance(alpha_by_layer, str):
        return arch.parse_layer_values(alpha_by_layer, n_layers)
    return {arch.validate_layer(k, n_layers): finite(v, f"alpha_by_layer[{k}]") for k, v in alpha_by_layer.items()}


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
    n_layers = arch.config_depth(config)
    vector.check_model(hidden, n_layers)
    chosen = vector.layers if layers is None else arch.layer_list(layers, n_layers)
    missing = [layer for layer in chosen if layer not in vector]
    if missing:
        raise ValueError(f"layers {missing} are not in the vector (it has {vector.layers})")
    prefix = spec.blocks
    if f"{prefix}.0.{spec.mlp_out}.weight" not in reader:
        raise ValueError(
            f"{reader.path} has no tensor {prefix}.0.{spec.mlp_out}.weight: not a {model_type} checkpoint?"
        )
    dtype = reader.spec(f"{prefix}.0.{spec.mlp_out}.weight")[1]
    new_biases = {}
    if llama_like and not config.get("mlp_bias"):
        inter = config["intermediate_size"]
        for i in range(n_layers):
            for proj, width in (("gate_proj", inter), ("up_proj", inter), ("down_proj", hidden)):
                new_biases[f"{prefix}.{i}.mlp.{proj}.bias"] = torch.zeros(width, dtype=dtype)
    steer = {}
    for i in chosen:  # α·v must be finite in the dtype the bias is stored in
        name = f"{prefix}.{i}.{spec.mlp_out}.bias"
        if name not in reader and name not in new_biases:
            raise ValueError(f"the checkpoint has no bias tensor {name!r} to carry the vector")
        bias = (alpha * vector[i].double()).to(dtype)
        if not bool(torch.isfinite(bias).all()):
            raise ValueError(
                f"alpha={alpha:g} times the layer-{i} direction (norm {float(vector[i].norm()):.4g}) is not finite in "
                f"{str(dtype).removeprefix('torch.')}: use a smaller alpha; nothing was written"
            )
        steer[name] = alpha * vector[i]
    record = {"layers": chosen, "alpha": alpha, "method": vector.metadata.get("method"), "norms": vector.norms()}
    updates = {"steerkit_bake": record}
    if llama_like:
        updates["mlp_bias"] = True
    specs = {name: reader.spec(name) for name in reader}
    specs.update({name: (tuple(t.shape), t.dtype) for name, t in new_biases.items()})
    with CheckpointWriter(
        out, specs, max_shard_size, source=reader.path, force=force, config_updates=updates
    ) as writer:
        for name in specs:
            tensor = reader[name] if name in reader else new_biases[name]
            if name in steer:
                tensor = (tensor.float() + steer[name]).to(tensor.dtype)
                if not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"{name}: the steered bias is not finite in {tensor.dtype}; nothing was written")
            writer.add(name, tensor)
        lines = [
            f"base: `{base}`",
            f"steering vector ({record['method']}) baked at layers {chosen}, α = {alpha:g}",
            "the vector is the bias of each steered block's MLP output projection",
        ]
        writer.add_file("README.md", _card("Steered checkpoint", lines))
    return Path(out)
