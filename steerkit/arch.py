"""Where the residual stream lives in each architecture: the decoder blocks and the projections that write into it.

Layer *i* is the output of decoder block *i*. Known architectures are looked up by ``config.model_type``;
anything else goes through a generic search (a ``ModuleList`` as long as the model is deep), and a model
the search cannot read gets an error that says how to pass the blocks explicitly (``blocks="path.to.list"``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Dotted paths for one architecture: the block list (from the model), and the residual writers (from a block).

    ``norm_after_writers`` is true where a norm sits between a writer and the residual add (Gemma 2 and 3),
    so a bias on the writer is not a constant added to the residual stream.
    """

    blocks: str
    attn_out: str
    mlp_out: str
    norm_after_writers: bool = False


_LLAMA_LIKE = ArchSpec("model.layers", "self_attn.o_proj", "mlp.down_proj")
_GEMMA_SANDWICH = ArchSpec("model.layers", "self_attn.o_proj", "mlp.down_proj", norm_after_writers=True)

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma2": _GEMMA_SANDWICH,
    "gemma3_text": _GEMMA_SANDWICH,
    "gemma3": ArchSpec("model.language_model.layers", "self_attn.o_proj", "mlp.down_proj", True),
    "gpt2": ArchSpec("transformer.h", "attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h"),
}

# Names under which residual writers appear in architectures outside the table, tried in order.
_ATTN_OUT_NAMES = ("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attn.out_proj", "attn.out_proj")
_MLP_OUT_NAMES = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "mlp.w2", "feed_forward.w2")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def input_device(model: nn.Module):
    """Where a model's inputs go: its embedding's device, or the CPU when accelerate has offloaded the
    embedding (its hooks then move inputs to the execution device)."""
    import torch

    weight = unwrap(model).get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks."""
    return len(get_blocks(model))


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (d_model)."""
    config = unwrap(model).config
    config = getattr(config, "text_config", None) or config
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot read the hidden size from config of type {type(config).__name__}")


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's position scheme allows (None if the config does not say)."""
    config = unwrap(model).config
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _resolve(root: nn.Module, path: str) -> nn.Module | None:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def config_depth(config) -> int | None:
    """Number of decoder blocks a config declares (a transformers config or its ``config.json`` dict)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    inner = get("text_config")
    if inner:
        return config_depth(inner)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(get(name), int):
            return get(name)
    return None


def get_blocks(model: nn.Module, blocks: str | None = None) -> nn.ModuleList:
    """The decoder blocks of ``model`` in order; ``blocks`` overrides the lookup with a dotted path."""
    model = unwrap(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    tried = []
    paths = [blocks] if blocks else []
    if not blocks and model_type in ARCHS:
        paths.append(ARCHS[model_type].blocks)
    for path in paths:
        found = _resolve(model, path)
        tried.append(path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    if blocks:
        raise ValueError(f"blocks={blocks!r} is not a non-empty nn.ModuleList on {type(model).__name__}")
    # Generic search: the ModuleList whose length equals the configured depth.
    depth = config_depth(getattr(model, "config", None))
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (depth is None or len(mod) == depth)
    ]
    if len(candidates) == 1 or (candidates and depth is not None):
        return candidates[0][1]
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__} (model_type={model_type!r}); tried "
        f"{tried or 'no known path'} and a search for an nn.ModuleList of length {depth}. "
        "Pass the blocks explicitly, e.g. blocks='model.layers'."
    )


def spec_for(model: nn.Module) -> ArchSpec | None:
    """The table entry for this model's architecture, if it has one."""
    return ARCHS.get(getattr(getattr(unwrap(model), "config", None), "model_type", None))


def residual_writers(model: nn.Module, layer: int, blocks: str | None = None) -> dict[str, nn.Module]:
    """The projections of block ``layer`` that write into the residual stream: ``{"attn": ..., "mlp": ...}``."""
    block = get_blocks(model, blocks)[check_layer(model, layer, blocks)]
    spec = spec_for(model)
    writers = {}
    for key, known, names in (
        ("attn", spec and spec.attn_out, _ATTN_OUT_NAMES),
        ("mlp", spec and spec.mlp_out, _MLP_OUT_NAMES),
    ):
        for path in ([known] if known else []) + list(names):
            mod = _resolve(block, path)
            if isinstance(mod, nn.Module):
                writers[key] = mod
                break
        else:
            raise ValueError(
                f"cannot find the {key} output projection in block {layer} ({type(block).__name__}); "
                f"tried {list(names)}"
            )
    return writers


def validate_layer(layer, n_layers: int) -> int:
    """``layer`` as a block index in ``0..n_layers-1``, or a ValueError naming the valid range."""
    try:
        index = operator.index(layer)
    except TypeError:
        index = None
    if isinstance(layer, bool) or index is None or not 0 <= index < n_layers:
        raise ValueError(f"layer {layer!r} is out of range: this model has blocks 0..{n_layers - 1}")
    return index


def check_layer(model: nn.Module, layer: int, blocks: str | None = None) -> int:
    """``layer`` as a valid block index of ``model``, or a ValueError naming the valid range."""
    return validate_layer(layer, len(get_blocks(model, blocks)))


def _items(spec: str) -> list[str]:
    items = [part.strip() for part in str(spec).split(",")]
    if not all(items):
        raise ValueError(f"layers {spec!r} has an empty item: expected e.g. '12', '4,8,12' or '4-25'")
    return items


def _span(part: str, spec: str) -> range:
    """The blocks of one item of a layer spec: ``"12"`` or an inclusive, increasing ``"4-25"``."""
    lo, sep, hi = part.partition("-")
    try:
        start = int(lo)
        stop = int(hi) if sep else start
    except ValueError:
        raise ValueError(
            f"cannot read layers {spec!r}: expected 'all', '12', '4,8,12' or '4-25' (0-based block indices)"
        ) from None
    if stop < start:
        raise ValueError(f"layers {spec!r}: the range {part!r} runs backwards (write '{stop}-{start}')")
    return range(start, stop + 1)


def layer_list(layers, n_layers: int, name: str = "layers", repeats: bool = False) -> list[int]:
    """Block indices from an int, a spec string (see ``parse_layers``) or an iterable of ints.

    Every index must lie in ``0..n_layers-1``; an empty list is an error, and so is a repeat unless ``repeats``.
    """
    if isinstance(layers, str):
        return parse_layers(layers, n_layers)
    items = [layers] if isinstance(layers, int) else list(layers)
    if not items:
        raise ValueError(f"{name} is empty: expected block indices in 0..{n_layers - 1}")
    out = [validate_layer(layer, n_layers) for layer in items]
    repeated = sorted({layer for layer in out if out.count(layer) > 1})
    if repeated and not repeats:
        raise ValueError(f"{name} {items} name block(s) {repeated} more than once")
    return out


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Layers from a spec: ``"all"``, ``"12"``, ``"4,8,12"``, ``"4-25"`` (inclusive) or a mix, 0-based.

    Backward ranges (``"5-3"``), empty items, repeats and blocks outside ``0..n_layers-1`` are errors.
    """
    if str(spec).strip() == "all":
        return list(range(n_layers))
    layers = [layer for part in _items(spec) for layer in _span(part, spec)]
    return layer_list(layers, n_layers, name=f"layers {spec!r}")


def parse_layer_values(spec: str, n_layers: int) -> dict[int, float]:
    """Per-layer numbers from ``"0-9:0.5,10:1.5"`` (LAYERS:VALUE items, layers as in ``parse_layers``)."""
    from steerkit._checks import finite

    out: dict[int, float] = {}
    for part in _items(spec):
        layers, sep, value = part.rpartition(":")
        try:
            number = finite(float(value), f"the value in {part!r}")
        except ValueError:
            number = None
        if not sep or not layers or number is None:
            raise ValueError(
                f"cannot read {part!r} in {spec!r}: expected LAYERS:VALUE with a finite number, e.g. '0-9:0.5'"
            )
        for layer in _span(layers.strip(), spec):
            layer = validate_layer(layer, n_layers)
            if layer in out:
                raise ValueError(f"{spec!r} gives layer {layer} twice")
            out[layer] = number
    return out


def mlp_module(model: nn.Module, layer: int, blocks: str | None = None) -> nn.Module:
    """Block ``layer``'s MLP (the module holding its output projection): what a transcoder reads and replaces."""
    writer = residual_writers(model, layer, blocks)["mlp"]
    block = get_blocks(model, blocks)[layer]
    parents = {id(child): mod for mod in block.modules() for child in mod.children()}
    return parents[id(writer)]
