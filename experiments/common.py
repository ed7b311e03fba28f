"""Shared pieces of the reasoning-transfer experiments: where things go, fine-tuning, reports.

The task is worked add/subtract word problems (``steerkit.evals.worked``). Checkpoints and cached results live
under ``experiments/.cache`` (rebuilt by the stage scripts, never committed); reports go to ``ARTIFACTS``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steerkit._io import atomic_path
from steerkit.batching import pad_batch, pad_id

CACHE = Path("experiments/.cache")
EVAL_BATCH = 256  # rows a generate call; round three's evaluations (bf16 on the CPU: ~1.2x faster than 64)
ARTIFACTS = Path("artifacts/reasoning_transfer")


def finetune(
    model,
    tok,
    examples: list[tuple[str, str]],
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 16,
    shuffle: bool = True,
):
    """Full fine-tuning on (prompt, completion) pairs, loss on the completion tokens only (bf16 autocast).
    ``shuffle=False`` keeps the examples' order (to replay another run's batches)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc="fine-tuning")
    losses = []
    for _ in range(epochs):
        order = list(range(len(examples)))
        if shuffle:
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


def interior_choice(
    score: Callable[[float], float], grid: Sequence[float], geometric: bool = False, max_extra: int = 4
) -> tuple[float, dict[float, float], bool]:
    """The grid value with the best score, the grid extended one step past an edge (2·edge − neighbour, or
    edge² / neighbour when ``geometric``, 2·edge next to 0) while the best sits on that edge, at most
    ``max_extra`` times. Returns (choice, every score, whether the choice is interior), so that a choice at
    the edge of what was tried is reported as such. Ties go to the smallest value."""
    if len(grid) < 2:
        raise ValueError(f"grid={list(grid)}: expected at least two values")
    scores = {float(x): score(float(x)) for x in sorted(grid)}
    while True:
        values = sorted(scores)
        best = max(values, key=scores.get)
        at_edge = best in (values[0], values[-1])
        if not at_edge or len(scores) >= len(grid) + max_extra:
            return best, scores, not at_edge
        edge, neighbour = (values[0], values[1]) if best == values[0] else (values[-1], values[-2])
        if geometric:
            beyond = edge * edge / neighbour if neighbour else 2 * edge  # past 0 a geometric grid doubles
        else:
            beyond = 2 * edge - neighbour
        scores[beyond] = score(beyond)


def plain(interval: Sequence[float]) -> str:
    """(mean, low, high) as "0.123 [0.100, 0.150]"."""
    return "{:.3f} [{:.3f}, {:.3f}]".format(*interval)


def mean_sd(values, spec: str = "+.3f") -> str:
    """Per-seed values as "mean ± s.d." (sample s.d.), each number formatted with ``spec``."""
    t = torch.tensor([float(v) for v in values])
    return f"{t.mean():{spec}} ± {t.std():{spec.lstrip('+')}}"


def write_report(name: str, data: dict, lines: list[str]) -> None:
    """``ARTIFACTS/{name}.json`` (the numbers) and ``{name}.md`` (the report), each atomically; prints the report."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with atomic_path(ARTIFACTS / f"{name}.json", force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    with atomic_path(ARTIFACTS / f"{name}.md", force=True) as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))
