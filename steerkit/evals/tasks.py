"""Seeded generators of verifiable reasoning items, and a scorer for free-form answers.

Each item has a question, an exact answer and distractor options whose first characters differ, so that
first-token accuracy (argmax over the options' first tokens, Højer et al.) is well defined. ``prompt``
renders an item through the chat template with the assistant turn opened by ``ANSWER_PREFIX``, so the next
token is the answer's first token.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from steerkit._io import iter_jsonl
from steerkit.models import chat_prompt

ANSWER_PREFIX = "The answer is"
NAMES = ["Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Grace", "Ivan", "Lena", "Kofi", "Nina"]
ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cookies", "stamps", "shells", "cards"]
ANIMALS = [("cat", "cats"), ("wolf", "wolves"), ("mouse", "mice"), ("sheep", "sheep"), ("lion", "lions")]


@dataclass(frozen=True)
class Item:
    """One verifiable question: ``answer`` is exact; ``options`` holds it and distractors."""

    question: str
    answer: str
    options: tuple[str, ...]
    kind: str
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def correct_index(self) -> int:
        return self.options.index(self.answer)

    @property
    def numeric(self) -> bool:
        return self.answer.lstrip("-").isdigit()


def _distractors(rng: random.Random, answer: int, k: int = 3) -> list[str]:
    """Numbers near ``answer`` whose first digit differs from it and from each other."""
    used = {str(answer)[0]}
    out = []
    for delta in rng.sample([d for d in range(-30, 31) if d], 60):
        cand = answer + delta
        if cand >= 0 and str(cand)[0] not in used:
            used.add(str(cand)[0])
            out.append(str(cand))
        if len(out) == k:
            break
    return out


def arithmetic(n: int, steps: int = 2, seed: int = 0) -> list[Item]:
    """Add/subtract word problems with ``steps`` operations after the start (1–3)."""
    if steps not in (1, 2, 3):
        raise ValueError(f"steps={steps}: expected 1, 2 or 3")
    rng = random.Random(f"arithmetic-{steps}-{seed}")
    items = []
    for _ in range(n):
        name, thing = rng.choice(NAMES), rng.choice(ITEMS)
        total = rng.randint(5, 40)
        text = f"{name} has {total} {thing}."
        for _ in range(steps):
            if rng.random() < 0.5 or total < 4:
                x = rng.randint(2, 20)
                text += f" {name} gets {x} more."
                total += x
            else:
                x = rng.randint(1, total - 1)
                text += f" {name} gives away {x}."
                total -= x
        question = f"{text} How many {thing} does {name} have now? Answer with a number."
        options = [str(total), *_distractors(rng, total)]
        rng.shuffle(options)
        items.append(Item(question, str(total), tuple(options), "arithmetic", {"steps": steps}))
    return items


def deduction(n: int, seed: int = 0) -> list[Item]:
    """bAbI-15-style deduction: what is a named animal afraid of, given rules about its kind."""
    rng = random.Random(f"deduction-{seed}")
    items = []
    for _ in range(n):
        kinds = rng.sample(ANIMALS, 4)
        fears = kinds[1:] + kinds[:1]  # each kind fears the next
        rules = [f"{k[1].capitalize()} are afraid of {f[1]}." for k, f in zip(kinds, fears, strict=True)]
        rng.shuffle(rules)
        who, (kind, fear) = rng.choice(NAMES), rng.choice(list(zip(kinds, fears, strict=True)))
        question = " ".join(rules) + f" {who} is a {kind[0]}. What is {who} afraid of? Answer with one word."
        options = sorted({f[1] for f in fears})
        items.append(Item(question, fear[1], tuple(options), "deduction"))
    return items


def induction(n: int, seed: int = 0) -> list[Item]:
    """Arithmetic sequences: give the next term."""
    rng = random.Random(f"induction-{seed}")
    items = []
    for _ in range(n):
        start, step = rng.randint(1, 30), rng.randint(2, 9)
        seq = [start + i * step for i in range(5)]
        answer = seq[-1] + step
        question = f"What number comes next: {', '.join(map(str, seq))}, ...? Answer with a number."
        options = [str(answer), *_distractors(rng, answer)]
        rng.shuffle(options)
        items.append(Item(question, str(answer), tuple(options), "induction"))
    return items


TASKS = {"arithmetic": arithmetic, "deduction": deduction, "induction": induction}


def load_task(name: str, n: int = 48, seed: int = 0, **kwargs) -> list[Item]:
    """``n`` seeded items of task ``name`` (``arithmetic`` takes ``steps=``), or every item of a ``.jsonl``
    file of ``{"question", "answer", "options"?, "kind"?}`` lines (``save_task`` writes one)."""
    if str(name).endswith(".jsonl"):
        return _read_items(Path(name))
    if name not in TASKS:
        raise ValueError(f"no task {name!r}: valid tasks are {sorted(TASKS)} or a .jsonl file")
    if n < 1:
        raise ValueError(f"n={n}: expected at least one item")
    return TASKS[name](n, seed=seed, **kwargs)


def save_task(items: list[Item], path: str | Path, force: bool = False) -> Path:
    """Write items as jsonl (atomically) so a split can be shared and reloaded with ``load_task``."""
    from steerkit._io import write_text

    rows = ({"question": i.question, "answer": i.answer, "options": list(i.options), "kind": i.kind} for i in items)
    return write_text("".join(json.dumps(row) + "\n" for row in rows), path, force=force)


def _read_items(path: Path) -> list[Item]:
    if not path.is_file():
        raise FileNotFoundError(f"no task file {path}")

    def parse(row: dict) -> Item:
        question, answer = row["question"], row["answer"]
        options = tuple(row.get("options") or (answer,))
        if not (isinstance(question, str) and isinstance(answer, str) and question and answer):
            raise TypeError("question and answer must be non-empty strings")
        if answer not in options or not all(isinstance(o, str) for o in options):
            raise ValueError(f"options {list(options)} must be strings and contain the answer {answer!r}")
        return Item(question, answer, options, str(row.get("kind", path.stem)))

    items = list(iter_jsonl(path, parse, "a JSON object with 'question' and 'answer' strings"))
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def prompt(tok, item_or_question: Item | str, prefix: str = ANSWER_PREFIX, system: str | None = None) -> str:
    """The question through the chat template, the assistant turn opened with ``prefix``.

    For a numeric item the prefix ends with a space: this tokenizer family writes " 26" as " ", "2", "6",
    so the next token is then the first digit.
    """
    question = item_or_question.question if isinstance(item_or_question, Item) else item_or_question
    if prefix and isinstance(item_or_question, Item) and item_or_question.numeric:
        prefix += " "
    return chat_prompt(tok, question, system) + prefix


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z]+")


def parse_answer(text: str, numeric: bool) -> str | None:
    """The final number (or word) in a completion, lower-cased; None when there is none.

    The last number depends on how long the model keeps talking: for worked answers in generated text use
    ``steerkit.evals.worked.first_answer``, which reads the first stated answer and knows truncation."""
    found = _NUMBER.findall(text.replace(",", "")) if numeric else _WORD.findall(text)
    if not found:
        return None
    value = found[-1].lower()
    return value.rstrip("0").rstrip(".") if numeric and "." in value else value


def score(generation: str, item: Item) -> tuple[bool, str | None]:
    """(correct, parsed answer) for a free-form completion; an answer that cannot be parsed is wrong."""
    parsed = parse_answer(generation, numeric=item.numeric)
    return parsed == item.answer.lower(), parsed


def grade(generations: list[str], items: list[Item]) -> dict:
    """Accuracy of free-form completions, with the count of completions that held no parsable answer."""
    if len(generations) != len(items) or not items:
        raise ValueError(f"got {len(generations)} generations for {len(items)} items: expected one each (and some)")
    scored = [score(g, it) for g, it in zip(generations, items, strict=True)]
    return {
        "accuracy": sum(c for c, _ in scored) / len(scored),
        "correct": sum(c for c, _ in scored),
        "unparsed": sum(p is None for _, p in scored),
        "n": len(scored),
    }
