"""SteeringVector: one direction per layer plus metadata; arithmetic; safetensors files, and through
``steerkit.formats`` llama.cpp GGUF files and the vectors of repeng and steering-vectors.

Layer *i* is the output of block *i*, the same numbering as llama.cpp's ``direction.{i}`` tensors. This module is
data and files only: ``steerkit.steer`` gives the class its ``apply`` and ``steerkit.hub`` its ``push_to_hub``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from steerkit._io import save_safetensors
from steerkit.formats import gguf, neighbours

FORMAT_VERSION = "1"


def as_vector(vector) -> SteeringVector:
    """A steerkit SteeringVector from one, a steering-vectors SteeringVector or a repeng ControlVector."""
    if isinstance(vector, SteeringVector):
        return vector
    if neighbours.is_steering_vectors(vector):
        return SteeringVector.from_steering_vectors(vector)
    if neighbours.is_repeng(vector):
        return SteeringVector.from_repeng(vector)
    raise TypeError(
        f"{type(vector).__name__} is not a steering vector steerkit reads: a steerkit, steering-vectors or repeng one"
    )


class SteeringVector:
    """Per-layer directions (float32 ``[d_model]``) and what produced them.

    ``metadata`` is a JSON-able dict: ``model`` (fingerprint), ``method``, ``pairs_hash``, and per-layer
    dicts keyed by layer (``separation``, ``explained_variance``) that ``best_layers`` reads.
    """

    def __init__(self, directions: Mapping[int, torch.Tensor], metadata: dict | None = None):
        if not directions:
            raise ValueError("a SteeringVector needs at least one layer")
        self.directions: dict[int, torch.Tensor] = {}
        widths = set()
        for layer, vec in sorted(directions.items()):
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
                raise ValueError(f"layer {layer!r}: expected a non-negative int")
            vec = torch.as_tensor(vec).detach()
            if vec.dim() != 1 or not vec.is_floating_point():
                raise ValueError(
                    f"the direction of layer {layer} is a {vec.dim()}-D {str(vec.dtype).removeprefix('torch.')} "
                    "tensor: expected a 1-D floating-point tensor of length d_model"
                )
            vec = vec.to(torch.float32).cpu()
            if not torch.isfinite(vec).all():
                raise ValueError(f"the direction of layer {layer} contains NaN or inf (or overflows float32)")
            self.directions[int(layer)] = vec
            widths.add(vec.numel())
        if len(widths) != 1:
            raise ValueError(f"directions have different widths {sorted(widths)}: expected one d_model")
        self.metadata = dict(metadata or {})
        if not isinstance(self.metadata.get("model") or {}, dict):
            raise ValueError(
                f"metadata 'model' is {self.metadata['model']!r}: expected an object with model_type, "
                "hidden_size, num_hidden_layers and name"
            )

    # --- container -------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def d_model(self) -> int:
        return next(iter(self.directions.values())).numel()

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.directions:
            raise KeyError(f"layer {layer} is not in this vector (layers {self.layers})")
        return self.directions[layer]

    def __contains__(self, layer: int) -> bool:
        return layer in self.directions

    def __len__(self) -> int:
        return len(self.directions)

    def items(self):
        return self.directions.items()

    def __repr__(self) -> str:
        method = self.metadata.get("method", "?")
        return f"SteeringVector(layers={self.layers}, d_model={self.d_model}, method={method!r})"

    def _per_layer(self, key: str) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.metadata.get(key) or {}).items()}

    @property
    def separation(self) -> dict[int, float]:
        """Held-out AUROC of the projection per layer (empty for hand-built vectors)."""
        return self._per_layer("separation")

    def norms(self) -> dict[int, float]:
        return {layer: float(v.norm()) for layer, v in self.items()}

    def best_layers(self, n: int = 1) -> list[int]:
        """The ``n`` layers whose directions separate held-out pairs best (by AUROC)."""
        scores = self.separation
        if not scores:
            raise ValueError("this vector records no separation scores (extract it with steerkit.extract)")
        return sorted(sorted(scores, key=lambda layer: -scores[layer])[:n])

    def default_layers(self) -> list[int]:
        """The layer to steer when none is named: the only one, else the best held-out separation."""
        if len(self.layers) == 1:
            return self.layers
        if self.separation:
            return self.best_layers(1)
        raise ValueError(
            f"the vector has {len(self.layers)} layers ({self.layers[0]}..{self.layers[-1]}) and no separation "
            "scores to pick one by: name the layers"
        )

    # --- arithmetic --------------------------------------------------------------------------
    def _derived(self, directions: dict[int, torch.Tensor], op: str) -> SteeringVector:
        meta = {k: v for k, v in self.metadata.items() if k in ("model", "format_version")}
        meta["method"] = op
        return SteeringVector(directions, meta)

    def _combine(self, other: SteeringVector, sign: float, op: str) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.d_model != self.d_model:
            raise ValueError(f"cannot combine vectors of width {self.d_model} and {other.d_model}")
        out = {layer: v.clone() for layer, v in self.items()}
        for layer, v in other.items():
            out[layer] = out[layer] + sign * v if layer in out else sign * v
        return self._derived(out, op)

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0, "sum")

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0, "difference")

    def __mul__(self, scalar: float) -> SteeringVector:
        if not isinstance(scalar, numbers.Real) or isinstance(scalar, bool):
            return NotImplemented
        if not math.isfinite(scalar):
            raise ValueError(f"cannot scale a SteeringVector by {scalar!r}: not finite")
        return self._derived({layer: v * float(scalar) for layer, v in self.items()}, "scaled")

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> SteeringVector:
        if not isinstance(scalar, numbers.Real) or scalar == 0:
            raise ValueError(f"cannot divide a SteeringVector by {scalar!r}")
        return self * (1.0 / float(scalar))

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def normalized(self) -> SteeringVector:
        """Every layer's direction scaled to unit norm (zero directions stay zero)."""
        return self._derived({layer: v / v.norm().clamp_min(1e-12) for layer, v in self.items()}, "normalized")

    def select(self, layers: Iterable[int]) -> SteeringVector:
        """A vector with only ``layers`` (metadata kept)."""
        layers = list(layers)
        missing = [layer for layer in layers if layer not in self]
        if missing:
            raise KeyError(f"layers {missing} are not in this vector (layers {self.layers})")
        return SteeringVector({layer: self[layer] for layer in layers}, self.metadata)

    def cosine(self, other: SteeringVector) -> dict[int, float]:
        """Cosine similarity per layer the two vectors share."""
        common = [layer for layer in self.layers if layer in other]
        return {
            layer: float(torch.nn.functional.cosine_similarity(self[layer], other[layer], dim=0)) for layer in common
        }

    # --- neighbours ------------------------------------------------------------------------------
    @classmethod
    def from_steering_vectors(cls, vector) -> SteeringVector:
        """A steering-vectors ``SteeringVector`` (its ``decoder_block`` layers are steerkit's layers)."""
        return cls(*neighbours.from_steering_vectors(vector))

    @classmethod
    def from_repeng(cls, vector) -> SteeringVector:
        """A repeng ``ControlVector`` (its layer ids are those of its GGUF export, llama.cpp's ``direction.{i}``)."""
        return cls(*neighbours.from_repeng(vector))

    # --- model compatibility -------------------------------------------------------------------
    def check_model(self, hidden_size: int, n_layers: int, model_type: str | None = None) -> None:
        """Raise a ValueError naming both sides if this vector cannot apply to a model of that shape."""
        fp = self.metadata.get("model") or {}
        if self.d_model != hidden_size:
            raise ValueError(
                f"vector width {self.d_model} (from {fp.get('name') or fp.get('model_type') or 'an unknown model'}) "
                f"does not match the model's hidden size {hidden_size}"
            )
        if max(self.layers) >= n_layers:
            raise ValueError(
                f"vector has layer {max(self.layers)} but the model has only {n_layers} blocks (0..{n_layers - 1})"
            )

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
        """Write a safetensors file: tensors ``layers.{i}`` and metadata as JSON strings (atomically).

        An existing file is replaced only with ``force=True``, and never one of ``inputs``.
        """
        meta = {"format_version": FORMAT_VERSION, "layers": json.dumps(self.layers)}
        meta.update({k: json.dumps(v) for k, v in self.metadata.items() if k not in meta})
        tensors = {f"layers.{layer}": v for layer, v in self.items()}
        return save_safetensors(tensors, path, meta, force=force, inputs=inputs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        """Read a steerkit safetensors vector, a llama.cpp control vector (``.gguf``), or a Hub repo id."""
        from safetensors import SafetensorError, safe_open

        from steerkit._hub import is_repo_id

        if is_repo_id(path):
            return cls.from_pretrained(path)
        if str(path).endswith(".gguf"):
            return cls.from_gguf(path)

        try:
            with safe_open(str(path), "pt") as f:
                raw = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
        directions = {}
        for key, tensor in tensors.items():
            prefix, _, index = key.partition(".")
            if prefix != "layers" or not index.isdigit():
                raise ValueError(f"{path}: tensor {key!r} is not named 'layers.{{i}}' with a block index i")
            directions[int(index)] = tensor
        if not directions:
            raise ValueError(f"{path} holds no 'layers.{{i}}' tensors: not a steerkit vector")
        meta = {}
        for key, value in raw.items():
            if key in ("layers", "format_version"):
                continue
            try:
                meta[key] = json.loads(value)
            except json.JSONDecodeError:
                meta[key] = value
        try:
            return cls(directions, meta)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, filename: str | None = None) -> SteeringVector:
        """A vector from a Hub repo id (``org/name[@revision]``, through the Hub cache) or a local folder or file:
        ``filename``, else ``vector.safetensors``, else the folder's one ``.safetensors`` or ``.gguf`` file."""
        from steerkit._hub import local

        path = local(source, allow_patterns=[filename] if filename else ["*.safetensors", "*.gguf", "*.md"])
        if path.is_file():
            return cls.load(path)
        if filename:
            return cls.load(path / filename)
        if (path / "vector.safetensors").is_file():
            return cls.load(path / "vector.safetensors")
        found = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ValueError(
                f"{source}: expected vector.safetensors or one vector file, found {[p.name for p in found]}"
            )
        return cls.load(found[0])

    def to_gguf(
        self,
        path: str | os.PathLike,
        model_hint: str | None = None,
        skip_layer0: bool = False,
        force: bool = False,
        inputs: Iterable[str | os.PathLike] = (),
    ) -> Path:
        """Write a llama.cpp control-vector GGUF (``direction.{i}``, float32); llama.cpp cannot steer block 0.

        An existing file is replaced only with ``force=True``, and never one of ``inputs``.
        """
        layers = self.layers
        if 0 in layers:
            if not skip_layer0:
                raise ValueError(
                    "layer 0 cannot be exported to a llama.cpp control vector (llama.cpp applies direction.{i} "
                    "for i >= 1 only); drop it with vec.select(...) or pass skip_layer0=True"
                )
            layers = [layer for layer in layers if layer != 0]
        if not layers:
            raise ValueError("nothing to export: the vector has no layer >= 1")
        hint = model_hint or (self.metadata.get("model") or {}).get("model_type") or "unknown"
        return gguf.write(path, {layer: self[layer] for layer in layers}, hint, force=force, inputs=inputs)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> SteeringVector:
        """Read a llama.cpp / repeng control-vector GGUF."""
        directions, meta = gguf.read(path)
        try:
            return cls(directions, meta)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
