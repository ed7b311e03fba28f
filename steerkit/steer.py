"""The inference applier: add / project out / clamp a direction at block outputs, through removable hooks.

At the output of block *i*, on the selected positions: ``add`` h ← h + α·v_i; ``project_out``
h ← h − (h·v̂)v̂ (α unused); ``clamp`` sets h·v̂ to α. A pre-hook on the model reads each forward's
attention mask and KV-cache length, so padding is never steered and ``positions="generated"`` counts
absolute positions under KV-cache generation. Weights are never touched; hooks go when the context exits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from steerkit import arch
from steerkit._checks import finite
from steerkit.backends import fingerprint, hf_model, kind
from steerkit.capture import block_hidden, pad_batch, pad_id
from steerkit.models import chat_prompt
from steerkit.vector import SteeringVector

MODES = ("add", "project_out", "clamp")
POSITION_NAMES = ("all", "prompt", "generated")


@dataclass
class _Step:
    """What one forward call looks like: which current tokens are real, their columns and token indices."""

    valid: torch.Tensor  # [b, s] bool, False on padding
    columns: torch.Tensor  # [s] absolute column of each current token in the full sequence
    real_index: torch.Tensor  # [b, s] index among the row's real tokens
    prompt_len: int  # columns below this are the prompt


class PositionTracker:
    """Forward pre-hook on the model's top module; records the shape of the current step."""

    def __init__(self):
        self.step: _Step | None = None
        self._selection: tuple | None = None  # (key, selection) for the current step
        self._prompt_len = 0
        self._last_ids: torch.Tensor | None = None

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if torch.is_tensor(ids) and ids.dim() == 2 else embeds
        if ref is None:  # strings (TransformerLens) or an unknown call: steer every position
            self.step = self._selection = None
            return None
        b, s = ref.shape[:2]
        device = ref.device
        mask = kwargs.get("attention_mask")
        has_mask = torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[1] >= s
        past = kwargs.get("past_key_values")
        if has_mask:  # generate passes the mask over prompt + everything so far
            past_len = mask.shape[1] - s
        elif past is not None and hasattr(past, "get_seq_length"):
            past_len = int(past.get_seq_length())
        else:
            past_len = 0
        if past_len == 0 and not self._extends_last(ids):
            self._prompt_len = s  # a new prompt (a generation without cache re-sends prompt + generated)
        self._last_ids = ids if torch.is_tensor(ids) and past_len == 0 else self._last_ids
        columns = past_len + torch.arange(s, device=device)
        if has_mask:
            full = mask.to(device).bool()
            valid = full[:, -s:]
            real_index = (full.long().cumsum(-1) - 1)[:, -s:]
        else:
            valid = torch.ones(b, s, dtype=torch.bool, device=device)
            real_index = columns.expand(b, s)
        self.step = _Step(valid, columns, real_index, self._prompt_len)
        self._selection = None
        return None

    def _extends_last(self, ids) -> bool:
        last = self._last_ids
        return (
            torch.is_tensor(ids)
            and last is not None
            and ids.shape[0] == last.shape[0]
            and ids.shape[1] > last.shape[1]
            and torch.equal(ids[:, : last.shape[1]], last.to(ids.device))
        )

    def selection(self, hidden: torch.Tensor, positions: str | int) -> torch.Tensor | None:
        """Bool ``[b, s]`` of the positions of ``hidden`` to steer, or None for all of them (computed once a step)."""
        key = (hidden.shape[:2], hidden.device, positions)
        if self._selection is not None and self._selection[0] == key:
            return self._selection[1]
        b, s = hidden.shape[:2]
        step = self.step
        if step is None or step.valid.shape != (b, s):
            arange = torch.arange(s, device=hidden.device)
            step = _Step(torch.ones(b, s, dtype=torch.bool, device=hidden.device), arange, arange.expand(b, s), s)
        valid = step.valid.to(hidden.device)
        columns = step.columns.to(hidden.device).expand(b, s)
        if positions == "all":
            selected = valid
        elif positions == "prompt":
            selected = valid & (columns < step.prompt_len)
        elif positions == "generated":
            selected = valid & (columns >= step.prompt_len)
        else:
            selected = valid & (step.real_index.to(hidden.device) >= positions)
        result = None if bool(selected.all()) else selected
        self._selection = (key, result)
        return result


def _modify(h: torch.Tensor, v: torch.Tensor, alpha: float, mode: str, preserve_norm: bool) -> torch.Tensor:
    """``h`` steered at every position; for ``add``, ``v`` arrives already scaled by α."""
    if mode == "add":
        new = h + v
    else:
        unit = v / v.norm().clamp_min(1e-12)
        coef = h @ unit
        target = torch.zeros_like(coef) if mode == "project_out" else torch.full_like(coef, alpha)
        new = h + (target - coef).unsqueeze(-1) * unit
    if preserve_norm:
        new = new * (h.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return new


def hook_targets(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """(top module for the tracker, one module per block whose output is block *i*'s residual stream)."""
    inner = hf_model(model)
    if inner is not None:
        return inner, list(arch.get_blocks(inner))
    return model, [block.hook_resid_post for block in model.blocks]  # HookedTransformer


def _check_positions(positions) -> str | int:
    if positions in POSITION_NAMES or (
        isinstance(positions, int) and not isinstance(positions, bool) and positions >= 0
    ):
        return positions
    raise ValueError(f"positions={positions!r}: expected one of {POSITION_NAMES} or a non-negative int start")


@contextlib.contextmanager
def steer(
    model: nn.Module,
    vector: SteeringVector | Sequence[SteeringVector],
    alpha: float | Sequence[float] = 1.0,
    layers: Sequence[int] | None = None,
    positions: str | int = "all",
    mode: str = "add",
    preserve_norm: bool = False,
) -> Iterator[nn.Module]:
    """Steer ``model`` inside the ``with`` block; hooks are removed on exit, also on exceptions.

    ``vector`` may be a list of vectors (with one α each, or one α for all): they apply together.
    ``layers`` limits steering to some of the vector's layers. ``positions``: ``"all"``, ``"prompt"``,
    ``"generated"`` (tokens after the prompt, also under KV-cache generation) or an int: real tokens from
    that index on. Works on transformers, TransformerLens and nnsight models; contexts nest.
    """
    if not isinstance(vector, SteeringVector):
        vectors = list(vector)
        alphas = list(alpha) if isinstance(alpha, Sequence) else [alpha] * len(vectors)
        if not vectors or len(alphas) != len(vectors):
            raise ValueError(f"got {len(vectors)} vectors and {len(alphas)} alphas: expected one alpha per vector")
        with contextlib.ExitStack() as stack:
            for vec, a in zip(vectors, alphas, strict=True):
                stack.enter_context(steer(model, vec, a, layers, positions, mode, preserve_norm))
            yield model
        return
    alpha = finite(alpha)
    positions = _check_positions(positions)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    fp = fingerprint(model)
    vector.check_model(fp["hidden_size"], fp["num_hidden_layers"])
    chosen = vector.layers if layers is None else list(layers)
    missing = [layer for layer in chosen if layer not in vector]
    if missing:
        raise ValueError(f"layers {missing} are not in the vector (it has {vector.layers})")
    top, blocks = hook_targets(model)
    tracker = PositionTracker()
    cache: dict = {}

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            h = block_hidden(output)
            key = (layer, h.device, h.dtype)
            if key not in cache:
                v = vector[layer] * alpha if mode == "add" else vector[layer]
                cache[key] = v.to(device=h.device, dtype=h.dtype)
            selected = tracker.selection(h, positions)
            new = _modify(h, cache[key], alpha, mode, preserve_norm)
            if selected is not None:
                new = torch.where(selected.unsqueeze(-1), new, h)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    handles = [top.register_forward_pre_hook(tracker, with_kwargs=True)]
    try:
        handles += [blocks[layer].register_forward_hook(make_hook(layer)) for layer in chosen]
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _render(tok, prompt: str, chat: bool) -> str:
    """The prompt through the chat template when asked for and the tokenizer has one; else as given."""
    return chat_prompt(tok, prompt) if chat and getattr(tok, "chat_template", None) else prompt


def completions(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, **gen_kwargs) -> list[str]:
    """Completions of rendered prompts, left-padded batches (pad_batch: works without a pad token too)."""
    out = []
    device = model.get_input_embeddings().weight.device
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    for start in range(0, len(prompts), batch_size):
        input_ids, mask, _ = pad_batch(ids[start : start + batch_size], pad_id(tok), "left")
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id(tok),
                **gen_kwargs,
            )
        out += tok.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
    return out


def generate(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    vector: SteeringVector | None = None,
    alpha: float = 1.0,
    max_new_tokens: int = 48,
    layers: Sequence[int] | None = None,
    positions: str | int = "all",
    mode: str = "add",
    chat: bool = True,
    batch_size: int = 8,
    **gen_kwargs,
) -> list[dict]:
    """Unsteered and steered completions side by side: ``[{"prompt", "unsteered", "steered"}, ...]``.

    Greedy by default (pass ``do_sample=True`` etc. through ``gen_kwargs``); prompts go through the chat
    template when the tokenizer has one and ``chat`` is true. Without a vector only ``unsteered`` is filled.
    """
    if kind(model) != "hf":
        raise ValueError("steerkit.generate drives transformers models; use steer() around your backend's own generate")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    if vector is not None:  # fail before generating anything
        finite(alpha)
    rendered = [_render(tok, p, chat) for p in prompts]
    gen_kwargs.setdefault("do_sample", False)
    plain = completions(model, tok, rendered, max_new_tokens, batch_size, **gen_kwargs)
    rows = [{"prompt": p, "unsteered": u} for p, u in zip(prompts, plain, strict=True)]
    if vector is not None:
        with steer(model, vector, alpha, layers=layers, positions=positions, mode=mode):
            steered = completions(model, tok, rendered, max_new_tokens, batch_size, **gen_kwargs)
        for row, text in zip(rows, steered, strict=True):
            row["steered"] = text
    return rows
