"""SAE-tuning (Resa) in miniature: does an SAE trained on the RL model carry its gain to the base?

1. A TopK SAE (k = 32, d_sae = 4608) on block 13 of the RL organism, trained on task text (chat-formatted
   questions with their answers, 3,000 questions disjoint from the test split; about 300k tokens).
2. The base is SAE-tuned with Resa's KL loss (teacher: the base itself, adapters off, no SAE; no labels) on
   the organisms' training questions with their answers, once with gradients through the SAE and once
   without (Resa's released code); LoRA rank 32, α 128, on every linear layer, 2 epochs.
3. Baseline: CoT-free SFT with the same LoRA and no SAE (cross-entropy on the answers).
4. The first adapter attached to the SFT organism (Resa's modularity).
Test accuracy of each, the RL model and the base; fraction of the RL gain recovered = (acc − base) /
(RL − base). Writes artifacts/reasoning_transfer/sae_tuning.{md,json}.

    .venv/bin/python experiments/sae_tuning.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import ARTIFACTS, CACHE, accuracy, split, write_report  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit._io import atomic_path  # noqa: E402
from steerkit.evals.tasks import load_task, prompt  # noqa: E402

LAYER, EPOCHS, LR = 13, 2, 2e-4


def task_corpus(tok, test) -> sk.data.corpus.Corpus:
    """Chat-formatted questions with their answers, none of them in the test split."""
    held = {it.question for it in test}
    items = [it for s in (1, 2) for it in load_task("arithmetic", n=1500, steps=s, seed=300 + s)]
    texts = [prompt(tok, it) + f"{it.answer}." for it in items if it.question not in held]
    path = CACHE / "sae_task_corpus.jsonl"
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return sk.load_corpus(path)


def main() -> None:
    for name in ("sft", "rl"):
        if not (CACHE / name / "config.json").is_file():
            raise SystemExit(f"no {CACHE / name}: run experiments/organisms.py first")
    train, test = split()
    base, tok = sk.load_model("smollm2-135m-instruct")
    rl, _ = sk.load_model(CACHE / "rl")
    sft, _ = sk.load_model(CACHE / "sft")
    corpus = task_corpus(tok, test)
    tokens = int(corpus.count_tokens(tok) * 0.9) // 1024 * 1024  # one pass, first positions and outliers aside
    sae = sk.train_sae(rl, tok, corpus, LAYER, d_sae=4608, k=32, tokens=tokens, out=CACHE / "sae_rl", progress=False)
    sae_metrics = {k: v for k, v in sk.evaluate_sae(rl, tok, sae, LAYER, corpus, tokens=4096).items()
                   if k != "latent_frequency"}  # fmt: skip
    data = [{"prompt": prompt(tok, it), "answer": f"{it.answer}."} for it in train]
    texts = [d["prompt"] + d["answer"] for d in data]
    common = dict(epochs=EPOCHS, lr=LR, progress=False)
    results = {"base": accuracy(base, tok, test), "sft": accuracy(sft, tok, test), "rl": accuracy(rl, tok, test)}
    torch.manual_seed(0)
    through = sk.sae_tune(base, tok, sae, LAYER, texts, out=CACHE / "adapter_through", force=True, **common)
    results["sae_tuned (grad through SAE)"] = accuracy(through, tok, test)
    resa = sk.sae_tune(base, tok, sae, LAYER, texts, grad_through_sae=False, **common)
    results["sae_tuned (Resa: SAE under no_grad)"] = accuracy(resa, tok, test)
    plain = sk.sae_tune(base, tok, None, LAYER, data, loss="ce", **common)
    results["CoT-free LoRA SFT, no SAE"] = accuracy(plain, tok, test)
    attached = sk.attach_adapter(sft, CACHE / "adapter_through")
    results["SFT organism + adapter"] = accuracy(attached, tok, test)
    gain = results["rl"]["accuracy"] - results["base"]["accuracy"]
    rows = []
    for name, r in results.items():
        p, n = r["accuracy"], r["n"]
        recovered = (p - results["base"]["accuracy"]) / gain if gain else float("nan")
        rows.append({"model": name, **r, "stderr": math.sqrt(p * (1 - p) / n), "rl_gain_recovered": recovered})
    report = {"sae": sae_metrics, "sae_tokens": tokens, "rows": rows,
              "loss_through": through.history, "loss_resa": resa.history, "loss_plain": plain.history}  # fmt: skip
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    lines = [
        "# SAE-tuning in miniature",
        "",
        f"SAE on the RL organism, block {LAYER}, {tokens:,} task tokens: explained variance "
        f"{sae_metrics['explained_variance']:.3f}, CE loss recovered {sae_metrics['ce_loss_recovered']:.3f}, "
        f"dead {sae_metrics['dead_fraction']:.1%} (on {sae_metrics['tokens']} task tokens).",
        f"SAE-tuning: {len(texts)} texts, {EPOCHS} epochs, lr {LR}, LoRA r 32 / α 128 on every linear layer.",
        "",
        "| model | test accuracy | correct | RL gain recovered |",
        "|---|---|---|---|",
        *(
            f"| {r['model']} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | {r['correct']}/{r['n']} "
            f"| {r['rl_gain_recovered']:.2f} |"
            for r in rows
        ),  # fmt: skip
        "",
        "Reproduce: `.venv/bin/python experiments/organisms.py && .venv/bin/python experiments/sae_tuning.py`",
        "",
    ]
    write_report("sae_tuning", report, lines)


if __name__ == "__main__":
    main()
