"""SAE-tuning (Resa) in miniature: does an SAE trained on the RL model carry its gain to the base?

1. A TopK SAE (k = 32, d_sae = 4608) on block 13 of the RL organism (loaded in bf16, autocast SAE steps),
   trained on task text: chat-formatted questions with their answers, 3,000 questions disjoint from the test
   split, one pass (about 300k tokens).
2. The base is SAE-tuned with Resa's KL loss (teacher: the base itself, adapters off, no SAE; no labels) on
   the organisms' 600 training questions with their answers, once with gradients through the SAE and once
   without (Resa's released code); LoRA rank 32, α 128, on every linear layer, lr 2e-4.
3. Baseline: CoT-free SFT with the same LoRA and no SAE (cross-entropy on the answers).
4. The SFT organism as a second target: the base's adapter (seed 0, gradients through the SAE) attached to
   it (Resa's modularity).
Seeds 0 and 1 for the SAE-tuning with gradients and for the SFT baseline, seed 0 for Resa's setting; one
epoch and bf16 autocast (a KL step takes about 4.4 s here: the budget of this CPU). Accuracy on the test
split and on 200 training questions of each, the RL model and the base; fraction of the RL gain recovered =
(acc − base) / (RL − base). Writes
artifacts/reasoning_transfer/sae_tuning.{md,json,png}.

    .venv/bin/python experiments/sae_tuning.py
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import ARTIFACTS, CACHE, accuracy, split, write_report  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit import plots  # noqa: E402
from steerkit._io import atomic_path  # noqa: E402
from steerkit.evals.tasks import load_task, prompt  # noqa: E402

LAYER, EPOCHS, LR = 13, 1, 2e-4


def task_corpus(tok, test) -> sk.data.corpus.Corpus:
    """Chat-formatted questions with their answers, none of them in the test split."""
    held = {it.question for it in test}
    items = [it for s in (1, 2) for it in load_task("arithmetic", n=1500, steps=s, seed=300 + s)]
    texts = [prompt(tok, it) + f"{it.answer}." for it in items if it.question not in held]
    path = CACHE / "sae_task_corpus.jsonl"
    with atomic_path(path, force=True) as tmp:
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return sk.load_corpus(path)


def main() -> None:
    for name in ("sft", "rl"):
        if not (CACHE / name / "config.json").is_file():
            raise SystemExit(f"no {CACHE / name}: run experiments/organisms.py first")
    train, test = split()
    base, tok = sk.load_model("smollm2-135m-instruct")
    sft, _ = sk.load_model(CACHE / "sft")
    corpus = task_corpus(tok, test)
    tokens = int(corpus.count_tokens(tok) * 0.9) // 1024 * 1024  # one pass, first positions and outliers aside
    start = time.perf_counter()
    rl16, _ = sk.load_model(CACHE / "rl", dtype=torch.bfloat16)
    sae = sk.train_sae(rl16, tok, corpus, LAYER, d_sae=4608, k=32, tokens=tokens, autocast=True,
                       out=CACHE / "sae_rl", progress=False, force=True)  # fmt: skip
    sae_seconds = time.perf_counter() - start
    del rl16
    rl, _ = sk.load_model(CACHE / "rl")
    sae_metrics = {k: v for k, v in sk.evaluate_sae(rl, tok, sae, LAYER, corpus, tokens=8192, progress=False).items()
                   if k != "latent_frequency"}  # fmt: skip

    data = [{"prompt": prompt(tok, it), "answer": f"{it.answer}."} for it in train]
    texts = [d["prompt"] + d["answer"] for d in data]
    common = dict(epochs=EPOCHS, lr=LR, autocast=True, progress=False)
    runs = {  # name: (sae, data, options, seeds)
        "SAE-tuned base (grad through SAE)": (sae, texts, {}, (0, 1)),
        "SAE-tuned base (Resa: SAE under no_grad)": (sae, texts, {"grad_through_sae": False}, (0,)),
        "CoT-free LoRA SFT of the base, no SAE": (None, data, {"loss": "ce"}, (0, 1)),
    }

    def scores(model) -> dict:  # the RL organism's gain is mostly on the training questions: report both
        return {"test": accuracy(model, tok, test), "train": accuracy(model, tok, train[:200])}

    organisms = (("base", base), ("SFT organism", sft), ("RL organism", rl))
    results = {name: [scores(model)] for name, model in organisms}
    histories, seconds = {}, {}
    for name, (sae_, data_, options, seeds) in runs.items():
        results[name] = []
        for seed in seeds:
            start = time.perf_counter()
            keep = seed == 0 and "grad through" in name
            tuned = sk.sae_tune(base, tok, sae_, LAYER, data_, seed=seed, merge=not keep, **common, **options,
                                **({"out": CACHE / "adapter_through", "force": True} if keep else {}))  # fmt: skip
            histories.setdefault(name, tuned.history)
            seconds.setdefault(name, time.perf_counter() - start)
            results[name].append(scores(tuned))
            print(name, seed, results[name][-1])
    attached = sk.attach_adapter(sft, CACHE / "adapter_through")
    results["SFT organism + the base's adapter"] = [scores(attached)]

    rows = []
    for name, runs_ in results.items():
        row = {"model": name}
        for part, prefix in (("test", ""), ("train", "train_")):
            base_acc = results["base"][0][part]["accuracy"]
            gain = results["RL organism"][0][part]["accuracy"] - base_acc
            accs = [r[part]["accuracy"] for r in runs_]
            mean = statistics.fmean(accs)
            row.update({
                f"{prefix}accuracy": mean, f"{prefix}seeds": accs, f"{prefix}n": runs_[0][part]["n"],
                f"{prefix}spread": statistics.stdev(accs) if len(accs) > 1 else None,
                f"{prefix}stderr": math.sqrt(mean * (1 - mean) / runs_[0][part]["n"]),
                f"{prefix}unparsed": [r[part]["unparsed"] for r in runs_],
                f"{prefix}rl_gain_recovered": (mean - base_acc) / gain if gain > 0 else None,
            })  # fmt: skip
        rows.append(row)
    report = {"sae": sae_metrics, "sae_tokens": tokens, "sae_seconds": sae_seconds, "rows": rows,
              "history": histories, "seconds_per_run": seconds}  # fmt: skip

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.3, 1]})
    for y, r in enumerate(rows):
        ax1.barh(y, r["accuracy"], xerr=r["stderr"], color="tab:orange" if "SAE-tuned" in r["model"] else "tab:gray")
        ax1.plot(r["seeds"], [y] * len(r["seeds"]), "k.", ms=5)
    ax1.set_yticks(range(len(rows)), [r["model"] for r in rows], fontsize=7)
    ax1.invert_yaxis()
    ax1.set(xlabel="test accuracy (bar: mean, dots: seeds, line: binomial s.e.)", title="SAE-tuning vs baselines")
    for name, history in histories.items():
        ax2.plot(history, label=name, lw=1)
    ax2.set(xlabel="step", ylabel="loss", yscale="log", title="training loss, seed 0 (KL; CE for the SFT)")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    plots.save_figure(fig, ARTIFACTS / "sae_tuning.png", force=True)

    def fmt(r):
        cells = []
        for prefix in ("", "train_"):
            seeds = "" if r[f"{prefix}spread"] is None else f" ({', '.join(f'{a:.3f}' for a in r[f'{prefix}seeds'])})"
            recovered = r[f"{prefix}rl_gain_recovered"]
            cells += [f"{r[f'{prefix}accuracy']:.3f} ± {r[f'{prefix}stderr']:.3f}{seeds}",
                      "—" if recovered is None else f"{recovered:.2f}"]  # fmt: skip
        return f"| {r['model']} | " + " | ".join(cells) + " |"

    lines = [
        "# SAE-tuning in miniature",
        "",
        f"SAE on the RL organism, block {LAYER}, {tokens:,} task tokens, {sae_seconds:.0f} s: explained variance "
        f"{sae_metrics['explained_variance']:.3f}, CE loss recovered {sae_metrics['ce_loss_recovered']:.3f}, "
        f"L0 {sae_metrics['l0']:.1f}, dead {sae_metrics['dead_fraction']:.1%} (on {sae_metrics['tokens']} held-out "
        "task tokens).",
        f"SAE-tuning: {len(texts)} texts, {EPOCHS} epochs, lr {LR}, LoRA r 32 / α 128 on every linear layer; "
        "bf16 autocast; seeds 0 and 1 where two are listed; "
        + ", ".join(f"{name}: {s:.0f} s" for name, s in seconds.items())
        + " (seed 0).",
        "Accuracy: greedy free-form on the 200 test questions and on 200 of the training questions (the ones the "
        "organisms and the SAE-tuning saw); mean over seeds, each seed in brackets; ± is the binomial standard "
        "error of one run. RL gain recovered = (accuracy − base) / (RL organism − base), on the same questions.",
        "",
        "| model | test accuracy | RL gain recovered (test) | train accuracy | RL gain recovered (train) |",
        "|---|---|---|---|---|",
        *(fmt(r) for r in rows),
        "",
        "![SAE-tuning](sae_tuning.png)",
        "",
        "Reproduce: `.venv/bin/python experiments/organisms.py && .venv/bin/python experiments/sae_tuning.py`",
        "",
    ]
    write_report("sae_tuning", report, lines)


if __name__ == "__main__":
    main()
