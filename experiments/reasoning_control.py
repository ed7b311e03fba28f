"""Control vectors for reasoning on the organisms' task (Højer et al.; Zhao et al.'s efficiency steering).

1. A reasoning vector from the base model's own samples: for each of the 600 training questions, 8 samples
   at temperature 1 (bf16 autocast); where they hold both correct and incorrect answers, up to two pairs
   (prompt + correct, prompt + incorrect). One question in five holds out its pairs (so no question is on
   both sides). Mean difference at the last token, layers 6, 10, 16. First-token accuracy, KL and entropy
   over α on the test split (``sk.sweep``), and greedy free-form accuracy with it at layer 10. The spread:
   the vector re-extracted from three random halves of the training pairs, free-form accuracy of each.
2. The bundled ``concise`` vector (layer 4): mean completion length against accuracy when the model answers
   freely (no "The answer is" prefix, 64 new tokens) on 100 test questions.
Writes artifacts/reasoning_transfer/reasoning_control.{md,json} and two figures.

    .venv/bin/python experiments/reasoning_control.py
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import ARTIFACTS, accuracy, complete, split, write_report  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit import plots  # noqa: E402
from steerkit.evals import write_csv  # noqa: E402
from steerkit.evals.tasks import grade, prompt, score  # noqa: E402
from steerkit.models import chat_prompt  # noqa: E402
from steerkit.steer import completions  # noqa: E402

LAYERS, ALPHAS, SAMPLES = [6, 10, 16], (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0), 8


def own_pairs(model, tok, items) -> list[sk.Pair]:
    """Correct vs incorrect own samples of the same question, at most two pairs per question."""
    torch.manual_seed(0)
    prompts = [prompt(tok, it) for it in items for _ in range(SAMPLES)]
    outs = complete(model, tok, prompts, do_sample=True, temperature=1.0, top_k=0, batch_size=128, bf16=True)
    pairs, questions = [], 0
    for q, item in enumerate(items):
        mine = list(dict.fromkeys(outs[q * SAMPLES : (q + 1) * SAMPLES]))
        right = [o for o in mine if score(o, item)[0]]
        wrong = [o for o in mine if score(o, item)[1] is not None and not score(o, item)[0]]
        if right and wrong:
            split_name = "test" if questions % 5 == 4 else "train"
            questions += 1
            for r, w in list(zip(right * 2, wrong, strict=False))[:2]:
                pairs.append(sk.Pair(prompts[q * SAMPLES] + r, prompts[q * SAMPLES] + w, split_name))
    return pairs


def main() -> None:
    model, tok = sk.load_model("smollm2-135m-instruct")
    train, test = split()
    report: dict = {}
    pairs = own_pairs(model, tok, train)
    report["pairs"] = len(pairs)
    vector = sk.extract(model, tok, pairs, layers=LAYERS)
    report["separation"] = {str(k): v for k, v in vector.separation.items()}
    rows = sk.sweep(model, tok, vector, test, alphas=ALPHAS, layers=LAYERS)
    report["sweep"] = rows
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    write_csv(rows, ARTIFACTS / "reasoning_control_sweep.csv", force=True)
    plots.sweep_metrics(
        rows, title="own-sample reasoning vector", path=ARTIFACTS / "reasoning_control_sweep.png", force=True
    )
    freeform = []
    for alpha in (-1.0, 0.0, 1.0):
        with sk.steer(model, vector, alpha=alpha, layers=[10]):
            freeform.append({"alpha": alpha, **accuracy(model, tok, test)})
    report["freeform_layer10"] = freeform
    rng = random.Random(0)
    train_pairs = [p for p in pairs if p.split == "train"]
    halves = []
    for _ in range(3):
        half = sk.extract(model, tok, rng.sample(train_pairs, len(train_pairs) // 2), layers=[10])
        for alpha in (-1.0, 1.0):
            with sk.steer(model, half, alpha=alpha, layers=[10]):
                halves.append({"alpha": alpha, **accuracy(model, tok, test)})
    report["freeform_layer10_halves"] = halves

    concise = sk.extract(model, tok, sk.load_pairs("concise", split="train"), layers=[4])
    free_items = test[:100]
    free_prompts = [chat_prompt(tok, it.question) for it in free_items]
    points = []
    for alpha in (0.0, 1.0, 1.5, 2.0):
        with sk.steer(model, concise, alpha=alpha):
            outs = completions(model, tok, free_prompts, 64, 16, do_sample=False)
        lengths = [len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs]
        graded = grade(outs, free_items)
        points.append({"label": f"α={alpha}", "alpha": alpha, "length": sum(lengths) / len(lengths), **graded})
    report["efficiency"] = points
    plots.length_accuracy(points, "concise vector (layer 4) on the task", path=ARTIFACTS / "efficiency.png", force=True)
    lines = [
        "# Control vectors for reasoning",
        "",
        f"Own-sample vector: {len(pairs)} pairs (correct vs incorrect base-model samples of the same question; "
        f"{sum(p.split == 'test' for p in pairs)} held out).",
        "Held-out AUROC by layer: " + ", ".join(f"{k}: {v:.3f}" for k, v in report["separation"].items()),
        "",
        "First token on the test split (`artifacts/reasoning_transfer/reasoning_control_sweep.csv`):",
        "",
        "| layer | α | accuracy | KL | entropy |",
        "|---|---|---|---|---|",
        *(
            f"| {r['layer']} | {r['alpha']:+.1f} | {r['accuracy']:.3f} | {r['kl']:.4f} | {r['entropy']:.3f} |"
            for r in rows
        ),  # fmt: skip
        "",
        "Greedy free-form accuracy steered at layer 10: "
        + ", ".join(f"α={r['alpha']:+.0f}: {r['accuracy']:.3f} ({r['correct']}/{r['n']})" for r in freeform),
        "",
        "The same with vectors from three random halves of the training pairs: "
        + "; ".join(
            f"α={a:+.0f}: " + ", ".join(f"{r['accuracy']:.3f}" for r in halves if r["alpha"] == a) for a in (-1, 1)
        ),
        "",
        "Efficiency (bundled concise vector, layer 4; free answers, 64 new tokens, 100 test questions):",
        "",
        "| α | mean length (tokens) | accuracy | unparsed |",
        "|---|---|---|---|",
        *(f"| {p['alpha']} | {p['length']:.1f} | {p['accuracy']:.3f} | {p['unparsed']} |" for p in points),
        "",
        "Reproduce: `.venv/bin/python experiments/reasoning_control.py`",
        "",
    ]
    write_report("reasoning_control", report, lines)


if __name__ == "__main__":
    main()
