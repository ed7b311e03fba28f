"""Read the residual stream: forward hooks on decoder blocks, token-position selectors, batching, early exit.

``capture`` returns float32 CPU activations ``[N, len(layers), d_model]`` for transformers, TransformerLens
and nnsight models alike. The forward pass ends right after the deepest requested block, so the rest of
the model (final norm, LM head) never runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from steerkit import arch
from steerkit.backends import runner_for

Position = Literal["last", "mean", "all"] | int
POSITIONS = ("last", "mean", "all")


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; a ``Recorder(stop=True)`` swallows it."""


def block_hidden(output) -> torch.Tensor:
    """The hidden-state tensor in a block's output (blocks return a tensor or a tuple starting with one)."""
    return output[0] if isinstance(output, tuple | list) else output


class Recorder:
    """Record the outputs of chosen decoder blocks of a transformers model on every forward pass.

    >>> with Recorder(model, [3, 5]) as rec:
    ...     model(**batch)
    >>> rec[3].shape  # [batch, seq, d_model], detached, in the model's dtype and device

    Several forward calls (a KV-cache generation) are concatenated along the sequence. With ``stop=True``
    the forward ends after the deepest recorded block: the call raises ``StopForward`` and the ``with``
    block swallows it, so code after the call inside the block does not run.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], stop: bool = False, blocks: str | None = None):
        self.model = model
        self.layers = [arch.check_layer(model, layer, blocks) for layer in layers]
        self.stop = stop
        self._blocks = arch.get_blocks(model, blocks)
        self._handles: list = []
        self.records: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def _hook(self, layer: int, last: bool):
        def hook(_module, _inputs, output):
            self.records[layer].append(block_hidden(output).detach())
            if last:
                raise StopForward

        return hook

    def __enter__(self) -> Recorder:
        deepest = max(self.layers)
        for layer in set(self.layers):
            hook = self._hook(layer, last=self.stop and layer == deepest)
            self._handles.append(self._blocks[layer].register_forward_hook(hook))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def __getitem__(self, layer: int) -> torch.Tensor:
        chunks = self.records[layer]
        if not chunks:
            raise KeyError(f"nothing recorded at layer {layer}: run the model inside the with-block")
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


@dataclass
class _HFRunner:
    """Runs a transformers model up to the deepest requested block through a stopping Recorder."""

    model: nn.Module
    blocks: str | None = None
    padding_side: str | None = None  # follow the tokenizer: position ids make either side exact
    tokenizer: object = None
    n_layers: int = field(init=False)
    context_length: int | None = field(init=False)

    def __post_init__(self):
        self.n_layers = (
            arch.num_layers(self.model) if self.blocks is None else len(arch.get_blocks(self.model, self.blocks))
        )
        self.context_length = arch.context_length(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def run(self, input_ids, attention_mask, position_ids, layers) -> dict[int, torch.Tensor]:
        with Recorder(self.model, layers, stop=True, blocks=self.blocks) as rec:
            self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return {layer: rec[layer] for layer in layers}


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string (wrap it: [text])")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: capture needs at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ValueError(f"texts[{i}] is {text!r}: expected a non-empty string")
    return texts


def _check_layers(layers, n_layers: int) -> list[int]:
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise ValueError(f"layers is empty: pass block indices in 0..{n_layers - 1}")
    return [arch.validate_layer(layer, n_layers) for layer in layers]


def tokenize(
    tok, texts: list[str], max_length: int | None, truncate: bool, add_special_tokens: bool = True
) -> list[list[int]]:
    """Token ids per text; a text over ``max_length`` is cut (with a warning) or refused."""
    ids = tok(texts, add_special_tokens=add_special_tokens)["input_ids"]
    if max_length is not None:
        long = [i for i, row in enumerate(ids) if len(row) > max_length]
        if long and not truncate:
            raise ValueError(
                f"{len(long)} text(s) exceed the context of {max_length} tokens (first: texts[{long[0]}] with "
                f"{len(ids[long[0]])} tokens); pass truncate=True to cut them or max_length= to change the limit"
            )
        if long:
            warnings.warn(f"truncated {len(long)} text(s) to {max_length} tokens", stacklevel=3)
            ids = [row[:max_length] for row in ids]
    if any(len(row) == 0 for row in ids):
        raise ValueError("a text tokenized to zero tokens")
    return ids


def pad_batch(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` for a batch padded on ``side``.

    Position ids count real tokens only, so a left-padded text sees the same positions as when run alone.
    """
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def length_batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``ids`` grouped into batches of similar length (shortest first), so padding costs little."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def pad_id(tok) -> int:
    """The id to pad with: pad, else eos, else unk (padding is masked, so any id would do)."""
    for tid in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
        if tid is not None:
            return int(tid)
    return 0  # masked out everywhere, so any id will do


def select_positions(hidden: torch.Tensor, mask: torch.Tensor, position: Position, text_ids=None) -> torch.Tensor:
    """Reduce ``hidden [b, s, d]`` over real tokens (``mask [b, s]``) to ``[b, d]`` (or ``[T, d]`` for ``"all"``).

    ``text_ids`` names the rows in error messages (row numbers by default).
    """
    mask = mask.to(hidden.device).bool()
    if position == "all":
        return hidden[mask]
    if position == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)
    seq = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, seq, -1).max(-1).values
    if position == "last":
        index = last
    else:
        first = torch.where(mask, seq, mask.shape[1]).min(-1).values
        index = first + position if position >= 0 else last + 1 + position
        bad = ((index < first) | (index > last)).nonzero().flatten()
        if len(bad):
            row = int(bad[0])
            raise ValueError(
                f"position {position} is outside texts[{text_ids[row] if text_ids else row}], which has "
                f"{int(last[row] - first[row] + 1)} tokens"
            )
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def capture(
    model: nn.Module,
    tok=None,
    texts: Sequence[str] = (),
    layers: int | Sequence[int] = (),
    position: Position = "last",
    batch_size: int = 16,
    max_length: int | None = None,
    truncate: bool = False,
    blocks: str | None = None,
    progress: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Residual-stream activations after blocks ``layers`` for each text: float32 CPU ``[N, len(layers), d_model]``.

    ``position``: ``"last"`` (last real token), ``"mean"`` (mean over real tokens), an int (index among the
    real tokens; negative counts from the end) or ``"all"`` (every real token: returns ``(acts [T, L, d], rows [T])``
    with the text index of each row). Works on transformers, TransformerLens and nnsight models; ``tok``
    defaults to the model's own tokenizer where it has one. Texts longer than the context (or ``max_length``)
    raise unless ``truncate=True``. Texts are batched by length, so padding costs little.
    """
    if not (position in POSITIONS or (isinstance(position, int) and not isinstance(position, bool))):
        raise ValueError(f"position={position!r}: expected one of {POSITIONS} or an int token index")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive int")
    texts = _check_texts(texts)
    runner = runner_for(model, blocks) or _HFRunner(model, blocks)
    tok = tok if tok is not None else runner.tokenizer
    if tok is None:
        raise ValueError("no tokenizer: pass tok=")
    layers = _check_layers(layers, runner.n_layers)
    ids = tokenize(tok, texts, max_length or runner.context_length, truncate)
    side = runner.padding_side or getattr(tok, "padding_side", "right")
    unique = sorted(set(layers))
    out: list[torch.Tensor | None] = [None] * len(texts)
    batches = length_batches(ids, batch_size)
    bar = tqdm(total=len(batches), desc="capture", disable=(not progress) if progress is not None else None)
    with torch.inference_mode(), bar:
        for index in batches:
            input_ids, mask, pos = pad_batch([ids[i] for i in index], pad_id(tok), side)
            device = runner.device
            hidden = runner.run(input_ids.to(device), mask.to(device), pos.to(device), unique)
            per_layer = [select_positions(hidden[layer], mask, position, index).float().cpu() for layer in layers]
            stacked = torch.stack(per_layer, dim=-2)  # [b, L, d] or [T, L, d]
            if position == "all":
                counts = mask.sum(-1).tolist()
                for i, chunk in zip(index, stacked.split(counts), strict=True):
                    out[i] = chunk
            else:
                for row, i in enumerate(index):
                    out[i] = stacked[row]
            bar.update()
    if position == "all":
        rows = torch.cat([torch.full((len(chunk),), i, dtype=torch.long) for i, chunk in enumerate(out)])
        return torch.cat(out), rows
    return torch.stack(out)
