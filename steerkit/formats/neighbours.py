"""The vector objects of neighbouring libraries as ``({layer: direction}, metadata)``: steering-vectors'
``SteeringVector`` and repeng's ``ControlVector`` (each library's own layer ids are steerkit's block outputs)."""

from __future__ import annotations

import torch


def is_steering_vectors(obj) -> bool:
    return type(obj).__module__.startswith("steering_vectors")


def is_repeng(obj) -> bool:
    return type(obj).__module__.startswith("repeng") or (hasattr(obj, "directions") and hasattr(obj, "model_type"))


def from_steering_vectors(vector) -> tuple[dict[int, torch.Tensor], dict]:
    """A steering-vectors ``SteeringVector`` (its ``decoder_block`` layers are steerkit's layers)."""
    if getattr(vector, "layer_type", "decoder_block") != "decoder_block":
        raise ValueError(
            f"a steering-vectors vector on {vector.layer_type!r} layers: steerkit steers decoder-block outputs"
        )
    directions = {int(k): v.detach().float().cpu() for k, v in vector.layer_activations.items()}
    return directions, {"method": "steering-vectors"}


def from_repeng(vector) -> tuple[dict[int, torch.Tensor], dict]:
    """A repeng ``ControlVector`` (its layer ids are those of its GGUF export, llama.cpp's ``direction.{i}``)."""
    import numpy as np

    directions = {int(k): torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in vector.directions.items()}
    return directions, {"method": "repeng", "model_hint": getattr(vector, "model_type", None)}
