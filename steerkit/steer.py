"""The inference applier: add / project out / clamp a direction at block outputs, through ``hooks.intervene``.

At the output of block *i*, on the selected positions: ``add`` h ← h + α·v_i; ``project_out``
h ← h − (h·v̂)v̂ (α unused); ``clamp`` sets h·v̂ to α. Padding is never steered, ``positions="generated"``
counts absolute positions under KV-cache generation, and a ``steer`` acts only on forwards run from the
thread or asyncio task that entered it. Weights are never touched; hooks go when the context exits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from steerkit import arch
from steerkit._checks import finite
from steerkit.backends import fingerprint, kind
from steerkit.batching import pad_batch, pad_id, prompt_ids
from steerkit.clamp import clamped
from steerkit.hooks import block_dtype, intervene
from steerkit.models import chat_prompt
from steerkit.vector import SteeringVector, as_vector

MODES = ("add", "project_out", "clamp", "clamp_feature")
POSITION_NAMES = ("all", "prompt", "generated")


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
    condition=None,
    sae=None,
) -> Iterator[nn.Module]:
    """Steer ``model`` inside the ``with`` block; hooks are removed on exit, also on exceptions.

    ``vector`` may be a list of vectors (with one α each, or one α for all): they apply together.
    ``layers`` limits steering to some of the vector's layers (a list or a spec such as ``"8-12"``).
    ``positions``: ``"all"``, ``"prompt"``, ``"generated"`` (tokens after the prompt, also under KV-cache
    generation) or an int: real tokens from that index on. Works on transformers, TransformerLens and
    nnsight models; contexts nest. Only forwards run from the calling thread (or asyncio task) are steered.
    α·v must be finite in the model's dtype (checked before any forward).

    ``condition`` (a ``steerkit.condition.Condition``, CAST): each row is steered only if the condition fires
    on its prompt, decided once per prompt from the mean of its prompt tokens at the condition's block. In the
    prompt itself only blocks after that one can be steered (the decision does not exist before it).

    ``mode="clamp_feature"`` (a vector from ``steerkit.features.feature_vector``, and its ``sae``): each of the
    vector's latents is held at activation α (see ``steerkit.clamp.clamped``).
    """
    if isinstance(vector, list | tuple):
        vectors = [as_vector(v) for v in vector]
        alphas = list(alpha) if isinstance(alpha, Sequence) else [alpha] * len(vectors)
        if not vectors or len(alphas) != len(vectors):
            raise ValueError(f"got {len(vectors)} vectors and {len(alphas)} alphas: expected one alpha per vector")
        with contextlib.ExitStack() as stack:
            for vec, a in zip(vectors, alphas, strict=True):
                stack.enter_context(steer(model, vec, a, layers, positions, mode, preserve_norm, condition, sae))
            yield model
        return
    vector = as_vector(vector)
    alpha, positions, chosen = _validated(model, vector, alpha, layers, positions, mode)
    if condition is not None:
        arch.validate_layer(condition.layer, fingerprint(model)["num_hidden_layers"])
    change = _feature_clamp(model, vector, alpha, chosen, sae) if mode == "clamp_feature" else None
    with intervene(model, _hooks(vector, alpha, chosen, positions, mode, preserve_norm, condition, change)):
        yield model


def _feature_clamp(model, vector: SteeringVector, alpha: float, chosen: list[int], sae):
    """The clamp of a feature vector's latents at α (``clamped``), after checking the vector and the SAE."""
    latents = (vector.metadata or {}).get("latents")
    if not hasattr(sae, "encode") or not hasattr(sae, "W_dec") or not latents or len(chosen) != 1:
        raise ValueError("mode='clamp_feature' needs a one-layer vector from steerkit.features.feature_vector (it "
                         "names its latents) and that SAE, loaded (steerkit.load_sae), as sae=")  # fmt: skip
    width = fingerprint(model)["hidden_size"]
    if sae.cfg.d_in != width:
        raise ValueError(f"the SAE reads d_in={sae.cfg.d_in} but the model's residual stream has width {width}")
    return clamped(sae, {int(i): alpha for i in latents})


def _hooks(vector: SteeringVector, alpha: float, chosen: list[int], positions, mode: str, preserve_norm: bool,
           condition, change=None) -> dict:  # fmt: skip
    """``{layer: fn(h, tracker)}`` for ``hooks.intervene``: each steers its block's output; with a condition, a
    read-only hook at the condition's block if none steers there."""
    decided: dict = {}  # CAST: "rows" -> bool [b], whether the condition fired on each row's prompt

    def make_fn(layer: int):
        cache: dict = {}

        def fn(h: torch.Tensor, tracker) -> torch.Tensor | None:
            key = (h.device, h.dtype)
            if key not in cache:
                cache[key] = scaled(vector, layer, alpha, mode, h.dtype).to(h.device)
            selected = tracker.selection(h, positions)
            if condition is not None:
                rows = _condition_rows(tracker, h, layer, condition, decided)
                if rows is None:
                    return None
                everywhere = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
                selected = (everywhere if selected is None else selected) & rows.unsqueeze(-1)
            new = change(h) if change is not None else _modify(h, cache[key], alpha, mode, preserve_norm)
            return new if selected is None else torch.where(selected.unsqueeze(-1), new, h)

        return fn

    fns = {layer: make_fn(layer) for layer in chosen}
    if condition is not None and condition.layer not in fns:  # a hook that only reads, at the condition's block

        def read(h: torch.Tensor, tracker) -> None:
            _condition_rows(tracker, h, condition.layer, condition, decided)

        fns[condition.layer] = read
    return fns


def _apply(self: SteeringVector, model, alpha: float = 1.0, **options):
    """``with vec.apply(model, alpha): ...`` steers like ``steerkit.steer(model, vec, alpha, **options)`` (the habit
    of steering-vectors users)."""
    return steer(model, self, alpha, **options)


SteeringVector.apply = _apply  # (given here, so that steerkit.vector imports no model code)


def _condition_rows(tracker, h: torch.Tensor, layer: int, condition, decided: dict) -> torch.Tensor | None:
    """CAST, per forward: at a prompt's forward the condition's block decides for each row (mean over the real
    prompt tokens); blocks before it get None (not steered in the prompt); later forwards reuse the decision."""
    step = tracker.step
    prompt_step = step is None or int(step.columns[0]) == 0
    if prompt_step and layer == condition.layer:
        valid = tracker.selection(h, "prompt")
        weights = (valid if valid is not None else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)).float()
        mean = (h.float() * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
        decided["rows"] = condition.fires(mean)
    if prompt_step and layer <= condition.layer or "rows" not in decided:
        return None
    rows = decided["rows"]
    return rows.to(h.device) if rows.shape[0] == h.shape[0] else None


def _validated(model, vector: SteeringVector, alpha, layers, positions, mode) -> tuple[float, str | int, list[int]]:
    """(α, positions, layers to steer) after every check ``steer`` makes before it touches the model."""
    alpha = finite(alpha)
    positions = _check_positions(positions)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    fp = fingerprint(model)
    vector.check_model(fp["hidden_size"], fp["num_hidden_layers"])
    chosen = vector.layers if layers is None else arch.layer_list(layers, fp["num_hidden_layers"])
    missing = [layer for layer in chosen if layer not in vector]
    if missing:
        raise ValueError(f"layers {missing} are not in the vector (it has {vector.layers})")
    for layer in chosen:  # α·v must be finite in the dtype it is added in
        scaled(vector, layer, alpha, mode, block_dtype(model, layer))
    return alpha, positions, chosen


def scaled(vector: SteeringVector, layer: int, alpha: float, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """The direction as the hook uses it (α·v for ``add``, v otherwise) in ``dtype``, or a ValueError when it
    (or the clamp target α) is not finite there: α = 1e39 overflows float32, α·v beyond 65504 float16."""
    v = vector[layer].double()
    out = (v * alpha if mode == "add" else v).to(dtype)
    target_ok = mode != "clamp" or bool(torch.isfinite(torch.tensor(alpha, dtype=torch.float64).to(dtype)))
    if not bool(torch.isfinite(out).all()) or not target_ok:
        raise ValueError(
            f"alpha={alpha:g} with the layer-{layer} direction (norm {float(vector[layer].norm()):.4g}, largest entry "
            f"{float(vector[layer].abs().max()):.4g}) is not finite in {str(dtype).removeprefix('torch.')} "
            f"(largest value {torch.finfo(dtype).max:.4g}): use a smaller alpha"
        )
    return out


def _render(tok, prompt: str, chat: bool, system: str | None = None) -> str:
    """The prompt through the chat template when asked for and the tokenizer has one; else as given."""
    return chat_prompt(tok, prompt, system) if chat and getattr(tok, "chat_template", None) else prompt


def completions(
    model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, return_finished: bool = False, **gen_kwargs
) -> list[str] | list[tuple[str, bool]]:
    """Completions of rendered prompts, left-padded batches (pad_batch: works without a pad token too).

    With ``num_return_sequences`` in ``gen_kwargs`` a prompt's samples are consecutive. ``return_finished``:
    (text, ended with an end-of-sequence token) pairs, so a scorer can tell an answer cut off by the budget.
    """
    out = []
    device = arch.input_device(model)
    ids = prompt_ids(tok, prompts)
    eos = gen_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos = torch.tensor(eos if isinstance(eos, list) else [tok.eos_token_id if eos is None else eos])
    for start in range(0, len(prompts), batch_size):
        input_ids, mask, _ = pad_batch(ids[start : start + batch_size], pad_id(tok), "left")
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id(tok),
                **gen_kwargs,
            )[:, input_ids.shape[1] :].cpu()
        texts = tok.batch_decode(generated, skip_special_tokens=True)
        finished = torch.isin(generated, eos).any(1).tolist()
        out += list(zip(texts, finished, strict=True)) if return_finished else texts
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
    system: str | None = None,
    seed: int | None = None,
    condition=None,
    **gen_kwargs,
) -> list[dict]:
    """Unsteered and steered completions side by side: ``[{"prompt", "unsteered", "steered"}, ...]``.

    Greedy by default (pass ``do_sample=True``, ``temperature`` etc. through ``gen_kwargs``; ``seed`` reseeds
    before each of the two runs, so sampled completions differ only by the steering). Prompts go through the
    chat template, after the ``system`` turn if given, when the tokenizer has one and ``chat`` is true.
    Without a vector only ``unsteered`` is filled. ``condition`` (CAST) steers only the prompts it fires on.
    """
    if kind(model) != "hf":
        raise ValueError("steerkit.generate drives transformers models; use steer() around your backend's own generate")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    if vector is not None:  # fail before generating anything
        vector = as_vector(vector)
        _validated(model, vector, alpha, layers, positions, mode)
    rendered = [_render(tok, p, chat, system) for p in prompts]
    gen_kwargs.setdefault("do_sample", False)

    def run() -> list[str]:
        if seed is not None:
            torch.manual_seed(seed)
        return completions(model, tok, rendered, max_new_tokens, batch_size, **gen_kwargs)

    plain = run()
    rows = [{"prompt": p, "unsteered": u} for p, u in zip(prompts, plain, strict=True)]
    if vector is not None:
        with steer(model, vector, alpha, layers=layers, positions=positions, mode=mode, condition=condition):
            steered = run()
        for row, text in zip(rows, steered, strict=True):
            row["steered"] = text
    return rows
