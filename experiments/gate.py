"""Stage 0 of the reasoning-transfer experiments: is the task one the base model can partly do?

The gate (issue 14), on the validation split, before any organism is trained: the base's greedy pass@1
between 0.15 and 0.6, and its pass@8 at temperature 0.8 at least twice its pass@1 (so that sampling and
reinforcement have correct answers to find). Task variants are tried in the order of ``TRIES``; the first
that passes is written to ``artifacts/reasoning_transfer/task.json`` for the later stages, and the report
lists every try. Results per try are cached in ``experiments/.cache/gate`` (delete to rerun).

    .venv/bin/python experiments/gate.py
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import ARTIFACTS, CACHE, plain, write_report  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit._io import write_text  # noqa: E402
from steerkit.evals.stats import bootstrap, pass_at_k  # noqa: E402
from steerkit.evals.worked import (  # noqa: E402
    HARD_SPLITS,
    TaskConfig,
    grade_worked,
    render,
    trivial_baselines,
    worked_splits,
)
from steerkit.steer import completions  # noqa: E402

BUDGET = 48  # new tokens for every model, every stage
SAMPLES, TEMPERATURE = 8, 0.8
PASS1_RANGE, PASS8_FACTOR = (0.15, 0.6), 2.0
TRIES = [  # (name, where the solved example goes, number ranges)
    ("example in the system prompt, 5-40 +- 1-20", "system", TaskConfig(5, 40, 20)),
    ("example as a chat exchange, 5-40 +- 1-20", "turn", TaskConfig(5, 40, 20)),
    ("example as a chat exchange, 2-20 +- 1-9", "turn", TaskConfig(2, 20, 9)),
    ("example as a chat exchange, 10-60 +- 1-40", "turn", TaskConfig(10, 60, 40)),
    ("example as a chat exchange, 20-99 +- 1-60", "turn", TaskConfig(20, 99, 60)),
]


def evaluate(model, tok, items, example: str, samples: int = 1) -> dict:
    """Greedy (``samples`` 1) or sampled generations of the budget, graded; per-item correct counts."""
    prompts = [render(tok, it, example) for it in items]
    kwargs = {"do_sample": True, "temperature": TEMPERATURE, "top_p": 1.0, "num_return_sequences": samples}
    torch.manual_seed(0)
    outs = completions(model, tok, prompts, BUDGET, 64 // samples, True, **(kwargs if samples > 1 else {}))
    grid = [it for it in items for _ in range(samples)]
    graded = grade_worked([t for t, _ in outs], [f for _, f in outs], grid)
    correct = torch.tensor(graded.pop("correct")).view(len(items), samples)
    return {**graded, "per_item": correct.sum(1).tolist(), "examples": [t for t, _ in outs[: 3 * samples : samples]]}


def run_try(model, tok, name: str, example: str, config: TaskConfig) -> dict:
    path = CACHE / "gate" / (re.sub(r"[^a-z0-9]+", "_", name.replace("+-", "pm")).strip("_") + ".json")
    if path.exists():
        return json.loads(path.read_text())
    splits = worked_splits(1, config)
    val = splits["val"]
    greedy = evaluate(model, tok, val, example)
    result = {"name": name, "example": example, "config": asdict(config), "greedy": greedy}
    result["pass1"] = bootstrap([float(c) for c in greedy["per_item"]])
    result["baselines"] = trivial_baselines(splits["train"], val)
    if PASS1_RANGE[0] <= greedy["accuracy"] <= PASS1_RANGE[1]:
        sampled = evaluate(model, tok, val, example, SAMPLES)
        result["sampled"] = sampled
        result["pass8"] = bootstrap([pass_at_k(SAMPLES, c, SAMPLES) for c in sampled["per_item"]])
        result["sample_pass1"] = bootstrap([pass_at_k(SAMPLES, c, 1) for c in sampled["per_item"]])
        hard = worked_splits(2, config, HARD_SPLITS)["val"]
        result["hard_greedy"] = evaluate(model, tok, hard, example)
    p1 = result["pass1"][0]
    result["passed"] = "pass8" in result and result["pass8"][0] >= PASS8_FACTOR * p1
    write_text(json.dumps(result, indent=1), path, force=True)
    return result


def main() -> None:
    model, tok = sk.load_model("smollm2-135m-instruct")
    tries, chosen = [], None
    for name, example, config in TRIES:
        print(f"try: {name}", flush=True)
        tries.append(run_try(model, tok, name, example, config))
        if tries[-1]["passed"]:
            chosen = tries[-1]
            break
    lines = [
        "# Stage 0: the task and the gate",
        "",
        f"Base model smollm2-135m-instruct, validation split (200 one-step items), budget {BUDGET} new tokens.",
        f"Gate: greedy pass@1 in [{PASS1_RANGE[0]}, {PASS1_RANGE[1]}] and pass@{SAMPLES} (T = {TEMPERATURE}) "
        f">= {PASS8_FACTOR:g} x pass@1. Scorer: the integer after the first 'The answer is'; truncated = wrong.",
        "Intervals: 95% bootstrap over items.",
        "",
        f"| try | greedy pass@1 | truncated | pass@{SAMPLES} | sampled pass@1 | commonest train answer | "
        "first number | last number | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tries:
        b = t["baselines"]
        p8 = plain(t["pass8"]) if "pass8" in t else "not run (pass@1 outside the range)"
        sp1 = plain(t["sample_pass1"]) if "sample_pass1" in t else "-"
        lines.append(
            f"| {t['name']} | {plain(t['pass1'])} | {t['greedy']['truncated']:.3f} | {p8} | {sp1} | "
            f"{b['most_common_train_answer']:.3f} | {b['first_number']:.3f} | {b['last_number']:.3f} | "
            f"{'passed' if t['passed'] else 'failed'} |"
        )
    lines += ["", "Greedy examples (first three validation items):", ""]
    for t in tries:
        lines += [f"- {t['name']}: " + " / ".join(repr(e) for e in t["greedy"]["examples"])]
    if chosen:
        hard = chosen["hard_greedy"]
        lines += [
            "",
            f"Chosen: **{chosen['name']}**. Two-step (hard) validation, greedy: {hard['accuracy']:.3f} "
            f"(truncated {hard['truncated']:.3f}, n {hard['n']}).",
        ]
        task = {"example": chosen["example"], "config": chosen["config"], "budget": BUDGET}
        write_text(json.dumps(task, indent=1), ARTIFACTS / "task.json", force=True)
    else:
        lines += ["", "No try passed the gate: no organism is trained on this task."]
    write_report("gate", {"tries": tries, "chosen": chosen and chosen["name"]}, lines)


if __name__ == "__main__":
    main()
