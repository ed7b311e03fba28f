"""Reasoning vector (Zbeeb et al.): held-out accuracy of base ± α·(θ_RL − θ_SFT).

Needs the organisms (``experiments/organisms.py``). Each merged model is written by ``sk.merge`` (float32
arithmetic, every tensor) into a temporary directory and reloaded with plain transformers. Accuracy is
greedy free-form on the test split; ± is its binomial standard error. Writes
artifacts/reasoning_transfer/{reasoning_vector.md, reasoning_vector.json, reasoning_vector.png}.

    .venv/bin/python experiments/reasoning_vector.py
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import ARTIFACTS, CACHE, accuracy, split, write_report  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit import plots  # noqa: E402

ALPHAS = (0.25, 0.5, 1.0, 1.5)


def main() -> None:
    for name in ("sft", "rl"):
        if not (CACHE / name / "config.json").is_file():
            raise SystemExit(f"no {CACHE / name}: run experiments/organisms.py first")
    train, test = split()
    base_dir = sk.embedded_checkpoint()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vector = sk.TaskVector.between(CACHE / "rl", CACHE / "sft")
        stats = vector.stats()
        for alpha in (0.0, *ALPHAS, *(-a for a in ALPHAS)):
            if alpha == 0:
                model, tok = sk.load_model(base_dir)
            else:
                out = sk.merge(base_dir, [(vector, alpha)], Path(tmp) / f"alpha_{alpha}", force=True, progress=False)
                model, tok = sk.load_model(out)
            result = accuracy(model, tok, test)
            p, n = result["accuracy"], result["n"]
            train_acc = accuracy(model, tok, train[:200])["accuracy"]  # where the RL organism gained most
            rows.append({"alpha": alpha, **result, "stderr": math.sqrt(p * (1 - p) / n), "train_accuracy": train_acc})
            print(rows[-1])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    norm = math.sqrt(sum(v["norm"] ** 2 for v in stats["layers"].values()))
    rows.sort(key=lambda r: r["alpha"])
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    alphas = [r["alpha"] for r in rows]
    ax.errorbar(alphas, [r["accuracy"] for r in rows], [r["stderr"] for r in rows], fmt="o-", label="test (200)")
    ax.plot(alphas, [r["train_accuracy"] for r in rows], "s--", label="train questions (200)")
    ax.legend(fontsize=8)
    ax.set(xlabel="α in base + α·(θ_RL − θ_SFT)", ylabel="test accuracy", title="reasoning vector on the base")
    fig.tight_layout()
    plots.save_figure(fig, ARTIFACTS / "reasoning_vector.png", force=True)
    lines = [
        "# Reasoning vector: base ± α·(θ_RL − θ_SFT)",
        "",
        f"Greedy free-form accuracy on {len(test)} held-out questions (± binomial standard error), and on 200 of "
        "the organisms' training questions.",
        "",
        "| α | test accuracy | correct | unparsed | train accuracy |",
        "|---|---|---|---|---|",
        *(
            f"| {r['alpha']:+.2f} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | {r['correct']}/{r['n']} "
            f"| {r['unparsed']} | {r['train_accuracy']:.3f} |"
            for r in rows
        ),
        "",
        "Reproduce: `.venv/bin/python experiments/organisms.py && .venv/bin/python experiments/reasoning_vector.py`",
        "",
    ]
    write_report("reasoning_vector", {"rows": rows, "vector_norm": norm}, lines)


if __name__ == "__main__":
    main()
