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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steerkit import arch
from steerkit._checks import finite
from steerkit._hub import card, name_of
from steerkit.checkpoint import CheckpointWriter
from steerkit.weights.taskvec import TaskVector, _Deltas, _reader, delta_shape, layer_of, sources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One merge method, as mergekit's generalized task arithmetic defines it: how each delta is sparsified
    (``magnitude``: keep the ``density`` largest, ``random``: keep each with probability ``density``), whether
    signs are elected (TIES), and the defaults for dividing by the weights and rescaling to the L1 norm."""

    sparsify: str | None
    consensus: bool
    normalize: bool
    rescale: bool
    about: str


METHODS: dict[str, Method] = {
    "task_arithmetic": Method(None, False, False, False, "θ + Σ αᵢ·δᵢ"),
    "ties": Method("magnitude", True, True, False, "trim to the largest, elect signs, weighted mean"),
    "dare_ties": Method("random", True, False, True, "random drop (L1 rescale), elect signs"),
    "dare_linear": Method("random", False, False, True, "random drop (L1 rescale), weighted sum"),
}
METHODS["dare"] = METHODS["dare_linear"]
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


@dataclass
class Part:
    """One delta entering a tensor's merge: ``rows -> float32 delta rows``, its weight and its density."""

    source: object
    alpha: float
    density: float = 1.0


def _magnitude_mask(cut: float):
    return lambda rows, x: x.abs() > cut


def _random_mask(seed: int, density: float):
    """Keep each entry with probability ``density``; a chunk's draws depend only on ``seed`` and its first row,
    so every pass over the chunks sees the same mask."""

    def mask(rows, x):
        start = rows.start or 0 if isinstance(rows, slice) else 0
        return torch.rand(x.shape, generator=torch.Generator().manual_seed(seed + start)) < density

    return mask


def _sparsifiers(parts: list[Part], shape: torch.Size, method: Method, rescale: bool, generator):
    """Per part, a function ``(rows, delta) -> sparsified delta`` that gives the same answer as sparsifying the
    whole tensor at once: magnitude finds its exact threshold first, random redraws the same masks in every
    pass; ``rescale`` multiplies by the whole delta's L1 norm over the kept entries' (mergekit's rescale)."""
    numel = math.prod(shape) if len(shape) else 1
    out = []
    for part in parts:
        if method.sparsify is None or part.density >= 1:
            out.append(lambda rows, x: x)
            continue
        if method.sparsify == "magnitude":  # keep the int(density · n) largest magnitudes (mergekit's k)
            keep = max(1, int(part.density * numel))
            mask = _magnitude_mask(magnitude_kth(part.source, shape, numel - keep) if keep < numel else -1.0)
        else:
            mask = _random_mask(int(torch.randint(1 << 40, (1,), generator=generator)), part.density)
        factor = 1.0
        if rescale:
            before = after = 0.0
            for rows in _row_slices(shape):
                delta = part.source(rows)
                before += float(delta.abs().sum())
                after += float((delta * mask(rows, delta)).abs().sum())
            if before > 1e-7 and after > 1e-7:
                factor = before / after
        out.append(lambda rows, x, mask=mask, factor=factor: x * mask(rows, x) * factor)
    return out


def combine(
    base: torch.Tensor,
    parts: list[Part],
    method: str = "task_arithmetic",
    generator: torch.Generator | None = None,
    normalize: bool | None = None,
    rescale: bool | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """``base`` plus the merged deltas, in ``base``'s dtype, computed in float32 over row chunks (mergekit's
    generalized task arithmetic): sparsify each delta, weight it by α, elect signs (TIES: the sign of the
    weighted sum, ties to +), sum, divide by the weights (of the agreeing deltas, under TIES) if ``normalize``,
    multiply by ``scale`` (mergekit's ``lambda``)."""
    spec = METHODS[method]
    normalize = spec.normalize if normalize is None else normalize
    rescale = spec.rescale if rescale is None else rescale
    generator = generator or torch.Generator().manual_seed(0)
    sparse = _sparsifiers(parts, base.shape, spec, rescale, generator)
    out = torch.empty_like(base)
    for rows in _row_slices(base.shape):
        weighted = torch.stack([p.alpha * f(rows, p.source(rows)) for p, f in zip(parts, sparse, strict=True)])
        weights = torch.tensor([p.alpha for p in parts]).view(-1, *([1] * (weighted.dim() - 1)))
        if spec.consensus:
            majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
            agree = (torch.sign(weighted) == majority).float()
            mixed = (weighted * agree).sum(0)
            if normalize:
                divisor = (weights * agree).sum(0)
                mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
        else:
            mixed = weighted.sum(0)
            total = float(weights.sum())
            if normalize and abs(total) >= 1e-8:
                mixed = mixed / total
        out[rows] = (base[rows].float() + scale * mixed).to(base.dtype)
    return out


def _depth(reader) -> int:
    return arch.config_depth(reader.checked_config()) or 1 + max((layer_of(n) or 0) for n in reader)


def merge(
    base: str | os.PathLike,
    vectors: Sequence[tuple],
    out: str | os.PathLike,
    method: str = "task_arithmetic",
    alpha_by_layer: Mapping[int, float] | str | None = None,
    density: float = 0.5,
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    progress: bool | None = None,
    normalize: bool | None = None,
    rescale: bool | None = None,
    scale: float = 1.0,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write ``base`` plus the merged task vectors as a checkpoint in ``out`` (the methods in ``METHODS``).

    ``vectors``: ``(TaskVector, task-vector directory or Hub repo, α)`` pairs, or triples with a per-vector
    ``density`` (the kept fraction for TIES and DARE; else ``density``). ``alpha_by_layer`` multiplies every α
    for the tensors of a layer (``{0: 0.5, ...}`` or ``"0-9:0.5,10:1.5"``; unlisted layers and non-layer
    tensors keep α). ``normalize`` (divide by the weights), ``rescale`` (DARE's L1 rescale) and ``scale``
    (mergekit's ``lambda``) default to the method's own. ``dtype``: the written dtype (default the base's).
    Tensors no vector touches are copied bit for bit; every merged tensor must be finite; ``out`` may not be
    an input.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {sorted(METHODS)}")
    from steerkit.models import check_dtype

    dtype = check_dtype(dtype)
    scale = finite(scale, "scale")
    reader = _reader(base)
    loaded = _loaded(vectors, density)
    scales = _layer_scales(alpha_by_layer, _depth(reader))
    _check_fits(loaded, reader)  # everything is validated before a byte is written
    log.info("merging %d task vector(s) into %s (%s)", len(loaded), reader.path.name, method)
    generator = torch.Generator().manual_seed(seed)
    inputs = [path for tv, _, _ in loaded for path in sources(tv.deltas)]
    specs = {name: reader.spec(name) for name in reader}
    if dtype is not None:
        specs = {name: (shape, dtype if kind.is_floating_point else kind) for name, (shape, kind) in specs.items()}
    with CheckpointWriter(out, specs, max_shard_size, source=reader.path, force=force, inputs=inputs) as writer:
        for name in tqdm(reader, desc="merge", disable=(not progress) if progress is not None else None):
            tensor = reader[name]
            factor = scales.get(layer_of(name), 1.0)
            parts = [Part(_source(tv.deltas, name), alpha * factor, share) for tv, alpha, share in loaded
                     if name in tv.deltas and alpha * factor != 0]  # fmt: skip
            if parts and tensor.is_floating_point():
                tensor = combine(tensor, parts, method, generator, normalize, rescale, scale)
                if not torch.isfinite(tensor).all():
                    alphas = ", ".join(f"{p.alpha:g}" for p in parts)
                    raise ValueError(
                        f"{name}: NaN or inf after merging into {reader.path} (α {alphas}, {tensor.dtype}); "
                        "nothing was written"
                    )
            writer.add(name, tensor.to(specs[name][1]))
        writer.add_file("README.md", _card(base, method, loaded, scales))
    return Path(out)


def _loaded(vectors: Sequence[tuple], density: float) -> list[tuple[TaskVector, float, float]]:
    """``(task vector, α, density)`` for each entry of ``merge``'s ``vectors``, loaded and checked."""
    if not vectors:
        raise ValueError("no vectors to merge")
    loaded = []
    for item in vectors:
        if not isinstance(item, tuple | list) or len(item) not in (2, 3):
            raise ValueError(f"vectors entry {item!r}: expected (vector, alpha) or (vector, alpha, density)")
        vec, alpha, share = item[0], item[1], item[2] if len(item) == 3 else density
        if not 0 < share <= 1:
            raise ValueError(f"density={share!r}: expected a fraction in (0, 1]")
        tv = vec if isinstance(vec, TaskVector) else TaskVector.load(vec)
        loaded.append((tv, finite(alpha), float(share)))
    return loaded


def _check_fits(loaded: list, reader) -> None:
    """Every task vector is of the base's model type and its deltas name tensors of the base, shape for shape."""
    base_type = reader.config().get("model_type")
    for tv, _, _ in loaded:
        source = tv.metadata.get("a") or "a task vector"
        vec_type = tv.metadata.get("model_type")
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


def _card(base, method: str, loaded: list, scales: dict) -> str:
    """The merged checkpoint's model card: the base, the method, each vector with its α (and density)."""
    lines = [f"base: `{name_of(base)}`", f"method: {method} ({METHODS[method].about})"]
    for tv, alpha, share in loaded:
        a, b = (name_of(tv.metadata.get(k)) for k in ("a", "b"))
        kept = f", density {share:g}" if METHODS[method].sparsify else ""
        lines.append(f"added α = {alpha:g} × (`{a}` − `{b}`){kept}")
    if scales:
        lines.append(f"per-layer α multipliers: {scales}")
    return card("Merged checkpoint", lines, base_model=base, relation="merge", tags=("merge", method))


def _layer_scales(alpha_by_layer, n_layers: int) -> dict[int, float]:
    """Per-layer α multipliers from a dict or a ``"0-9:0.5"`` spec, every layer inside the model."""
    if alpha_by_layer is None:
        return {}
    if isinstance(alpha_by_layer, str):
        return arch.parse_layer_values(alpha_by_layer, n_layers)
    return {arch.validate_layer(k, n_layers): finite(v, f"alpha_by_layer[{k}]") for k, v in alpha_by_layer.items()}
