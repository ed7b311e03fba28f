"""Clamping an SAE latent in the residual stream, the one piece of SAE arithmetic that ``steer`` and ``splice``
share (it needs only the SAE's weights, so it sits below both)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def clamped(sae, values: dict[int, float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn(h)``: ``h`` with the SAE latents ``values`` names set to those activations, as Neuronpedia and Goodfire
    clamp: encode, set, and add only the difference the decoder makes, ``Σᵢ (vᵢ − aᵢ(h))·W_dec[i]``, so the SAE's
    reconstruction error stays in the stream."""
    latents = torch.tensor(list(values), dtype=torch.long)
    targets = torch.tensor(list(values.values()), dtype=torch.float32)

    def fn(h: torch.Tensor) -> torch.Tensor:
        here = latents.to(h.device)
        acts = sae.encode(h.to(sae.dtype))[..., here].float()
        delta = (targets.to(h.device) - acts) @ sae.W_dec[here].float()
        return h + delta.to(h.dtype)

    return fn
