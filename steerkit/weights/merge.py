"""Merge task vectors into a checkpoint, one tensor at a time (task arithmetic, TIES, DARE).

The result is a plain Hugging Face checkpoint (``transformers`` loads it without steerkit): every tensor of
the base, in the base's dtype, computed in float32, validated before a byte is written and checked for
NaN/inf after each tensor, into a temporary directory renamed only when complete.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steerkit import arch
from steerkit._checks import finite
from steerkit.hub import card, name_of
from steerkit.weights.checkpoint import CheckpointWriter
from steerkit.weights.taskvec import TaskVector, _Deltas, _reader, delta_shape, layer_of, sources

log = logging.getLogger(__name__)
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
    log.info("merging %d task vector(s) into %s (%s)", len(loaded), reader.path.name, method)
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
            f"base: `{name_of(base)}`",
            f"method: {method}" + (f" (density {density})" if method != "task_arithmetic" else ""),
        ]
        for tv, alpha in loaded:
            a, b = (name_of(tv.metadata.get(k)) for k in ("a", "b"))
            lines.append(f"added α = {alpha:g} × (`{a}` − `{b}`)")
        if scales:
            lines.append(f"per-layer α multipliers: {scales}")
        tags = ("merge", method)
        writer.add_file("README.md", card("Merged checkpoint", lines, base_model=base, relation="merge", tags=tags))
    return Path(out)


def _layer_scales(alpha_by_layer, n_layers: int) -> dict[int, float]:
    """Per-layer α multipliers from a dict or a ``"0-9:0.5"`` spec, every layer inside the model."""
    if alpha_by_layer is None:
        return {}
    if isinstance(alpha_by_layer, str):
        return arch.parse_layer_values(alpha_by_layer, n_layers)
    return {arch.validate_layer(k, n_layers): finite(v, f"alpha_by_layer[{k}]") for k, v in alpha_by_layer.items()}
