"""sweep(): steer at each layer (or all together) for each α and tabulate first-token metrics."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

from steerkit._checks import finite
from steerkit._io import write_text
from steerkit.evals.logits import answer_metrics, entropy, kl, next_token_logprobs, option_token_ids
from steerkit.evals.tasks import Item, load_task, prompt
from steerkit.steer import steer
from steerkit.vector import SteeringVector


def _check_alphas(alphas) -> list[float]:
    alphas = [finite(a, f"alphas[{i}]") for i, a in enumerate(alphas)]
    if not alphas:
        raise ValueError("alphas is empty")
    return alphas


def sweep(
    model,
    tok,
    vector: SteeringVector,
    prompts_or_task: str | Sequence[str] | Sequence[Item],
    alphas: Sequence[float] = (-2, -1, 0, 1, 2),
    layers: Sequence[int] | None = None,
    together: bool = False,
    n: int = 48,
    seed: int = 0,
    positions: str | int = "all",
    batch_size: int = 16,
) -> list[dict]:
    """Rows ``{alpha, layer, kl, entropy}`` (+ ``accuracy``, ``mass_correct``, ``mass_incorrect`` for a task).

    ``prompts_or_task``: a task name (``n`` seeded items), a list of task items, or plain prompts. Each of
    ``layers`` (default: the vector's) is steered alone, or all together with ``together=True`` (then
    ``layer`` reads like ``"8+9+10"``). Metrics are means over prompts of the first generated token.
    """
    alphas = _check_alphas(alphas)
    if isinstance(prompts_or_task, str):
        items = load_task(prompts_or_task, n=n, seed=seed)
    else:
        items = list(prompts_or_task)
        if not items:
            raise ValueError("the prompt list is empty")
    is_task = isinstance(items[0], Item)
    prompts = [prompt(tok, it) for it in items] if is_task else items
    layers = vector.layers if layers is None else list(layers)
    groups = [layers] if together else [[layer] for layer in layers]
    reference = next_token_logprobs(model, tok, prompts, batch_size)
    options = [option_token_ids(tok, it.options, it.numeric) for it in items] if is_task else None
    rows = []
    for group in groups:
        for alpha in alphas:
            if alpha == 0:
                logprobs = reference
            else:
                with steer(model, vector, alpha, layers=group, positions=positions):
                    logprobs = next_token_logprobs(model, tok, prompts, batch_size)
            row = {
                "alpha": alpha,
                "layer": "+".join(map(str, group)) if together else group[0],
                "kl": float(kl(reference, logprobs).mean()),
                "entropy": float(entropy(logprobs).mean()),
            }
            if is_task:
                m = answer_metrics(logprobs, options, [it.correct_index for it in items])
                row.update(
                    accuracy=float(m["correct"].float().mean()),
                    mass_correct=float(m["mass_correct"].mean()),
                    mass_incorrect=float(m["mass_incorrect"].mean()),
                )
            rows.append(row)
    return rows


def write_csv(rows: list[dict], path: str | os.PathLike, force: bool = False) -> None:
    """Rows as CSV (columns from the first row), written atomically; an existing file only with ``force``."""
    if not rows:
        raise ValueError("no rows to write")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(buf.getvalue(), path, force=force)
