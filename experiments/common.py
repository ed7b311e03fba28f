"""Shared pieces of the reasoning-transfer experiments: the task split, fine-tuning, sampling, accuracy.

The task is one- and two-step add/subtract word problems (``steerkit.evals.tasks.arithmetic``), answered
right after "The answer is" with no chain of thought. Checkpoints live under ``experiments/.cache``
(rebuilt by ``experiments/organisms.py``, never committed).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steerkit._io import atomic_path
from steerkit.batching import pad_batch, pad_id
from steerkit.evals.tasks import Item, grade, load_task, prompt
from steerkit.steer import completions

CACHE = Path("experiments/.cache")
ARTIFACTS = Path("artifacts/reasoning_transfer")
MAX_NEW = 8


def split(n_train: int = 600, n_test: int = 200) -> tuple[list[Item], list[Item]]:
    """Seeded train / test items, half one-step and half two-step; no test question appears in train."""
    train = load_task("arithmetic", n=n_train // 2, steps=1, seed=101) + load_task(
        "arithmetic", n=n_train // 2, steps=2, seed=102
    )
    seen = {item.question for item in train}
    test = [
        item
        for item in load_task("arithmetic", n=n_test // 2, steps=1, seed=201)
        + load_task("arithmetic", n=n_test // 2, steps=2, seed=202)
        if item.question not in seen
    ]
    return train, test


def complete(
    model, tok, prompts: list[str], do_sample: bool = False, batch_size: int = 32, bf16: bool = False, **kwargs
) -> list[str]:
    """Continuations of ``MAX_NEW`` tokens (greedy unless ``do_sample``); ``bf16``: under bf16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return completions(model, tok, prompts, MAX_NEW, batch_size, do_sample=do_sample, **kwargs)


def accuracy(model, tok, items: list[Item]) -> dict:
    """Greedy free-form accuracy on ``items``."""
    outs = complete(model, tok, [prompt(tok, it) for it in items])
    return grade(outs, items)


def finetune(model, tok, examples: list[tuple[str, str]], epochs: int, lr: float, seed: int, batch_size: int = 16):
    """Full fine-tuning on (prompt, completion) pairs, loss on the completion tokens only (bf16 autocast)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc="fine-tuning")
    losses = []
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            rows, labels = [], []
            for i in order[start : start + batch_size]:
                p = tok(examples[i][0], add_special_tokens=False)["input_ids"]
                c = tok(examples[i][1], add_special_tokens=False)["input_ids"]
                rows.append(p + c)
                labels.append([-100] * len(p) + c)
            ids, mask, _ = pad_batch(rows, pad_id(tok), "right")
            target = torch.full_like(ids, -100)
            for r, lab in enumerate(labels):
                target[r, : len(lab)] = torch.tensor(lab)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


def write_report(name: str, data: dict, lines: list[str]) -> None:
    """``ARTIFACTS/{name}.json`` (the numbers) and ``{name}.md`` (the report), each atomically; prints the report."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with atomic_path(ARTIFACTS / f"{name}.json", force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    with atomic_path(ARTIFACTS / f"{name}.md", force=True) as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))
