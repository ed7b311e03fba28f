"""The next token of each row: greedy, or sampled with temperature and top-p from the request's own seeded
generator; with the log-probabilities a request asked for (the model's distribution, before temperature and
top-p, as OpenAI and vLLM report them)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pick(row: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from float32 logits ``row``: the argmax at temperature 0, else a draw from ``generator``."""
    if temperature <= 0:
        return int(row.argmax())
    probs = torch.softmax(row / temperature, -1)
    if top_p < 1:
        ordered, index = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < top_p
        probs = torch.zeros_like(probs).scatter(0, index[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, requests: Sequence) -> list[dict]:
    """One token event per row of ``logits [b, vocab]``: ``{"token"}``, plus ``"logprob"`` and ``"top"`` (the
    ``request.logprobs`` most likely (token, log-probability) pairs) when the request asked for them."""
    logits = logits.float().cpu()
    events = []
    for row, request in zip(logits, requests, strict=True):
        if request.temperature > 0 and request.generator is None:
            request.generator = torch.Generator().manual_seed(request.seed if request.seed is not None else 0)
        event = {"token": pick(row, request.temperature, request.top_p, request.generator)}
        if request.logprobs is not None:
            logp = torch.log_softmax(row, -1)
            top = logp.topk(request.logprobs) if request.logprobs else None
            event["logprob"] = float(logp[event["token"]])
            event["top"] = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        events.append(event)
    return events
