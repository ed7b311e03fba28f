"""Contrastive pairs: bundled sets (jsonl beside this file), user files, and a persona-template builder.

A pair set is a ``.jsonl`` file of ``{"positive": ..., "negative": ...}`` lines, optionally with
``"split": "train" | "test"``; the bundled sets hold out every fifth pair as ``test``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from steerkit._io import iter_jsonl
from steerkit.models import chat_prompt

DATA_DIR = Path(__file__).resolve().parent
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Pair:
    """Two texts that differ in the behaviour of interest: ``positive`` shows it, ``negative`` its opposite."""

    positive: str
    negative: str
    split: str = "train"

    def __post_init__(self):
        for side in ("positive", "negative"):
            if not isinstance(getattr(self, side), str) or not getattr(self, side):
                raise ValueError(f"Pair.{side} must be a non-empty string, got {getattr(self, side)!r}")
        if self.split not in SPLITS:
            raise ValueError(f"Pair.split is {self.split!r}: expected one of {SPLITS}")


CONDITION_SPLITS = ("train", "val", "test")


def load_condition_set(name: str = "cooking", split: str | None = None) -> list[dict]:
    """Rows ``{"text", "label", "split"}`` of a bundled condition set (``steerkit/data/conditions``) or a
    ``.jsonl`` path: prompts with (label 1) and without (0) a property, split train / val / test."""
    path = Path(name)
    if not path.suffix:
        path = DATA_DIR / "conditions" / f"{name}.jsonl"
    if not path.is_file():
        names = sorted(p.stem for p in (DATA_DIR / "conditions").glob("*.jsonl"))
        raise FileNotFoundError(f"no condition set {name!r}: bundled sets are {names}, or pass a .jsonl path")

    if split not in (None, *CONDITION_SPLITS):
        raise ValueError(f"split={split!r}: expected one of {CONDITION_SPLITS} or None")

    def parse(row: dict) -> dict:
        text, label, part = row["text"], row["label"], row.get("split", "train")
        if not isinstance(text, str) or label not in (0, 1) or part not in CONDITION_SPLITS:
            raise ValueError("bad field")
        return {"text": text, "label": int(label), "split": part}

    rows = list(iter_jsonl(path, parse, "a JSON object with 'text', 'label' (0/1) and 'split'"))
    return [r for r in rows if split is None or r["split"] == split]


def bundled_sets() -> list[str]:
    """Names of the pair sets that ship with steerkit."""
    return sorted(p.stem for p in DATA_DIR.glob("*.jsonl"))


def load_pairs(name_or_path: str | Path, split: str | None = None) -> list[Pair]:
    """Pairs of a bundled set (``"sentiment"``, ...) or of a ``.jsonl`` file; ``split`` keeps one split."""
    path = Path(name_or_path)
    if not path.suffix and str(name_or_path) in bundled_sets():
        path = DATA_DIR / f"{name_or_path}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"no pair set {str(name_or_path)!r}: bundled sets are {bundled_sets()}, or pass a .jsonl path"
        )
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS} or None")
    pairs = list(
        iter_jsonl(
            path,
            lambda row: Pair(row["positive"], row["negative"], row.get("split", "train")),
            "a JSON object with string 'positive' and 'negative' fields",
        )
    )
    check_pairs(pairs)
    return [p for p in pairs if split is None or p.split == split]


def as_pairs(pairs: Iterable) -> list[Pair]:
    """Pairs from ``Pair`` objects or ``(positive, negative[, split])`` tuples, checked (see ``check_pairs``)."""
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, tuple | list) and len(pair) in (2, 3):
            pair = Pair(*pair)
        if not isinstance(pair, Pair):
            raise TypeError(f"pairs[{i}] is {pair!r}: expected a steerkit.Pair or a (positive, negative) tuple")
        out.append(pair)
    check_pairs(out)
    return out


def check_pairs(pairs: Sequence[Pair]) -> None:
    """Refuse an empty list, or pairs whose two sides are identical (nothing to contrast)."""
    if not pairs:
        raise ValueError("the pair list is empty: extraction needs at least one positive/negative pair")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Pair):
            raise TypeError(f"pairs[{i}] is {type(pair).__name__}: expected steerkit.Pair")
    if all(p.positive == p.negative for p in pairs):
        raise ValueError("every pair has identical positive and negative texts: there is nothing to contrast")


def pairs_hash(pairs: Iterable[Pair]) -> str:
    """A short content hash of a pair list, recorded in vector metadata."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.positive, pair.negative]).encode())
    return digest.hexdigest()[:16]


def persona_pairs(
    tok,
    positive_personas: Sequence[str],
    negative_personas: Sequence[str],
    suffixes: Sequence[str],
    template: str = "Act as if you are {persona}.",
    holdout_every: int = 5,
) -> list[Pair]:
    """Persona templates × suffixes through the tokenizer's chat template (as repeng builds its datasets).

    Each (persona pair, suffix) becomes a user turn ``template.format(persona=...)`` followed by the
    assistant's reply starting with ``suffix``; every ``holdout_every``-th pair is held out as ``test``.
    """
    if len(positive_personas) != len(negative_personas) or not positive_personas:
        raise ValueError("positive_personas and negative_personas must be non-empty and of equal length")
    if not suffixes:
        raise ValueError("suffixes is empty")

    def render(persona: str, suffix: str) -> str:
        return chat_prompt(tok, template.format(persona=persona)) + suffix

    pairs = []
    for suffix in suffixes:
        for pos, neg in zip(positive_personas, negative_personas, strict=True):
            split = "test" if holdout_every and len(pairs) % holdout_every == holdout_every - 1 else "train"
            pairs.append(Pair(render(pos, suffix), render(neg, suffix), split))
    return pairs
