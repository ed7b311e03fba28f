"""Model organisms: an SFT and an RL checkpoint of SmolLM2-135M-Instruct from the same initialisation.

SFT: supervised on the answers of the training split ("The answer is 17." and the end-of-turn token).
RL: best-of-N rejection sampling on the verified reward (expert iteration): 8 samples per training
question at temperature 1 from the base, the correct ones kept, then the same fine-tuning recipe on
them. Both start from the embedded model, use the same questions, epochs and learning rate.
Writes experiments/.cache/{sft,rl} (not committed) and artifacts/reasoning_transfer/organisms.md.

    .venv/bin/python experiments/organisms.py
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import ARTIFACTS, CACHE, accuracy, complete, finetune, split, write_report  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit.evals.tasks import prompt, score  # noqa: E402
from steerkit.sae.tune import save_checkpoint  # noqa: E402

EPOCHS, LR, SAMPLES, SEED = 2, 2e-5, 8, 0


def main() -> None:
    base, tok = sk.load_model("smollm2-135m-instruct")
    train, test = split()
    report = {"train_items": len(train), "test_items": len(test)}
    start = time.perf_counter()
    sft = copy.deepcopy(base)
    answers = [(prompt(tok, it), f"{it.answer}.{tok.eos_token}") for it in train]
    report["sft_loss"] = finetune(sft, tok, answers, EPOCHS, LR, SEED)
    save_checkpoint(sft, tok, CACHE / "sft", force=True)
    report["sft_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    torch.manual_seed(SEED)
    prompts = [prompt(tok, it) for it in train for _ in range(SAMPLES)]
    samples = complete(base, tok, prompts, do_sample=True, temperature=1.0, top_k=0)
    kept: dict[tuple[str, str], None] = {}  # (question, correct completion), in order, without repeats
    for n, text in enumerate(samples):
        item = train[n // SAMPLES]
        if score(text, item)[0]:
            kept[(item.question, text)] = None
    solved = {question for question, _ in kept}
    by_question = {it.question: it for it in train}
    rl = copy.deepcopy(base)
    own = [(prompt(tok, by_question[q]), t + tok.eos_token) for q, t in kept]
    report["rl_loss"] = finetune(rl, tok, own, EPOCHS, LR, SEED)
    save_checkpoint(rl, tok, CACHE / "rl", force=True)
    report.update(rl_seconds=time.perf_counter() - start, rl_samples=len(samples), rl_kept=len(kept))
    report["rl_questions_solved"] = len(solved)

    for name, model in (("base", base), ("sft", sft), ("rl", rl)):
        report[f"{name}_test"] = accuracy(model, tok, test)
        report[f"{name}_train"] = accuracy(model, tok, train[:200])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Model organisms",
        "",
        f"{len(train)} training and {len(test)} test questions (one- and two-step add/subtract, no chain of thought).",
        f"SFT: {EPOCHS} epochs on the answers, lr {LR}, {report['sft_seconds']:.0f} s.",
        f"RL (rejection sampling): {SAMPLES} samples per question at temperature 1, {len(kept)} correct kept "
        f"({len(solved)} of {len(train)} questions solved at least once); the same fine-tuning, "
        f"{report['rl_seconds']:.0f} s including sampling.",
        "",
        "| model | test accuracy | train accuracy (200) | unparsed (test) |",
        "|---|---|---|---|",
    ]
    for name in ("base", "sft", "rl"):
        t, r = report[f"{name}_test"], report[f"{name}_train"]
        lines.append(
            f"| {name} | {t['accuracy']:.3f} ({t['correct']}/{t['n']}) | {r['accuracy']:.3f} | {t['unparsed']} |"
        )
    lines += ["", "Reproduce: `.venv/bin/python experiments/organisms.py`", ""]
    write_report("organisms", report, lines)


if __name__ == "__main__":
    main()
