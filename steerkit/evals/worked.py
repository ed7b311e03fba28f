"""Worked arithmetic: a task the model answers in generated text, scored by its first stated answer.

Each item is a one- or two-step add/subtract word problem whose gold solution writes the calculation and
then the answer ("23 + 7 = 30. The answer is 30."). Prompts carry one solved example as a preceding chat
exchange and no forced answer prefix, so the model reasons in text before it answers. The scorer reads the
integer after the *first* "The answer is"; a generation cut off by the token budget before it stated an
answer is *truncated* and wrong. Splits are drawn from their own seeds and share no question.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from steerkit.evals.tasks import ITEMS, NAMES, Item, _distractors

SYSTEM = "Solve the problem. Write the calculation, then the answer."
EXAMPLE = ("Mia has 12 pens. Mia gets 5 more. How many pens does Mia have now?", "12 + 5 = 17. The answer is 17.")
SPLITS = {"confirm": 1000, "test": 1000, "val": 200, "train": 2000}  # drawn in this order, each seed its own
HARD_SPLITS = {"confirm": 500, "test": 500, "val": 200}  # two-step items: evaluation only


@dataclass(frozen=True)
class TaskConfig:
    """The number ranges of a worked-arithmetic task: start in [low, high], each step's operand in
    [1, step_high] (a subtraction never takes the count below zero)."""

    low: int = 5
    high: int = 40
    step_high: int = 20

    def __post_init__(self):
        if not 0 <= self.low <= self.high or self.step_high < 1:
            raise ValueError(f"{self}: expected 0 <= low <= high and step_high >= 1")


def _item(rng: random.Random, steps: int, config: TaskConfig) -> Item:
    name, thing = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(config.low, config.high)
    text, lines = f"{name} has {total} {thing}.", []
    for _ in range(steps):
        if rng.random() < 0.5 or total < 2:
            x = rng.randint(1, config.step_high)
            text += f" {name} gets {x} more."
            lines.append(f"{total} + {x} = {total + x}.")
            total += x
        else:
            x = rng.randint(1, min(config.step_high, total - 1))
            text += f" {name} gives away {x}."
            lines.append(f"{total} - {x} = {total - x}.")
            total -= x
    solution = " ".join(lines) + f" The answer is {total}."
    question = f"{text} How many {thing} does {name} have now?"
    options = [str(total), *_distractors(rng, total)]
    rng.shuffle(options)
    meta = {"steps": steps, "solution": solution, "expression": " ".join(lines)}
    return Item(question, str(total), tuple(options), "worked", meta)


def worked_splits(
    steps: int = 1, config: TaskConfig = TaskConfig(), sizes: dict[str, int] | None = None, seed: int = 0
) -> dict[str, list[Item]]:
    """Disjoint splits of ``steps``-step items: each split from its own seed, drawn in the order of ``sizes``
    (held-out sets first, so they do not depend on the training size), no question in two splits."""
    if steps not in (1, 2):
        raise ValueError(f"steps={steps}: expected 1 or 2")
    sizes = SPLITS if sizes is None else sizes
    taken: set[str] = set()
    out = {}
    for split, n in sizes.items():
        rng = random.Random(f"worked-{steps}-{config}-{split}-{seed}")
        items: list[Item] = []
        for _ in range(100 * n + 1000):
            if len(items) == n:
                break
            item = _item(rng, steps, config)
            if item.question not in taken:
                taken.add(item.question)
                items.append(item)
        else:
            raise ValueError(f"{config} has too few distinct {steps}-step questions for {sizes}")
        out[split] = items
    return out


def messages(item: Item | str, example: str = "turn", system: str = SYSTEM) -> list[dict]:
    """The chat: instruction (``system``), the solved example, the question. ``example="turn"`` puts the example
    in a user/assistant exchange before the question, ``"system"`` inside the system prompt."""
    question = item.question if isinstance(item, Item) else item
    if example == "system":
        system = f"{system}\nExample:\nQuestion: {EXAMPLE[0]}\nAnswer: {EXAMPLE[1]}"
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]
    if example != "turn":
        raise ValueError(f"example={example!r}: expected 'turn' or 'system'")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": EXAMPLE[0]},
        {"role": "assistant", "content": EXAMPLE[1]},
        {"role": "user", "content": question},
    ]


def render(tok, item: Item | str, example: str = "turn", system: str = SYSTEM) -> str:
    """``messages`` through the chat template, the assistant turn opened and left empty."""
    return tok.apply_chat_template(messages(item, example, system), tokenize=False, add_generation_prompt=True)


_ANSWER = re.compile(r"The answer is\s*(-?\d[\d,]*)")


def first_answer(text: str, finished: bool = True) -> int | None:
    """The integer after the first "The answer is"; None when there is none, or when the generation was cut
    off (``finished`` false) right after the digits, which may then be incomplete."""
    m = _ANSWER.search(text)
    if m is None or (not finished and m.end() == len(text)):
        return None
    return int(m.group(1).replace(",", ""))


@dataclass(frozen=True)
class Scored:
    """One graded generation: ``truncated`` = the budget ran out before an answer was stated."""

    correct: bool
    answer: int | None
    truncated: bool


def score_worked(text: str, finished: bool, item: Item) -> Scored:
    """Grade one generation of ``item`` (``finished``: it ended with an end-of-sequence token)."""
    answer = first_answer(text, finished)
    return Scored(answer is not None and answer == int(item.answer), answer, answer is None and not finished)


def grade_worked(texts: Sequence[str], finished: Sequence[bool], items: Sequence[Item]) -> dict:
    """Accuracy over items, with the truncation rate and the share of finished answers that state none."""
    if not (len(texts) == len(finished) == len(items)) or not items:
        raise ValueError(f"got {len(texts)} texts, {len(finished)} flags, {len(items)} items: expected equal, > 0")
    scored = [score_worked(t, f, it) for t, f, it in zip(texts, finished, items, strict=True)]
    n = len(scored)
    return {
        "accuracy": sum(s.correct for s in scored) / n,
        "correct": [s.correct for s in scored],
        "truncated": sum(s.truncated for s in scored) / n,
        "unanswered": sum(s.answer is None and not s.truncated for s in scored) / n,
        "n": n,
    }


def trivial_baselines(train: Sequence[Item], items: Sequence[Item]) -> dict[str, float]:
    """Accuracy of answers that need no arithmetic: the commonest training answer, and echoing the first or
    the last number of the question."""
    counts: dict[str, int] = {}
    for it in train:
        counts[it.answer] = counts.get(it.answer, 0) + 1
    common = max(counts, key=counts.get)
    numbers = [re.findall(r"\d+", it.question) for it in items]
    return {
        "most_common_train_answer": sum(it.answer == common for it in items) / len(items),
        "first_number": sum(it.answer == nums[0] for it, nums in zip(items, numbers, strict=True)) / len(items),
        "last_number": sum(it.answer == nums[-1] for it, nums in zip(items, numbers, strict=True)) / len(items),
    }
