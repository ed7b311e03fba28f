"""Conditional activation steering (CAST, Lee et al. 2025): steer a prompt only when a condition direction fires.

A condition is a direction read from prompts that have a property and prompts that lack it (mean over each
prompt's tokens, pair-centred PCA by default, as IBM's code), a block, a threshold and a comparison. For a
prompt whose mean hidden state at that block is h, the similarity is IBM's
``cos(h, tanh(P h))`` with ``P = c cᵀ / cᵀc``; the condition fires when it is ``greater`` (or ``smaller``)
than the threshold. ``find_condition`` searches block × threshold × comparison for the best F1 on labelled
prompts (IBM's ``find_best_condition_point``); ``steer(..., condition=cond)`` decides per row, once from the
prompt, whether the behaviour vector applies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steerkit.data import Pair, load_condition_set
from steerkit.models import chat_prompt
from steerkit.vector import SteeringVector

COMPARATORS = ("greater", "smaller")


@dataclass
class Condition:
    """A condition direction at one block, with the threshold and comparison under which it fires."""

    direction: torch.Tensor
    layer: int
    threshold: float
    comparator: str = "greater"
    f1: float | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.direction = torch.as_tensor(self.direction).detach().float().cpu().flatten()
        if self.comparator not in COMPARATORS:
            raise ValueError(f"comparator={self.comparator!r}: expected one of {COMPARATORS}")
        if not torch.isfinite(self.direction).all() or float(self.direction.norm()) == 0:
            raise ValueError("a condition direction must be finite and non-zero")

    def similarity(self, h: torch.Tensor) -> torch.Tensor:
        """IBM's condition similarity of mean prompt states ``h [b, d]``: cos(h, tanh(P h)), P the projector on c."""
        c = self.direction.to(device=h.device, dtype=torch.float32)
        h = h.float()
        projected = torch.tanh((h @ c / (c @ c)).unsqueeze(-1) * c)
        return torch.nn.functional.cosine_similarity(h, projected, dim=-1)

    def fires(self, h: torch.Tensor) -> torch.Tensor:
        """Bool ``[b]``: whether the condition holds for each row's mean prompt state."""
        return compare(self.similarity(h), self.threshold, self.comparator)

    def predict(self, model, tok, prompts: Sequence[str], chat: bool = True) -> torch.Tensor:
        """Bool ``[N]``: whether the condition fires on each prompt (rendered as ``find_condition`` saw them)."""
        sims = similarities(model, tok, SteeringVector({self.layer: self.direction}), prompts, chat)
        return compare(sims[:, 0], self.threshold, self.comparator)

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """A safetensors file: the direction, and the layer, threshold, comparison and F1 as metadata."""
        from steerkit._io import save_safetensors

        meta = {"layer": self.layer, "threshold": self.threshold, "comparator": self.comparator, "f1": self.f1}
        meta = {k: json.dumps(v) for k, v in {**meta, "metadata": self.metadata}.items()}
        return save_safetensors({"condition": self.direction}, path, {"steerkit": "condition", **meta}, force=force)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Condition:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                direction = f.get_tensor("condition")
            values = {k: json.loads(meta[k]) for k in ("layer", "threshold", "comparator", "f1", "metadata")}
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a steerkit condition file ({err})") from None
        if meta.get("steerkit") != "condition":
            raise ValueError(f"{path} is not a steerkit condition file")
        return cls(direction, **values)


def compare(similarity: torch.Tensor, threshold: float, comparator: str) -> torch.Tensor:
    """Bool: where ``similarity`` is ``greater`` (or ``smaller``) than ``threshold``."""
    return similarity > threshold if comparator == "greater" else similarity < threshold


def _render(tok, prompts: Sequence[str], chat: bool) -> list[str]:
    return [chat_prompt(tok, p) if chat and getattr(tok, "chat_template", None) else p for p in prompts]


def extract_condition(
    model,
    tok,
    positives: Sequence[str],
    negatives: Sequence[str],
    layers=None,
    method: str = "pca_center",
    chat: bool = True,
    batch_size: int = 16,
) -> SteeringVector:
    """Condition directions per block from prompts that have a property (``positives``) and lack it: the
    prompts' mean hidden states, paired in order, through ``extract`` (pair-centred PCA, as IBM's code)."""
    from steerkit.extract import extract

    if not positives or not negatives:
        raise ValueError("extract_condition needs prompts with the property and prompts without it")
    pos, neg = _render(tok, positives, chat), _render(tok, negatives, chat)
    pairs = [Pair(p, n) for p, n in zip(pos, neg, strict=False)]
    vector = extract(model, tok, pairs, layers=layers, method=method, position="mean", batch_size=batch_size)
    vector.metadata["condition"] = {"chat": chat}
    return vector


def similarities(model, tok, vector: SteeringVector, prompts: Sequence[str], chat: bool = True) -> torch.Tensor:
    """``[N, L]``: each prompt's condition similarity at each of the vector's layers."""
    from steerkit.capture import capture

    acts = capture(model, tok, _render(tok, prompts, chat), vector.layers, position="mean")
    return torch.stack(
        [Condition(vector[layer], layer, 0.0).similarity(acts[:, j]) for j, layer in enumerate(vector.layers)], 1
    )


def f1(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """F1 of boolean predictions against boolean labels (0 when nothing is predicted or true)."""
    tp = float((predicted & truth).sum())
    precision = tp / max(float(predicted.sum()), 1.0)
    recall = tp / max(float(truth.sum()), 1.0)
    return 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)


def find_condition(
    model,
    tok,
    vector: SteeringVector,
    positives: Sequence[str],
    negatives: Sequence[str],
    steps: int = 200,
    chat: bool = True,
) -> Condition:
    """The block, threshold and comparison with the best F1 at telling ``positives`` from ``negatives``
    (IBM's grid search; thresholds span each block's observed similarities in ``steps`` steps)."""
    sims = similarities(model, tok, vector, [*positives, *negatives], chat)
    truth = torch.tensor([True] * len(positives) + [False] * len(negatives))
    best = (-1.0, None)
    for j, layer in enumerate(vector.layers):
        column = sims[:, j]
        for threshold in torch.linspace(float(column.min()), float(column.max()), steps).tolist():
            for comparator in COMPARATORS:
                score = f1(compare(column, threshold, comparator), truth)
                if score > best[0]:
                    best = (score, (layer, threshold, comparator))
    layer, threshold, comparator = best[1]
    meta = {"chat": chat, "searched_layers": vector.layers, "n": len(truth)}
    return Condition(vector[layer], layer, threshold, comparator, best[0], meta)


def condition_prompts(name: str = "cooking", split: str | None = None) -> tuple[list[str], list[str]]:
    """(prompts with the property, prompts without) of a condition set, bundled or a .jsonl path; one split."""
    rows = load_condition_set(name, split)
    return [r["text"] for r in rows if r["label"]], [r["text"] for r in rows if not r["label"]]
