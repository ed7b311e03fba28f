"""Read the residual stream: forward hooks on decoder blocks, token-position selectors, batching, early exit.

``capture`` returns float32 CPU activations ``[N, len(layers), d_model]`` for transformers, TransformerLens
and nnsight models alike. The forward pass ends right after the deepest requested block, so the rest of
the model (final norm, LM head) never runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from steerkit import arch
from steerkit.backends import fingerprint, runner_for
from steerkit.batching import check_texts, length_batches, pad_batch, pad_id, tokenize
from steerkit.distributed import all_gather, interleave, world
from steerkit.hooks import StopForward, intervene

Position = Literal["last", "mean", "all"] | int
POSITIONS = ("last", "mean", "all")


class Recorder:
    """Record the outputs of chosen decoder blocks of a transformers model on every forward pass.

    >>> with Recorder(model, [3, 5]) as rec:
    ...     model(**batch)
    >>> rec[3].shape  # [batch, seq, d_model], detached, in the model's dtype and device

    Several forward calls (a KV-cache generation) are concatenated along the sequence. With ``stop=True``
    the forward ends after the deepest recorded block: the call raises ``StopForward`` and the ``with``
    block swallows it, so code after the call inside the block does not run. Only forwards run from the
    thread (or asyncio task) that entered the recorder are recorded.
    """

    def __init__(self, model: nn.Module, layers, stop: bool = False, blocks: str | None = None):
        self.model = model
        self.layers = sorted(set(arch.layer_list(layers, len(arch.get_blocks(model, blocks)), repeats=True)))
        self.stop = stop
        self.blocks = blocks
        self._context = None
        self.records: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def _fn(self, layer: int, last: bool):
        def record(h, _tracker):
            self.records[layer].append(h.detach())
            if last:
                raise StopForward

        return record

    def __enter__(self) -> Recorder:
        deepest = max(self.layers)
        fns = {layer: self._fn(layer, last=self.stop and layer == deepest) for layer in self.layers}
        self._context = intervene(self.model, fns, self.blocks)
        self._context.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        context, self._context = self._context, None
        context.__exit__(exc_type, exc, tb)
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
        return arch.input_device(self.model)

    def run(self, input_ids, attention_mask, position_ids, layers) -> dict[int, torch.Tensor]:
        with Recorder(self.model, layers, stop=True, blocks=self.blocks) as rec:
            self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return {layer: rec[layer] for layer in layers}


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
    device: str | torch.device | None = "cpu",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Residual-stream activations after blocks ``layers`` for each text: float32 ``[N, len(layers), d_model]``.

    ``position``: ``"last"`` (last real token), ``"mean"`` (mean over real tokens), an int (index among the
    real tokens; negative counts from the end) or ``"all"`` (every real token: returns ``(acts [T, L, d], rows [T])``
    with the text index of each row). Works on transformers, TransformerLens and nnsight models, also split
    across devices by accelerate; ``tok`` defaults to the model's own tokenizer where it has one. Texts longer
    than the context (or ``max_length``) raise unless ``truncate=True``. Texts are batched by length, so
    padding costs little. ``device``: where the result goes (the CPU by default; None keeps each batch where
    the model computed it). Under ``torchrun`` each rank captures every W-th text and every rank returns all.
    """
    if not (position in POSITIONS or (isinstance(position, int) and not isinstance(position, bool))):
        raise ValueError(f"position={position!r}: expected one of {POSITIONS} or an int token index")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive int")
    texts = check_texts(texts)
    runner = runner_for(model, blocks) or _HFRunner(model, blocks)
    tok = tok if tok is not None else runner.tokenizer
    if tok is None:
        raise ValueError("no tokenizer: pass tok=")
    layers = arch.layer_list(layers, runner.n_layers, repeats=True)
    rank, size = world()
    mine = list(range(rank, len(texts), size))  # this rank's share: every W-th text
    ids = tokenize(tok, [texts[i] for i in mine], max_length or runner.context_length, truncate) if mine else []
    quiet = rank != 0 or ((not progress) if progress is not None else None)  # None: tqdm decides (a terminal?)
    out = _run(runner, tok, ids, mine, layers, position, batch_size, device, quiet)
    if size > 1:
        out = _gather(out, len(layers), fingerprint(model)["hidden_size"], position == "all")
    if position == "all":
        rows = torch.cat([torch.full((len(chunk),), i, dtype=torch.long) for i, chunk in enumerate(out)])
        return torch.cat(out), rows
    return torch.stack(out)


def _run(runner, tok, ids: list, names: list[int], layers: list[int], position, batch_size: int, device,
         quiet: bool | None) -> list[torch.Tensor]:  # fmt: skip
    """This rank's texts (token ``ids``; ``names`` their indices in the caller's list) in length-sorted batches:
    per text a ``[L, d]`` (``[T, L, d]`` for ``"all"``) of the selected positions."""
    side = runner.padding_side or getattr(tok, "padding_side", "right")
    unique = sorted(set(layers))
    out: list[torch.Tensor | None] = [None] * len(ids)
    batches = length_batches(ids, batch_size)
    bar = tqdm(total=len(batches), desc="capture", disable=quiet)
    with torch.inference_mode(), bar:
        for index in batches:
            input_ids, mask, pos = pad_batch([ids[i] for i in index], pad_id(tok), side)
            at = runner.device
            hidden = runner.run(input_ids.to(at), mask.to(at), pos.to(at), unique)
            rows = [names[i] for i in index]  # rows in error messages are the caller's text indices
            per_layer = [select_positions(hidden[layer], mask, position, rows).float() for layer in layers]
            stacked = torch.stack(per_layer, dim=-2)  # [b, L, d] or [T, L, d]
            stacked = stacked if device is None else stacked.to(device)
            chunks = stacked.split(mask.sum(-1).tolist()) if position == "all" else stacked
            for i, chunk in zip(index, chunks, strict=True):
                out[i] = chunk
            bar.update()
    return out


def _gather(mine: list[torch.Tensor], n_layers: int, width: int, ragged: bool) -> list[torch.Tensor]:
    """Every rank's per-text results, in input order (rank r held texts r, r + W, ...)."""
    device = mine[0].device if mine else torch.device("cpu")
    if not ragged:
        local = torch.stack(mine) if mine else torch.empty((0, n_layers, width), device=device)
        return interleave(all_gather(local, "gathering captured activations"))
    lengths = torch.tensor([len(chunk) for chunk in mine], dtype=torch.long)
    local = torch.cat(mine) if mine else torch.empty((0, n_layers, width), device=device)
    rows, counts = all_gather(local, "gathering captured activations"), all_gather(lengths)
    return interleave([list(r.split(c.tolist())) for r, c in zip(rows, counts, strict=True)])
