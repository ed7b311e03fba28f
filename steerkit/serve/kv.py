"""Surgery on the engine's KV cache (a transformers ``DynamicCache``) and its attention mask, between steps:
rows kept, a newly prefilled batch joined on (the shorter side left-padded), columns that are padding in every
row trimmed."""

from __future__ import annotations

import inspect

import torch


def _cache_argument() -> str:
    """The forward argument that carries a KV cache: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


CACHE_ARGUMENT = _cache_argument()


def pad_left(t: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """``t`` left-padded with zeros to ``width`` along ``dim``."""
    if t.shape[dim] == width:
        return t
    shape = list(t.shape)
    shape[dim] = width - t.shape[dim]
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def select_rows(cache, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keep the batch rows ``index`` of ``cache`` (in place) and of ``mask``; trim the columns that are then padding
    in every row. Returns the new mask."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index.to(layer.keys.device)], layer.values[index.to(layer.keys.device)]
    mask = mask[index]
    empty = int((mask.cumsum(1) == 0).sum(1).min())
    if empty:
        mask = mask[:, empty:]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., empty:, :], layer.values[..., empty:, :]
    return mask


def join(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Append ``other``'s rows to ``cache`` (in place), left-padding the shorter one along the sequence; returns
    the joined mask."""
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        width = max(mine.keys.shape[-2], theirs.keys.shape[-2])
        mine.keys = torch.cat([pad_left(mine.keys, width), pad_left(theirs.keys, width)])
        mine.values = torch.cat([pad_left(mine.values, width), pad_left(theirs.values, width)])
    width = max(mask.shape[1], other_mask.shape[1])
    return torch.cat([pad_left(mask, width, dim=1), pad_left(other_mask, width, dim=1)])
