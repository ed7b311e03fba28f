"""bake(): a steering vector written into weights, so any engine serves the steered model without steerkit.

A constant added to block *i*'s output equals a bias on the last projection that writes into the residual
stream in that block (pre-norm blocks), so the vector becomes the MLP output bias of each steered block.
``FAMILIES`` says, per ``model_type``, how that bias finds a home:

- ``native``: the architecture has it (GPT-2, GPT-NeoX) or can switch it on (Llama's ``mlp_bias``).
- ``llama``: the architecture is Llama in all but names and fusions (Qwen2 = Llama with q/k/v biases, Mistral
  = Llama plus a sliding window, Phi-3 = Llama with fused qkv and gate/up projections): the checkpoint is
  re-expressed, exactly, as ``LlamaForCausalLM`` with ``mlp_bias = true``.
- ``refused``: anything else; the error names the two things that do work (``export-gguf`` and hooks).

Before a byte is written, the rewritten architecture (without the vector) is checked against the original on
the first blocks of the real weights: a mismatch above tolerance stops the bake.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from steerkit import arch
from steerkit._checks import finite
from steerkit._hub import card, name_of
from steerkit.checkpoint import CheckpointReader, CheckpointWriter, Spec
from steerkit.vector import SteeringVector, as_vector
from steerkit.weights.taskvec import _reader, layer_of

log = logging.getLogger(__name__)
ALTERNATIVES = (
    "export a llama.cpp control vector (vec.to_gguf / steerkit export-gguf) or steer with hooks "
    "(steerkit.steer / steerkit generate) instead"
)


@dataclass(frozen=True)
class Family:
    """How a ``model_type`` is baked: ``native``, re-expressed as ``llama``, or ``refused`` (and why)."""

    how: str
    why: str
    bias: str | None = None  # native: the bias under each block that carries the vector


FAMILIES: dict[str, Family] = {
    "llama": Family("native", "mlp_bias = true: zero gate/up biases, down_proj.bias = α·v", "mlp.down_proj.bias"),
    "gpt2": Family("native", "its own mlp.c_proj.bias", "mlp.c_proj.bias"),
    "gpt_neox": Family("native", "its own mlp.dense_4h_to_h.bias", "mlp.dense_4h_to_h.bias"),
    "qwen2": Family("llama", "Llama with q/k/v biases (attention_bias = true, zero o_proj bias)"),
    "mistral": Family(
        "llama", "Llama without its sliding window (refused when the window is shorter than the context)"
    ),
    "phi3": Family("llama", "fused qkv_proj and gate_up_proj split into Llama's projections (full rotary only)"),
    "qwen3": Family("refused", "RMSNorm on queries and keys inside attention, which Llama has no place for"),
    "gemma": Family("refused", "embeddings scaled by √d_model and (1 + w) norms, which Llama cannot express exactly"),
    "gemma2": Family("refused", "a norm after each residual writer, so no bias there is a constant on the residual"),
    "gemma3_text": Family("refused", "a norm after each residual writer, and q/k norms"),
    "gemma3": Family("refused", "a norm after each residual writer, and q/k norms"),
}
MODES = ("auto", "native", "llama")
LLAMA_BLOCKS = "model.layers"


class _Tensors:
    """The tensors of the written checkpoint, in order: ``name -> (spec, function that produces the tensor)``."""

    def __init__(self):
        self.items: dict[str, tuple[Spec, Callable[[], torch.Tensor]]] = {}

    def copy(self, reader: CheckpointReader, name: str, new_name: str | None = None) -> None:
        self.items[new_name or name] = (reader.spec(name), lambda: reader[name])

    def rows(self, reader: CheckpointReader, name: str, parts: dict[str, tuple[int, int]]) -> None:
        """Split a fused tensor by rows into ``{new_name: (start, stop)}`` (read once per part)."""
        shape, dtype = reader.spec(name)
        for new_name, (start, stop) in parts.items():
            self.items[new_name] = ((stop - start, *shape[1:]), dtype), (lambda a=start, b=stop: reader[name][a:b])

    def zeros(self, name: str, width: int, dtype: torch.dtype) -> None:
        self.items[name] = (((width,), dtype), lambda: torch.zeros(width, dtype=dtype))


@dataclass
class _Plan:
    """What a bake writes: the config, the tensors, and the bias of block *i* that carries the vector."""

    config: dict
    tensors: _Tensors
    bias: Callable[[int], str]
    note: str


def _mlp_biases(tensors: _Tensors, n_layers: int, hidden: int, inter: int, dtype: torch.dtype) -> None:
    for i in range(n_layers):
        for proj, width in (("gate_proj", inter), ("up_proj", inter), ("down_proj", hidden)):
            tensors.zeros(f"{LLAMA_BLOCKS}.{i}.mlp.{proj}.bias", width, dtype)


def _native(reader: CheckpointReader, config: dict, model_type: str) -> _Plan:
    tensors = _Tensors()
    for name in reader:
        tensors.copy(reader, name)
    prefix = arch.ARCHS[model_type].blocks
    config = dict(config)
    note = f"the vector is the bias of each steered block's MLP output projection ({FAMILIES[model_type].why})"
    if model_type == "llama" and not config.get("mlp_bias"):
        dtype = reader.spec(f"{prefix}.0.mlp.down_proj.weight")[1]
        _mlp_biases(tensors, arch.config_depth(config), config["hidden_size"], config["intermediate_size"], dtype)
        config["mlp_bias"] = True
    return _Plan(config, tensors, lambda i: f"{prefix}.{i}.{FAMILIES[model_type].bias}", note)


def _llama_config(source, model_type: str) -> dict:
    """A LlamaConfig with the same mathematics as ``source`` (a transformers config), or a ValueError saying why not."""
    from transformers import LlamaConfig

    context = source.max_position_embeddings
    window = getattr(source, "sliding_window", None)
    sliding = model_type != "qwen2" or "sliding_attention" in (getattr(source, "layer_types", None) or [])
    if window is not None and sliding and window < context:
        raise ValueError(
            f"this {model_type} checkpoint attends within a sliding window of {window} tokens, shorter than its "
            f"context of {context}: Llama has no sliding window, so it cannot be re-expressed exactly"
        )
    rope = dict(source.rope_parameters or {})
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"this {model_type} checkpoint rotates only part of each head: Llama rotates all of it")
    if rope.get("rope_type") == "longrope" and getattr(source, "original_max_position_embeddings", None):
        rope.setdefault("original_max_position_embeddings", source.original_max_position_embeddings)
    fields = dict(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads or source.num_attention_heads,
        head_dim=getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads,
        hidden_act=source.hidden_act,
        max_position_embeddings=context,
        rms_norm_eps=source.rms_norm_eps,
        rope_parameters=rope,
        attention_bias=model_type == "qwen2",
        mlp_bias=True,
        attention_dropout=0.0,
        tie_word_embeddings=source.tie_word_embeddings,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=source.pad_token_id,
        initializer_range=source.initializer_range,
    )
    try:
        config = LlamaConfig(**fields)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"Llama's config cannot express this {model_type} checkpoint's rope ({err})") from None
    out = config.to_dict()
    out["architectures"] = ["LlamaForCausalLM"]
    out["dtype"] = str(source.dtype).removeprefix("torch.") if source.dtype is not None else None
    return out


def _as_llama(reader: CheckpointReader, model_type: str) -> _Plan:
    from transformers import AutoConfig

    source = AutoConfig.from_pretrained(reader.path)
    config = _llama_config(source, model_type)
    hidden, inter, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    tensors = _Tensors()
    for name in reader:
        stem = name.rsplit(".", 2)[0]  # model.layers.3.self_attn
        if name.endswith("self_attn.qkv_proj.weight"):
            tensors.rows(
                reader,
                name,
                {
                    f"{stem}.q_proj.weight": (0, q_rows),
                    f"{stem}.k_proj.weight": (q_rows, q_rows + kv_rows),
                    f"{stem}.v_proj.weight": (q_rows + kv_rows, q_rows + 2 * kv_rows),
                },
            )
        elif name.endswith("mlp.gate_up_proj.weight"):
            tensors.rows(
                reader, name, {f"{stem}.gate_proj.weight": (0, inter), f"{stem}.up_proj.weight": (inter, 2 * inter)}
            )
        else:
            tensors.copy(reader, name)
    dtype = reader.spec(f"{LLAMA_BLOCKS}.0.mlp.down_proj.weight")[1]
    if config["attention_bias"]:
        for i in range(n_layers):
            tensors.zeros(f"{LLAMA_BLOCKS}.{i}.self_attn.o_proj.bias", hidden, dtype)
    _mlp_biases(tensors, n_layers, hidden, inter, dtype)
    note = (
        f"re-expressed as LlamaForCausalLM (was {model_type}: {FAMILIES[model_type].why}) so that the vector can be "
        "the bias of each steered block's MLP output projection (mlp_bias = true); the logits without the vector "
        "were checked equal to the original's before writing"
    )
    return _Plan(config, tensors, lambda i: f"{LLAMA_BLOCKS}.{i}.mlp.down_proj.bias", note)


def plan_for(reader: CheckpointReader, family: str = "auto") -> _Plan:
    """How to bake into this checkpoint, or a ValueError that names the alternatives."""
    if family not in MODES:
        raise ValueError(f"family={family!r}: expected one of {MODES}")
    config = reader.checked_config()  # (sizes as the tensors: the check below builds a model from it)
    model_type = config.get("model_type")
    route = FAMILIES.get(model_type)
    if route is None or route.how == "refused":
        why = route.why if route else "steerkit has no exact way to give it an MLP output bias"
        raise ValueError(f"cannot bake a steering vector into a {model_type!r} checkpoint ({why}): {ALTERNATIVES}")
    if route.how == "llama" and family == "native":
        raise ValueError(
            f"a {model_type!r} checkpoint has no MLP output bias of its own: pass family='auto' or 'llama' to "
            f"re-express it as Llama ({route.why}), or {ALTERNATIVES}"
        )
    if route.how == "native" and family == "llama" and model_type != "llama":
        raise ValueError(
            f"a {model_type!r} checkpoint cannot be re-expressed as Llama; bake it natively (family='auto')"
        )
    return _native(reader, config, model_type) if route.how == "native" else _as_llama(reader, model_type)


# --- the check before writing --------------------------------------------------------------------------------


def _small_model(config: dict, tensor: Callable[[str], torch.Tensor], names, blocks: int, rows: torch.Tensor):
    """The first ``blocks`` blocks of a checkpoint, its vocabulary cut to ``rows``, loaded by plain transformers
    from a temporary folder (so its own name mapping and weight tying apply) in float32."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    vocab = config["vocab_size"]
    small = dict(config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(small.get(key), int):
            small[key] = blocks
    if isinstance(small.get("layer_types"), list):
        small["layer_types"] = small["layer_types"][:blocks]
    small["vocab_size"] = len(rows)
    state = {}
    for name in names:
        layer = layer_of(name)
        if layer is not None and layer >= blocks:
            continue
        t = tensor(name)
        state[name] = (t[rows] if layer is None and t.dim() and t.shape[0] == vocab else t).contiguous()
    with tempfile.TemporaryDirectory(prefix="steerkit-bake-check-") as folder:
        save_file(state, f"{folder}/model.safetensors", metadata={"format": "pt"})
        Path(folder, "config.json").write_text(json.dumps(small))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def check_equivalent(
    reader: CheckpointReader, plan: _Plan, blocks: int = 2, tolerance: float = 1e-4, seed: int = 0
) -> float:
    """Largest |Δlogit| / max |logit| between the original and the rewritten checkpoint (no vector), computed in
    float32 on the first ``blocks`` blocks with the vocabulary cut to 512 rows, on 3 seeded token sequences.

    Raises a ValueError, before anything is written, when it exceeds ``tolerance``.
    """
    config = reader.config()
    vocab = config["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    rows = torch.unique(torch.cat([torch.arange(min(256, vocab)), torch.randint(vocab, (256,), generator=g)]))
    ids = torch.randint(len(rows), (3, 16), generator=g)
    blocks = min(blocks, arch.config_depth(config))
    original = _small_model(config, reader.__getitem__, list(reader), blocks, rows)
    rewritten = _small_model(plan.config, lambda n: plan.tensors.items[n][1](), list(plan.tensors.items), blocks, rows)
    with torch.no_grad():
        a, b = original(input_ids=ids).logits, rewritten(input_ids=ids).logits
    error = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
    if not error <= tolerance:
        raise ValueError(
            f"the rewritten {config.get('model_type')} checkpoint does not reproduce the original (relative logit "
            f"error {error:.2e} > {tolerance:.0e} on its first {blocks} blocks); nothing was written"
        )
    return error


def bake(
    base: str | os.PathLike,
    vector: SteeringVector,
    alpha: float,
    out: str | os.PathLike,
    layers: Sequence[int] | str | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    family: str = "auto",
) -> Path:
    """Write a checkpoint whose plain forward equals hook steering ``h += α·v`` at every position.

    ``family``: ``"auto"`` bakes natively where the architecture has (or can switch on) an MLP output bias and
    re-expresses Qwen2, Mistral and Phi-3 exactly as Llama; ``"native"`` forbids re-expression; ``"llama"``
    asks for it. Other architectures (Qwen3, Gemma, ...) raise an error naming the alternatives. The rewritten
    architecture is checked against the original before anything is written (``check_equivalent``).
    """
    alpha = finite(alpha)
    vector = as_vector(vector)
    reader = _reader(base)
    plan = plan_for(reader, family)
    n_layers = arch.config_depth(plan.config)
    vector.check_model(plan.config.get("hidden_size") or plan.config.get("n_embd"), n_layers)
    chosen = vector.layers if layers is None else arch.layer_list(layers, n_layers)
    missing = [layer for layer in chosen if layer not in vector]
    if missing:
        raise ValueError(f"layers {missing} are not in the vector (it has {vector.layers})")
    steer = _biases(plan, vector, alpha, chosen)
    log.info("baking into %s: %s", reader.path.name, plan.note.split(";")[0])
    error = check_equivalent(reader, plan)
    log.debug("rewritten architecture checked: relative logit error %.1e without the vector", error)
    record = {"layers": chosen, "alpha": alpha, "method": vector.metadata.get("method"), "norms": vector.norms()}
    config = {**plan.config, "steerkit_bake": record}
    specs = {name: spec for name, (spec, _) in plan.tensors.items.items()}
    with CheckpointWriter(out, specs, max_shard_size, source=reader.path, force=force) as writer:
        for name, (_, produce) in plan.tensors.items.items():
            tensor = produce()
            if name in steer:
                tensor = (tensor.float() + steer[name]).to(tensor.dtype)
                if not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"{name}: the steered bias is not finite in {tensor.dtype}; nothing was written")
            writer.add(name, tensor)
        writer.add_file("config.json", json.dumps(config, indent=2) + "\n")
        lines = [
            f"base: `{name_of(base)}`",
            f"steering vector ({record['method']}) baked at layers {chosen}, α = {alpha:g}",
            plan.note,
            f"checked before writing: relative logit error {error:.1e} without the vector (first blocks, float32)",
        ]
        tags = ("steering-vector", "bake")
        writer.add_file("README.md", card("Steered checkpoint", lines, base_model=base, relation="finetune", tags=tags))
    return Path(out)


def _biases(plan: _Plan, vector: SteeringVector, alpha: float, chosen: list[int]) -> dict[str, torch.Tensor]:
    """``{bias tensor name: α·v}`` for the chosen layers; α·v must be finite in the dtype the bias is stored in."""
    steer = {}
    for i in chosen:
        name = plan.bias(i)
        if name not in plan.tensors.items:
            raise ValueError(f"the checkpoint has no bias tensor {name!r} to carry the vector")
        dtype = plan.tensors.items[name][0][1]
        if not bool(torch.isfinite((alpha * vector[i].double()).to(dtype)).all()):
            raise ValueError(
                f"alpha={alpha:g} times the layer-{i} direction (norm {float(vector[i].norm()):.4g}) is not finite in "
                f"{str(dtype).removeprefix('torch.')}: use a smaller alpha; nothing was written"
            )
        steer[name] = alpha * vector[i]
    return steer
