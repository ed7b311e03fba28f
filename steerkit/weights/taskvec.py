"""Task vectors: θ_A − θ_B between two checkpoints of one base, tensor by tensor in float32.

On disk a task vector is a safetensors checkpoint of deltas under the model's own tensor names, with
``config.json`` of B and metadata naming both sources and their content hashes.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from steerkit.weights.checkpoint import CheckpointReader, CheckpointWriter

_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The block index in a tensor name (``model.layers.12.mlp...`` -> 12), or None for embeddings etc."""
    match = _LAYER.search(f".{name}")
    return int(match.group(1)) if match else None


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _reader(source) -> CheckpointReader:
    if isinstance(source, CheckpointReader):
        return source
    from steerkit.models import EMBEDDED, embedded_checkpoint

    return CheckpointReader(embedded_checkpoint(source) if str(source) in EMBEDDED else source)


class TaskVector:
    """Per-tensor deltas (float32) plus metadata; backed by a dict or, when loaded, lazily by the files."""

    def __init__(self, deltas: Mapping[str, torch.Tensor], metadata: dict | None = None, config: dict | None = None):
        self.deltas = deltas
        self.metadata = dict(metadata or {})
        self.config = dict(config or {})

    @classmethod
    def between(
        cls,
        a: str | os.PathLike,
        b: str | os.PathLike,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        common_rows: bool = False,
    ) -> TaskVector:
        """θ_A − θ_B for every tensor both checkpoints hold (``include``/``exclude``: glob patterns on names).

        Differently shaped tensors are an error unless excluded, or ``common_rows=True`` asks for the delta
        over the leading rows both have (e.g. a vocabulary grown by added tokens).
        """
        ra, rb = _reader(a), _reader(b)
        names = [n for n in rb if (include is None or _matches(n, include)) and not _matches(n, exclude)]
        only_b = [n for n in names if n not in ra]
        only_a = [n for n in ra if n not in rb and (include is None or _matches(n, include))]
        if only_a or only_b:
            missing = (only_b or only_a)[0]
            raise ValueError(
                f"the checkpoints hold different tensors ({len(only_b)} only in B, {len(only_a)} only in A, "
                f"e.g. {missing!r}); are they from one base? Use exclude= to leave tensors out"
            )
        deltas, stats = {}, {}
        for name in names:
            ta, tb = ra[name].float(), rb[name].float()
            if ta.shape != tb.shape:
                if not common_rows or ta.shape[1:] != tb.shape[1:]:
                    raise ValueError(
                        f"{name}: shape {tuple(ta.shape)} in A vs {tuple(tb.shape)} in B; exclude it, or pass "
                        "common_rows=True (--common-rows) for the delta over the rows both have"
                    )
                rows = min(ta.shape[0], tb.shape[0])
                ta, tb = ta[:rows], tb[:rows]
            delta = ta - tb
            deltas[name] = delta
            base_norm = float(tb.norm())
            stats[name] = {"norm": float(delta.norm()), "relative": float(delta.norm()) / max(base_norm, 1e-12)}
        if not deltas:
            raise ValueError("no tensors selected: check include=/exclude=")
        meta = {
            "a": str(a),
            "b": str(b),
            "a_hash": ra.content_hash(),
            "b_hash": rb.content_hash(),
            "model_type": rb.config().get("model_type"),
            "stats": stats,
        }
        return cls(deltas, meta, rb.config())

    def stats(self) -> dict:
        """``{"tensors": {name: {norm, relative}}, "layers": {layer: {norm, relative}}}`` (layer None: others)."""
        per_tensor = self.metadata.get("stats") or {
            name: {"norm": float(d.float().norm()), "relative": float("nan")} for name, d in self.deltas.items()
        }
        squares, base_squares = defaultdict(float), defaultdict(float)
        for name, s in per_tensor.items():
            layer = layer_of(name)
            squares[layer] += s["norm"] ** 2
            if s["relative"] > 0:
                base_squares[layer] += (s["norm"] / s["relative"]) ** 2
        layers = {
            layer: {"norm": sq**0.5, "relative": (sq / base_squares[layer]) ** 0.5 if base_squares[layer] else 0.0}
            for layer, sq in squares.items()
        }
        return {"tensors": per_tensor, "layers": layers}

    def save(self, out: str | os.PathLike, force: bool = False, max_shard_size: int | str = "5GB") -> Path:
        """Write the deltas as a checkpoint directory with the metadata in ``task_vector.json``."""
        with CheckpointWriter(out, max_shard_size=max_shard_size, force=force) as writer:
            for name, delta in self.deltas.items():
                writer.add(name, delta.float())
            writer.add_file("task_vector.json", json.dumps(self.metadata, indent=1) + "\n")
            if self.config:
                writer.add_file("config.json", json.dumps(self.config, indent=2) + "\n")
        return Path(out)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskVector:
        """A task vector directory, read lazily tensor by tensor."""
        path = Path(path)
        meta_file = path / "task_vector.json"
        if not meta_file.is_file():
            raise ValueError(f"{path} is not a task vector (no task_vector.json); write one with TaskVector.save")
        reader = CheckpointReader(path)
        return cls(reader, json.loads(meta_file.read_text()), reader.config())
