"""Metrics on the first generated token (Højer et al.): KL(P₀ ‖ P_α), entropy, answer mass, option accuracy.

``next_token_logprobs`` runs prompts in length-sorted, left-padded batches (position ids count real tokens,
so each prompt gets its unpadded distribution) and returns float32 log-probabilities of the token after
each prompt; the LM head runs on the last position only. Everything else is arithmetic on those.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steerkit.arch import input_device
from steerkit.batching import length_batches, pad_batch, pad_id, prompt_ids


def next_token_logprobs(model, tok, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """``[N, vocab]`` float32 CPU log-probabilities of the next token after each prompt (``prompt_ids``)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    ids = prompt_ids(tok, prompts)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    device = input_device(model)
    side = getattr(tok, "padding_side", "right")
    with torch.inference_mode():
        for index in length_batches(ids, batch_size):
            input_ids, mask, pos = pad_batch([ids[i] for i in index], pad_id(tok), side)
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=pos.to(device),
                use_cache=False,
            ).logits
            last = torch.where(mask.bool(), torch.arange(mask.shape[1]), -1).max(-1).values
            rows = logits[torch.arange(len(index)), last.to(logits.device)].float().log_softmax(-1).cpu()
            for row, i in zip(rows, index, strict=True):
                out[i] = row
    return torch.stack(out)


def kl(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(P_ref ‖ P_other) per row, from log-probabilities ``[N, V]``."""
    return (reference.exp() * (reference - other)).sum(-1)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) per row of log-probabilities ``[N, V]``."""
    return -(logprobs.exp() * logprobs).sum(-1)


def option_token_ids(tok, options: Sequence[str], numeric: bool) -> list[int]:
    """First token of each option after the answer prefix (``prompt``: numbers follow "is ", words "is"),
    checked distinct."""
    firsts = [tok(("" if numeric else " ") + str(o), add_special_tokens=False)["input_ids"][0] for o in options]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"options {list(options)} do not have distinct first tokens: accuracy would be ambiguous")
    return firsts


def answer_metrics(logprobs: torch.Tensor, option_ids: Sequence[Sequence[int]], correct: Sequence[int]) -> dict:
    """Per row: probability mass on the correct option's first token and on the others, and whether the
    argmax over the options is correct. Returns tensors ``mass_correct``, ``mass_incorrect``, ``correct``."""
    probs = logprobs.exp()
    mass_c, mass_i, hit = [], [], []
    for row, ids, c in zip(probs, option_ids, correct, strict=True):
        opts = row[list(ids)]
        mass_c.append(opts[c])
        mass_i.append(opts.sum() - opts[c])
        hit.append(bool(opts.argmax() == c))
    return {"mass_correct": torch.stack(mass_c), "mass_incorrect": torch.stack(mass_i), "correct": torch.tensor(hit)}
