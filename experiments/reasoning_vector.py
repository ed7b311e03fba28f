"""Stage 2: the reasoning vector (Zbeeb et al. 2025) added to a separate target.

v = θ_GRPO − θ_SFT for each seed (both organisms from M0 on the same questions). The target M1 is a sibling
of M0 standing in for the paper's instruct model: M0 fine-tuned briefly on the embedded prose corpus. On
validation, M1 + α·v for α in ``ALPHAS``; the α with the best mean validation accuracy over the seeds run so
far is frozen (``experiments/.cache/reasoning_vector/alpha.json``) before any test run. On test, at that α:
M1 + α·v beside M1, and the controls M1 + α·Δ_GRPO and M1 + α·Δ_SFT (Δ = θ − θ_M0), M1 + α·r with r random
with v's per-tensor norms, plus the paper's subtraction M1 − v. Differences are paired on items.

    .venv/bin/python experiments/reasoning_vector.py m1         # build M1 (a few minutes)
    .venv/bin/python experiments/reasoning_vector.py val SEED   # the α sweep on validation, one seed's vector
    .venv/bin/python experiments/reasoning_vector.py test SEED  # frozen α, vector and controls on test
    .venv/bin/python experiments/reasoning_vector.py report
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import ARTIFACTS, CACHE, finetune, mean_sd, write_report  # noqa: E402
from organisms import RUNS, evaluate, signed, task, update_norm  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit import plots  # noqa: E402
from steerkit._io import write_text  # noqa: E402
from steerkit.data.corpus import load_corpus  # noqa: E402
from steerkit.evals.stats import bootstrap, mcnemar, paired_bootstrap  # noqa: E402
from steerkit.sae.tune import save_checkpoint  # noqa: E402

ALPHAS = (-1.0, -0.5, 0.5, 1.0)  # and 0 = M1 itself
M1_DOCS, M1_LR = 1600, 1e-5  # one epoch of 1600 prose documents (100 steps of 16)
HERE = CACHE / "reasoning_vector"
USAGE = "reasoning_vector.py m1 | val SEED | test SEED | report"


def build_m1() -> None:
    out = CACHE / "m1"
    if (out / "train.json").is_file():
        print(f"{out} exists: delete it to rebuild")
        return
    m0, tok = sk.load_model("smollm2-135m-instruct")
    model = copy.deepcopy(m0)
    docs = [doc[:600] for _, doc in zip(range(M1_DOCS), load_corpus().documents("train"), strict=False)]
    losses = finetune(model, tok, [("", d) for d in docs], 1, M1_LR, seed=0)
    save_checkpoint(model, tok, out / "model", force=True)
    log = {"docs": len(docs), "lr": M1_LR, "losses": losses, "distance_to_m0": update_norm(model, m0)}
    write_text(json.dumps(log, indent=1), out / "train.json", force=True)
    print(f"M1: {len(docs)} documents, ‖θ_M1 − θ_M0‖ = {log['distance_to_m0']:.3f}")


def vectors(seed: int) -> dict[str, sk.TaskVector]:
    """v and the controls' deltas for one seed (lazy, read tensor by tensor)."""
    m0 = sk.embedded_checkpoint()
    grpo, sft = RUNS / f"grpo-{seed}" / "model", RUNS / f"sft-{seed}" / "model"
    v = sk.TaskVector.between(grpo, sft)
    g = torch.Generator().manual_seed(1000 + seed)
    random = {}
    for name in v.deltas:
        delta = v.deltas[name]
        noise = torch.randn(delta.shape, generator=g)
        random[name] = noise * (delta.norm() / noise.norm())
    return {
        "v": v,
        "delta_grpo": sk.TaskVector.between(grpo, m0),
        "delta_sft": sk.TaskVector.between(sft, m0),
        "random": sk.TaskVector(random),
    }


def score(name: str, vector: sk.TaskVector | None, alpha: float, split: str) -> dict:
    """Accuracy of M1 + α·vector on ``split`` (cached under ``name``)."""
    spec, splits, _ = task()
    m1, tok = sk.load_model(CACHE / "m1" / "model")
    if vector is not None:
        vector.add_to(m1, alpha)
    return evaluate(name, m1, tok, splits[split], split, spec["example"], spec["budget"])


def sweep(seed: int) -> None:
    v = vectors(seed)["v"]
    score("m1", None, 0.0, "val")
    for alpha in ALPHAS:
        result = score(f"rv{seed}-v{alpha:+g}", v, alpha, "val")
        print(f"seed {seed}, α {alpha:+g}: val {result['accuracy']:.3f}")


def swept_seeds() -> list[int]:
    """The seeds whose validation sweep has run."""
    return sorted(int(p.name.split("-")[0][2:]) for p in (CACHE / "eval").glob("rv*-v+1-val.json"))


def frozen_alpha() -> dict:
    """The α with the best mean validation accuracy over the seeds swept so far, frozen at first use."""
    path = HERE / "alpha.json"
    if path.is_file():
        return json.loads(path.read_text())
    seeds = swept_seeds()
    means = {a: sum(json.loads((CACHE / "eval" / f"rv{s}-v{a:+g}-val.json").read_text())["accuracy"]
                    for s in seeds) / len(seeds) for a in ALPHAS}  # fmt: skip
    choice = {"alpha": max(means, key=means.get), "val_means": means, "seeds": seeds}
    write_text(json.dumps(choice, indent=1), path, force=True)
    return choice


def test(seed: int) -> None:
    alpha = frozen_alpha()["alpha"]
    vecs = vectors(seed)
    score("m1", None, 0.0, "test")
    score(f"rv{seed}-v{alpha:+g}", vecs["v"], alpha, "test")
    score(f"rv{seed}-v-1", vecs["v"], -1.0, "test")
    for control in ("delta_grpo", "delta_sft", "random"):
        score(f"rv{seed}-{control}{alpha:+g}", vecs[control], alpha, "test")


def load(name: str, split: str) -> dict | None:
    path = CACHE / "eval" / f"{name}-{split}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def report() -> None:
    choice = frozen_alpha()
    alpha = choice["alpha"]
    m1_log = json.loads((CACHE / "m1" / "train.json").read_text())
    seeds = sorted({int(p.name.split("-")[0][2:]) for p in (CACHE / "eval").glob("rv*-random*-test.json")})
    m0_val, m1_val, m1_test = load("m0", "val"), load("m1", "val"), load("m1", "test")
    lines = [
        "# Stage 2: the reasoning vector on a separate target",
        "",
        "Paper (Zbeeb et al. 2025): v = θ_GRPO − θ_SFT from Qwen2.5-Math-1.5B added (α = 1, every tensor) to "
        "Qwen2.5-1.5B-Instruct: GSM8K +4.9 points; subtracting it: −11.8.",
        f"Here: v from the stage-1 organisms of each seed; target M1 = M0 fine-tuned on {m1_log['docs']} prose "
        f"documents (lr {m1_log['lr']}; ‖θ_M1 − θ_M0‖ = {m1_log['distance_to_m0']:.2f}). "
        f"Validation accuracy: M0 {m0_val['accuracy']:.3f}, M1 {m1_val['accuracy']:.3f}.",
        f"α chosen on validation (mean over seeds {choice['seeds']}): "
        + ", ".join(f"{float(a):+g}: {m:.3f}" for a, m in choice["val_means"].items())
        + f" (M1 alone {m1_val['accuracy']:.3f}) → α = {alpha:+g}, frozen before test.",
        "",
        f"Test (1000 items): M1 {m1_test['accuracy']:.3f} (truncated {m1_test['truncated']:.3f}). Each cell: accuracy, "
        "difference to M1 paired on items (mean [95% bootstrap]), McNemar p, truncation rate.",
        "",
        f"| seed | M1 + {alpha:g}·v | M1 − v | control M1 + {alpha:g}·Δ_GRPO | control M1 + {alpha:g}·Δ_SFT "
        f"| control M1 + {alpha:g}·random |",
        "|---|---|---|---|---|---|",
    ]
    rows = {}
    for seed in seeds:
        cells = []
        for key in (f"v{alpha:+g}", "v-1", f"delta_grpo{alpha:+g}", f"delta_sft{alpha:+g}", f"random{alpha:+g}"):
            r = load(f"rv{seed}-{key}", "test")
            diff = paired_bootstrap(r["correct"], m1_test["correct"])
            p = mcnemar(r["correct"], m1_test["correct"])
            rows[seed, key] = {"accuracy": r["accuracy"], "diff": diff, "p": p, "truncated": r["truncated"]}
            cells.append(f"{r['accuracy']:.3f}, {signed(diff)}, p {p:.2g}, trunc. {r['truncated']:.3f}")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    if len(seeds) > 1:
        keys = (f"v{alpha:+g}", "v-1", f"delta_grpo{alpha:+g}", f"delta_sft{alpha:+g}", f"random{alpha:+g}")
        spread = [mean_sd(rows[s, k]["diff"][0] for s in seeds) for k in keys]
        lines.append(f"| mean ± s.d. of − M1 over {len(seeds)} seeds | " + " | ".join(spread) + " |")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for seed in swept_seeds():
        accs = [load(f"rv{seed}-v{a:+g}", "val")["accuracy"] for a in ALPHAS]
        chose = " (chose α)" if seed in choice["seeds"] else ""
        ax.plot([*ALPHAS[:2], 0.0, *ALPHAS[2:]], [*accs[:2], m1_val["accuracy"], *accs[2:]], "o-",
                label=f"seed {seed}{chose}")  # fmt: skip
    low, high = bootstrap([float(c) for c in m1_val["correct"]])[1:]
    ax.axhspan(low, high, color="gray", alpha=0.2, label="M1, 95% interval")
    ax.set(xlabel="α", ylabel="validation accuracy", title="M1 + α·(θ_GRPO − θ_SFT)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save_figure(fig, ARTIFACTS / "reasoning_vector.png", force=True)
    lines += ["", "![validation sweep](reasoning_vector.png)", ""]
    lines += [f"Reproduce: `.venv/bin/python experiments/{USAGE}`", ""]
    data = {"alpha": choice, "m1": {k: v for k, v in m1_log.items() if k != "losses"},
            "rows": {f"{s}/{k}": r for (s, k), r in rows.items()}}  # fmt: skip
    write_report("reasoning_vector", data, lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["m1"]:
        build_m1()
    elif args == ["report"]:
        report()
    elif len(args) == 2 and args[0] in ("val", "test") and args[1].isdigit():
        (sweep if args[0] == "val" else test)(int(args[1]))
    else:
        raise SystemExit(f"usage: {USAGE}")
