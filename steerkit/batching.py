"""Tokenizing, padding and length-sorted batches: what capture, generation and evaluation share."""

from __future__ import annotations

import warnings

import torch


def check_texts(texts) -> list[str]:
    """``texts`` as a non-empty list of non-empty strings, or an error naming the first bad one."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string (wrap it: [text])")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: expected at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise ValueError(f"texts[{i}] is {text!r}: expected a non-empty string")
    return texts


def prompt_ids(tok, prompts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts as the model expects them: with the tokenizer's own special tokens (Gemma's
    ``<bos>``), unless a chat template already wrote its BOS at the start of the text."""
    bos = getattr(tok, "bos_token", None)
    return [tok(p, add_special_tokens=not (bos and p.startswith(bos)))["input_ids"] for p in prompts]


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
