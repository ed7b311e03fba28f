"""Model organisms: an SFT and an RL checkpoint of SmolLM2-135M-Instruct from the same initialisation.

SFT: supervised on the answers of the training split ("The answer is 17." and the end-of-turn token).
RL: expert iteration, i.e. best-of-N rejection sampling on the verified reward, repeated: each round samples
the current policy at temperature 1 on every training question (8 samples in round 1, 4 later), keeps the
correct samples and fine-tunes the current policy on them. No answer the model did not produce itself is
ever shown to it. Both organisms start from the embedded model and see the same questions.
Writes experiments/.cache/{sft,rl} (not committed) and artifacts/reasoning_transfer/organisms.{md,json,png}.

    .venv/bin/python experiments/organisms.py          # both organisms
    .venv/bin/python experiments/organisms.py rl       # only the RL one (the SFT one from the cache)
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import ARTIFACTS, CACHE, accuracy, complete, finetune, split, write_report  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit import plots  # noqa: E402
from steerkit.evals.tasks import prompt, score  # noqa: E402
from steerkit.sae.tune import save_checkpoint  # noqa: E402

SFT_EPOCHS, SFT_LR = 2, 2e-5
RL_EPOCHS, RL_LR, RL_SAMPLES = 4, 1e-4, (8, 4, 4)  # samples per question in each round
SEED = 0


def train_sft(base, tok, train) -> dict:
    start = time.perf_counter()
    sft = copy.deepcopy(base)
    answers = [(prompt(tok, it), f"{it.answer}.{tok.eos_token}") for it in train]
    loss = finetune(sft, tok, answers, SFT_EPOCHS, SFT_LR, SEED)
    save_checkpoint(sft, tok, CACHE / "sft", force=True)
    return {"sft_loss": loss, "sft_seconds": time.perf_counter() - start}


def train_rl(base, tok, train, test) -> dict:
    """Expert iteration; sampling runs under bf16 autocast (2.2x faster here), training as for SFT."""
    start = time.perf_counter()
    policy = copy.deepcopy(base)
    rounds = []
    for number, samples in enumerate(RL_SAMPLES):
        torch.manual_seed(SEED + number)
        prompts = [prompt(tok, it) for it in train for _ in range(samples)]
        texts = complete(policy, tok, prompts, do_sample=True, temperature=1.0, top_k=0, batch_size=128, bf16=True)
        kept: dict[tuple[int, str], None] = {}  # (question index, correct completion), in order, no repeats
        for n, text in enumerate(texts):
            if score(text, train[n // samples])[0]:
                kept[(n // samples, text)] = None
        own = [(prompt(tok, train[i]), text + tok.eos_token) for i, text in kept]
        loss = finetune(policy, tok, own, RL_EPOCHS, RL_LR, SEED + number)
        rounds.append({
            "samples": len(texts), "correct": len(kept), "sample_accuracy": sum(
                score(t, train[n // samples])[0] for n, t in enumerate(texts)) / len(texts),
            "questions_solved": len({i for i, _ in kept}), "loss": loss,
            "test_after": accuracy(policy, tok, test), "seconds": time.perf_counter() - start,
        })  # fmt: skip
        print(f"round {number + 1}: {rounds[-1]['correct']} kept, test {rounds[-1]['test_after']['accuracy']:.3f}")
    save_checkpoint(policy, tok, CACHE / "rl", force=True)
    return {"rl_rounds": rounds, "rl_seconds": time.perf_counter() - start}


def main(stages: list[str]) -> None:
    unknown = set(stages) - {"sft", "rl"}
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}: expected sft and/or rl")
    stages = stages or ["sft", "rl"]
    previous = ARTIFACTS / "organisms.json"
    report = json.loads(previous.read_text()) if previous.is_file() else {}
    if "sft" not in stages and not (CACHE / "sft" / "config.json").is_file():
        raise SystemExit(f"no {CACHE / 'sft'}: run with the sft stage first")
    base, tok = sk.load_model("smollm2-135m-instruct")
    train, test = split()
    report.update(train_items=len(train), test_items=len(test))
    if "sft" in stages:
        report.update(train_sft(base, tok, train))
    if "rl" in stages:
        report.update(train_rl(base, tok, train, test))
    for name in ("base", "sft", "rl"):
        model = base if name == "base" else sk.load_model(CACHE / name)[0]
        report[f"{name}_test"] = accuracy(model, tok, test)
        report[f"{name}_train"] = accuracy(model, tok, train[:200])

    rounds = report["rl_rounds"]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(range(len(rounds) + 1), [report["base_test"]["accuracy"]] + [r["test_after"]["accuracy"] for r in rounds],
            "o-", label="RL (expert iteration), greedy test accuracy")  # fmt: skip
    ax.plot(range(1, len(rounds) + 1), [r["sample_accuracy"] for r in rounds], "s--",
            label="correct samples (T = 1, train) in the round")  # fmt: skip
    ax.axhline(report["sft_test"]["accuracy"], color="gray", ls=":", label="SFT, greedy test accuracy")
    ax.set(xlabel="RL round", ylabel="accuracy", title="model organisms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save_figure(fig, ARTIFACTS / "organisms.png", force=True)
    lines = [
        "# Model organisms",
        "",
        f"{len(train)} training and {len(test)} test questions (one- and two-step add/subtract, no chain of thought).",
        f"SFT: {SFT_EPOCHS} epochs on the answers, lr {SFT_LR}, {report['sft_seconds']:.0f} s.",
        f"RL (expert iteration): {len(rounds)} rounds of sampling the current policy at temperature 1 "
        f"({', '.join(map(str, RL_SAMPLES))} samples per question), keeping the correct samples and fine-tuning "
        f"on them ({RL_EPOCHS} epochs, lr {RL_LR}); {report['rl_seconds']:.0f} s in all.",
        "",
        "| RL round | samples | correct samples | questions solved | test accuracy after |",
        "|---|---|---|---|---|",
        *(
            f"| {n + 1} | {r['samples']} | {r['correct']} ({r['sample_accuracy']:.3f}) | {r['questions_solved']} "
            f"| {r['test_after']['accuracy']:.3f} |"
            for n, r in enumerate(rounds)
        ),  # fmt: skip
        "",
        "| model | test accuracy | train accuracy (200) | unparsed (test) |",
        "|---|---|---|---|",
    ]
    for name in ("base", "sft", "rl"):
        t, r = report[f"{name}_test"], report[f"{name}_train"]
        lines.append(
            f"| {name} | {t['accuracy']:.3f} ({t['correct']}/{t['n']}) | {r['accuracy']:.3f} | {t['unparsed']} |"
        )
    lines += ["", "![organisms](organisms.png)", "", "Reproduce: `.venv/bin/python experiments/organisms.py`", ""]
    write_report("organisms", report, lines)


if __name__ == "__main__":
    main(sys.argv[1:])
