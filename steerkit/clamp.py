"""Clamping an SAE latent in the residual stream, the one piece of SAE arithmetic that ``steer`` and ``splice``
share (it needs only the SAE's weights, so it sits below both)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch


def clamped(sae, values: dict[int, float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn(h)``: ``h`` with the SAE latents ``values`` names set to those activations, as Neuronpedia and Goodfire
    clamp: encode, set, and add only the difference the decoder makes, ``Σᵢ (vᵢ − aᵢ(h))·W_dec[i]``, so the SAE's
    reconstruction error stays in the stream. The SAE runs where ``h`` is (a copy moved there once per device;
    the caller's SAE stays put)."""
    latents = torch.tensor(list(values), dtype=torch.long)
    targets = torch.tensor(list(values.values()), dtype=torch.float32)
    placed: dict = {}  # device -> (the SAE there, latents, targets)

    def fn(h: torch.Tensor) -> torch.Tensor:
        if h.device not in placed:
            here = sae if sae.device == h.device else copy.deepcopy(sae).to(h.device)
            placed[h.device] = here, latents.to(h.device), targets.to(h.device)
        here, rows, goal = placed[h.device]
        acts = here.encode(h.to(here.dtype))[..., rows].float()
        delta = (goal - acts) @ here.W_dec[rows].float()
        return h + delta.to(h.dtype)

    return fn
