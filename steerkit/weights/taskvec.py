"""Task vectors: θ_A − θ_B between two checkpoints of one base, tensor by tensor in float32.

On disk a task vector is a safetensors checkpoint of deltas under the model's own tensor names, with
``config.json`` of B and metadata naming both sources and their content hashes.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from steerkit._checks import finite
from steerkit.checkpoint import CheckpointReader, CheckpointWriter, layer_of


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _reader(source) -> CheckpointReader:
    """A reader for a checkpoint folder, an embedded model's name, or a Hub repo id (through the Hub cache)."""
    if isinstance(source, CheckpointReader):
        return source
    from steerkit._hub import local
    from steerkit.models import EMBEDDED, embedded_checkpoint

    return CheckpointReader(embedded_checkpoint(source) if str(source) in EMBEDDED else local(source))


def delta_shape(deltas: Mapping, name: str) -> tuple[int, ...]:
    """A delta's shape, from file headers where the deltas are lazy."""
    return tuple(deltas.shape(name) if callable(getattr(deltas, "shape", None)) else deltas[name].shape)


def sources(deltas: Mapping) -> list[Path]:
    """The checkpoint folders a task vector's deltas are read from (inputs no output may replace)."""
    if isinstance(deltas, _Deltas):
        return [deltas.a.path, deltas.b.path]
    return [deltas.path] if isinstance(deltas, CheckpointReader) else []


class _Deltas(Mapping):
    """θ_A − θ_B, computed in float32 when a tensor is asked for: nothing is held in memory."""

    def __init__(self, a: CheckpointReader, b: CheckpointReader, names: list[str], common_rows: bool):
        self.a, self.b, self.names, self.common_rows = a, b, names, common_rows

    def raw(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A's and B's tensors in their stored dtypes, cut to the rows both have."""
        if name not in self.names:
            raise KeyError(f"{name!r} is not in this task vector")
        ta, tb = self.a[name], self.b[name]
        if ta.shape != tb.shape:
            rows = min(ta.shape[0], tb.shape[0])
            ta, tb = ta[:rows], tb[:rows]
        return ta, tb

    def __getitem__(self, name: str) -> torch.Tensor:
        ta, tb = self.raw(name)
        return ta.float() - tb.float()

    def shape(self, name: str) -> tuple[int, ...]:
        sa, sb = self.a.shape(name), self.b.shape(name)
        return sa if sa == sb else (min(sa[0], sb[0]), *sa[1:])

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class TaskVector:
    """Per-tensor deltas (float32) plus metadata; computed or read lazily, one tensor at a time."""

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

        Names and shapes are checked from the file headers at once; the deltas are computed when read.
        Differently shaped tensors are an error unless excluded, or ``common_rows=True`` asks for the delta
        over the leading rows both have (e.g. a vocabulary grown by added tokens).
        """
        ra, rb = _reader(a), _reader(b)
        selected = [n for n in rb if (include is None or _matches(n, include)) and not _matches(n, exclude)]
        only_b = [n for n in selected if n not in ra]
        only_a = [n for n in ra if n not in rb and (include is None or _matches(n, include))]
        only_a = [n for n in only_a if not _matches(n, exclude)]
        if only_a or only_b:
            raise ValueError(
                f"the checkpoints hold different tensors ({len(only_b)} only in B, {len(only_a)} only in A, "
                f"e.g. {(only_b or only_a)[0]!r}); are they from one base? Use exclude= to leave tensors out"
            )
        if not selected:
            raise ValueError("no tensors selected: check include=/exclude=")
        for name in selected:
            sa, sb = ra.shape(name), rb.shape(name)
            if sa != sb and (not common_rows or sa[1:] != sb[1:]):
                raise ValueError(
                    f"{name}: shape {sa} in A vs {sb} in B; exclude it, or pass common_rows=True (--common-rows) "
                    "for the delta over the rows both have"
                )
        meta = {"a": str(a), "b": str(b), "model_type": rb.config().get("model_type")}
        return cls(_Deltas(ra, rb, selected, common_rows), meta, rb.config())

    def _tensor_stats(self) -> dict[str, dict]:
        """Per tensor: the delta's norm and its norm relative to B's tensor (read once, then kept in metadata)."""
        if "stats" not in self.metadata:
            base = self.deltas.b if isinstance(self.deltas, _Deltas) else None
            stats = {}
            for name in self.deltas:
                delta = self.deltas[name]
                if not bool(torch.isfinite(delta).all()):
                    where = " and ".join(str(p) for p in sources(self.deltas)) or "the task vector"
                    raise ValueError(f"{name}: the delta holds NaN or inf (read from {where}); nothing was written")
                norm = float(delta.norm())
                ref = float(base[name].float()[: self.deltas.shape(name)[0]].norm()) if base is not None else 0.0
                stats[name] = {"norm": norm, "relative": norm / ref if ref > 0 else float("nan")}
            self.metadata["stats"] = stats
        return self.metadata["stats"]

    def stats(self) -> dict:
        """``{"tensors": {name: {norm, relative}}, "layers": {layer: {norm, relative}}}`` (layer None: others)."""
        per_tensor = self._tensor_stats()
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

    def random_like(self, seed: int = 0) -> TaskVector:
        """A null control: a Gaussian direction per tensor with this vector's per-tensor norms (every tensor
        moved as far as this vector moves it, in no learned direction)."""
        g = torch.Generator().manual_seed(seed)
        deltas = {}
        for name, s in self._tensor_stats().items():
            noise = torch.randn(delta_shape(self.deltas, name), generator=g)
            deltas[name] = noise * (s["norm"] / noise.norm())
        return TaskVector(deltas, {"random_like": self.metadata.get("a"), "seed": seed}, self.config)

    @torch.no_grad()
    def add_to(self, model: torch.nn.Module, alpha: float = 1.0) -> torch.nn.Module:
        """θ ← θ + α·δ on a loaded model, in place (float32 arithmetic, the parameter's dtype kept): the
        in-memory counterpart of ``merge`` for sweeps over α. Tied tensors are updated once."""
        finite(alpha, "alpha")
        params = model.state_dict(keep_vars=True)
        missing = [name for name in self.deltas if name not in params]
        if missing:
            raise ValueError(f"the model has no tensor {missing[0]!r} ({len(missing)} of the vector's are missing)")
        seen = set()
        for name in self.deltas:
            target = params[name]
            if target.data_ptr() in seen:  # a tied copy (lm_head = embed_tokens): already moved
                continue
            seen.add(target.data_ptr())
            delta = self.deltas[name]
            if tuple(delta.shape) != tuple(target.shape):
                raise ValueError(f"{name}: delta shape {tuple(delta.shape)} vs the model's {tuple(target.shape)}")
            target.copy_((target.float() + alpha * delta.to(target.device)).to(target.dtype))
        return model

    def save(self, out: str | os.PathLike, force: bool = False, max_shard_size: int | str = "5GB") -> Path:
        """Write the deltas as a checkpoint directory; ``task_vector.json`` names the sources and their hashes."""
        specs = {name: (delta_shape(self.deltas, name), torch.float32) for name in self.deltas}
        writer = CheckpointWriter(out, specs, max_shard_size=max_shard_size, force=force, inputs=sources(self.deltas))
        meta = dict(self.metadata)
        meta["stats"] = self._tensor_stats()  # refuses NaN / inf deltas before anything is written
        if isinstance(self.deltas, _Deltas):
            meta["a_hash"], meta["b_hash"] = self.deltas.a.content_hash(), self.deltas.b.content_hash()
        with writer:
            for name in self.deltas:
                writer.add(name, self.deltas[name].float())
            writer.add_file("task_vector.json", json.dumps(meta, indent=1) + "\n")
            if self.config:
                writer.add_file("config.json", json.dumps(self.config, indent=2) + "\n")
        self.metadata = meta
        return Path(out)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike) -> TaskVector:
        """A task vector from a Hub repo id or a local folder (the same as ``load``)."""
        return cls.load(source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskVector:
        """A task vector directory (or Hub repo id), read lazily tensor by tensor."""
        from steerkit._hub import local

        path = local(path)
        meta_file = path / "task_vector.json"
        if not meta_file.is_file():
            raise ValueError(f"{path} is not a task vector (no task_vector.json); write one with TaskVector.save")
        reader = CheckpointReader(path)
        return cls(reader, json.loads(meta_file.read_text()), reader.config())
