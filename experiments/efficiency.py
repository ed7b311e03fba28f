"""Stage 5: efficiency steering (Zhao et al. 2025), round three, on a model with something to shorten.

M0's answers are one calculation long, so round two found few pairs to learn from. Here a verbose-capable
organism V is M0 fine-tuned briefly on gold solutions of which half are concise ("12 + 5 = 17. The answer is
17.") and half verbose (the same calculation in words, then a check step), with the same instruction, so that
V writes either. Pairs: V's own *correct* solutions of one question (``SAMPLES`` at T = 0.8, budget
``BUDGET``), the shortest against the longest where the longer has at least ``MIN_RATIO`` times the tokens;
questions held out every fifth. The direction at each of ``LAYERS`` is the mean over pairs of (concise −
verbose), each text's activations averaged over its solution tokens. The layer and α are chosen on validation
(the shortest mean length whose accuracy stays within ``MARGIN`` of V's) and frozen before test, where V + α·v
is compared with a "Be concise." instruction, a random direction of equal norm and the bundled ``concise``
vector (extracted from V, rescaled to the same norm): length, and accuracy with the non-inferiority margin.

    .venv/bin/python experiments/efficiency.py organism   # V (about 5 minutes)
    .venv/bin/python experiments/efficiency.py samples    # V's samples (about 10 minutes)
    .venv/bin/python experiments/efficiency.py run        # direction, validation, test, report (about 20 minutes)
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import ARTIFACTS, EVAL_BATCH, finetune, interior_choice, write_report  # noqa: E402
from control_vectors import EVAL_DTYPE, HERE, LAYERS, MARGIN, auroc_lines, frozen, random_like, run  # noqa: E402
from organisms import RUNS, signed, task  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit import plots  # noqa: E402
from steerkit._io import write_text  # noqa: E402
from steerkit.capture import capture  # noqa: E402
from steerkit.evals.stats import auroc_null, bootstrap, holm, paired_bootstrap  # noqa: E402
from steerkit.evals.worked import SYSTEM, render, score_worked  # noqa: E402
from steerkit.extract import auroc  # noqa: E402
from steerkit.sae.tune import save_checkpoint  # noqa: E402
from steerkit.steer import completions  # noqa: E402

TRAIN_ITEMS, LR = 1000, 6e-6  # V: one epoch over the first 1000 training questions, stage 1's SFT lr
QUESTIONS, SAMPLES, TEMPERATURE, BUDGET = slice(1000, 1400), 8, 0.8, 128  # questions V was not tuned on
ALPHAS, MIN_RATIO, N_TEST, MIN_PAIRS = (0.5, 1.0, 2.0, 4.0), 1.5, 500, 200
CONCISE_SYSTEM = SYSTEM + " Be concise."
ORGANISM = RUNS / "verbose-0"
USAGE = "efficiency.py organism | samples | run"


def verbose(item) -> str:
    """The gold calculation in words, then a check step that undoes it, then the answer."""
    name, start, thing = re.match(r"(\w+) has (\d+) (\w+)\.", item.question).groups()
    a, op, b, _, c = re.match(r"(\d+) ([+-]) (\d+) (=) (\d+)", item.meta["expression"]).groups()
    verb, undo = ("gets", "-") if op == "+" else ("gives away", "+")
    how = "add" if op == "+" else "subtract"
    more = " more" if op == "+" else ""
    return (f"{name} starts with {start} {thing} and {verb} {b}{more}, so we {how}: {a} {op} {b} = {c}. "
            f"Check: {c} {undo} {b} = {a}, which matches. The answer is {c}.")  # fmt: skip


def organism() -> None:
    if (ORGANISM / "train.json").is_file():
        print(f"{ORGANISM} exists: delete it to rebuild")
        return
    spec, splits, _ = task()
    model, tok = sk.load_model("smollm2-135m-instruct")
    items = splits["train"][:TRAIN_ITEMS]
    pairs = [(render(tok, it, spec["example"]), (verbose(it) if i % 2 else it.meta["solution"]) + tok.eos_token)
             for i, it in enumerate(items)]  # fmt: skip
    losses = finetune(model, tok, pairs, 1, LR, seed=0)
    save_checkpoint(model, tok, ORGANISM / "model", force=True)
    log = {"items": len(items), "lr": LR, "losses": losses, "example_verbose": verbose(items[1])}
    write_text(json.dumps(log, indent=1), ORGANISM / "train.json", force=True)


def load_v(dtype=None):
    return sk.load_model(ORGANISM / "model", dtype=dtype)


def samples() -> list[dict]:
    """V's sampled solutions of ``QUESTIONS`` training questions, graded, with token lengths (cached)."""
    path = HERE / "eff-samples.json"
    if path.is_file():
        return json.loads(path.read_text())
    spec, splits, _ = task()
    model, tok = load_v(EVAL_DTYPE)
    items = splits["train"][QUESTIONS]
    torch.manual_seed(0)
    kwargs = {"do_sample": True, "temperature": TEMPERATURE, "top_p": 1.0, "num_return_sequences": SAMPLES}
    outs = completions(model, tok, [render(tok, it, spec["example"]) for it in items], BUDGET, EVAL_BATCH // SAMPLES,
                       True, **kwargs)  # fmt: skip
    rows = []
    for q, item in enumerate(items):
        mine = outs[q * SAMPLES : (q + 1) * SAMPLES]
        rows.append({"texts": [t for t, _ in mine],
                     "correct": [score_worked(t, f, item).correct for t, f in mine],
                     "lengths": [len(tok(t, add_special_tokens=False)["input_ids"]) for t, _ in mine]})  # fmt: skip
    write_text(json.dumps(rows), path, force=True)
    return rows


def pairs(tok) -> list[tuple[str, str, str, str]]:
    """(prompt, concise, verbose, split) per question: its shortest and longest distinct correct solutions
    where the longer has at least ``MIN_RATIO`` times the tokens; every fifth such question held out."""
    spec, splits, _ = task()
    items = splits["train"][QUESTIONS]
    out = []
    for item, row in zip(items, samples(), strict=True):
        right = {t: n for t, c, n in zip(row["texts"], row["correct"], row["lengths"], strict=True) if c}
        if len(right) < 2:
            continue
        short, long = min(right, key=right.get), max(right, key=right.get)
        if right[long] >= MIN_RATIO * right[short]:
            out.append((render(tok, item, spec["example"]), short, long, "test" if len(out) % 5 == 4 else "train"))
    return out


def solution_means(model, tok, prompts: list[str], solutions: list[str]) -> torch.Tensor:
    """``[N, len(LAYERS), d]``: each text's residual stream averaged over its solution tokens only."""
    texts = [p + s for p, s in zip(prompts, solutions, strict=True)]
    acts, rows = capture(model, tok, texts, list(LAYERS), position="all", batch_size=16)
    out = []
    for n, (p, t) in enumerate(zip(prompts, texts, strict=True)):
        mine = acts[rows == n]
        k = len(tok(t, add_special_tokens=False)["input_ids"]) - len(tok(p, add_special_tokens=False)["input_ids"])
        out.append(mine[-k:].mean(0))
    return torch.stack(out)


def direction(model, tok, found) -> tuple[sk.SteeringVector, dict]:
    """Mean (concise − verbose) of the training pairs per layer; held-out AUROC and its permutation null."""
    train = [f for f in found if f[3] == "train"]
    held = [f for f in found if f[3] == "test"]
    prompts = [f[0] for f in train + held]
    concise = solution_means(model, tok, prompts, [f[1] for f in train + held])
    wordy = solution_means(model, tok, prompts, [f[2] for f in train + held])
    n, stats, vecs = len(train), {}, {}
    for j, layer in enumerate(LAYERS):
        v = (concise[:n, j] - wordy[:n, j]).mean(0)
        pos, neg = concise[n:, j] @ v, wordy[n:, j] @ v
        observed, p, null = auroc_null(pos, neg)
        _, low, high = bootstrap(torch.stack([pos, neg], 1), stat=lambda s: torch.tensor(auroc(s[:, 0], s[:, 1])))
        stats[layer] = {"auroc": observed, "low": low, "high": high, "p": p,
                        "null95": float(torch.quantile(torch.tensor(null), 0.95)), "norm": float(v.norm())}  # fmt: skip
        vecs[layer] = v
    return sk.SteeringVector(vecs, {"n_train": n, "n_test": len(held)}), stats


def relative_lengths(treated: dict, base: dict) -> list[float]:
    """Per item, the treated answer's token length relative to the base's, minus 1 (−0.1: 10% shorter)."""
    return [t / max(b, 1) - 1 for t, b in zip(treated["lengths"], base["lengths"], strict=True)]


def one_sided_p(diffs: list[float], margin: float = 0.0) -> float:
    """p of a paired z-test that the mean difference is at or below −``margin`` (n is hundreds here)."""
    t = torch.tensor(diffs, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(t)))
    z = (float(t.mean()) + margin) / se if se > 0 else math.copysign(math.inf, float(t.mean()) + margin)
    return 0.5 * math.erfc(z / math.sqrt(2))


def main() -> None:
    spec, splits, _ = task()
    model, tok = load_v()
    model16 = copy.deepcopy(model).to(EVAL_DTYPE)
    found = pairs(tok)
    if len(found) < MIN_PAIRS:
        raise SystemExit(f"only {len(found)} pairs of correct solutions with a length ratio >= {MIN_RATIO}: "
                         f"expected at least {MIN_PAIRS}")  # fmt: skip
    vector, stats = direction(model, tok, found)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731

    def val_run(layer: int, a: float) -> dict:
        v = sk.SteeringVector({layer: vector[layer]})
        return run(f"eff-L{layer}-val{a:+g}", model16, tok, splits["val"], v, a, budget=BUDGET)

    base_val = run("eff-v-val", model16, tok, splits["val"], budget=BUDGET)
    sweeps = {}
    for layer in LAYERS:

        def shortness(a: float, layer: int = layer) -> float:
            r = val_run(layer, a)
            return -mean(r["lengths"]) if r["accuracy"] >= base_val["accuracy"] - MARGIN else -math.inf

        best, scores, interior = interior_choice(shortness, ALPHAS, geometric=True)
        runs = {a: {"accuracy": r["accuracy"], "length": mean(r["lengths"])}
                for a, r in ((a, val_run(layer, a)) for a in scores)}  # fmt: skip
        sweeps[layer] = {"alpha": best, "interior": interior, "ok": scores[best] > -math.inf, "runs": runs}

    def choose() -> dict:
        ok = [k for k in LAYERS if sweeps[k]["ok"]]
        if not ok:
            return {"layer": None, "alpha": None}
        layer = min(ok, key=lambda k: sweeps[k]["runs"][sweeps[k]["alpha"]]["length"])
        return {"layer": layer, "alpha": sweeps[layer]["alpha"], "interior": sweeps[layer]["interior"]}

    choice = frozen("efficiency_alpha", choose)
    if choice["layer"] is None:
        raise SystemExit("no layer and α keep validation accuracy within the margin: nothing to test")
    layer, alpha = choice["layer"], choice["alpha"]
    v = sk.SteeringVector({layer: vector[layer]}, {"alpha": alpha, "stage": "5: concise − verbose, V"})
    v.save(ARTIFACTS / "vectors" / "efficiency.safetensors", force=True)
    items = splits["test"][:N_TEST]
    bundled = sk.extract(model, tok, sk.load_pairs("concise", split="train"), layers=[layer], progress=False)
    bundled = sk.SteeringVector({layer: bundled[layer] / bundled[layer].norm() * v[layer].norm()})
    runs = {
        "V": run("eff-v-test", model16, tok, items, budget=BUDGET),
        f"V + {alpha:g}·v (own pairs)": run(f"eff-test{alpha:+g}", model16, tok, items, v, alpha, budget=BUDGET),
        '"Be concise." in the instruction': run(
            "eff-prompt-test", model16, tok, items, system=CONCISE_SYSTEM, budget=BUDGET
        ),  # fmt: skip
        f"V + {alpha:g}·random (equal norm)": run(
            f"eff-random-test{alpha:+g}", model16, tok, items, random_like(v, layer), alpha, budget=BUDGET
        ),  # fmt: skip
        f"V + {alpha:g}·bundled concise (equal norm)": run(
            f"eff-bundled-test{alpha:+g}", model16, tok, items, bundled, alpha, budget=BUDGET
        ),  # fmt: skip
    }
    base = runs["V"]
    rows, family = {}, {}
    for label, r in list(runs.items())[1:]:
        rel = relative_lengths(r, base)
        acc_d = [float(a) - float(b) for a, b in zip(r["correct"], base["correct"], strict=True)]
        acc = paired_bootstrap(r["correct"], base["correct"])
        family[f"{label}: shorter"] = one_sided_p([-x for x in rel])
        family[f"{label}: accuracy non-inferior"] = one_sided_p(acc_d, MARGIN)
        rows[label] = {"length": bootstrap(r["lengths"]), "relative_length": bootstrap(rel), "accuracy": r["accuracy"],
                       "accuracy_diff": acc, "truncated": r["truncated"]}  # fmt: skip
    adjusted = dict(zip(family, holm(list(family.values())), strict=True))
    for label, row in rows.items():
        row["p_shorter"], row["p_non_inferior"] = (
            adjusted[f"{label}: shorter"],
            adjusted[f"{label}: accuracy non-inferior"],
        )
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for k in LAYERS:
        pts = sorted(sweeps[k]["runs"].items())
        axes[0].plot([p[1]["length"] for p in pts], [p[1]["accuracy"] for p in pts], "o-", label=f"layer {k}")
    axes[0].plot([mean(base_val["lengths"])], [base_val["accuracy"]], "k*", ms=10, label="V")
    axes[0].axhline(base_val["accuracy"] - MARGIN, color="gray", ls="--", lw=0.8, label=f"V − {MARGIN}")
    axes[0].set(xlabel="mean length (tokens)", ylabel="validation accuracy", title="α sweep by layer (α grows →)")
    for label, r in rows.items():
        (m, lo, hi), (d, dlo, dhi) = r["length"], r["accuracy_diff"]
        axes[1].errorbar(m, d, xerr=[[m - lo], [hi - m]], yerr=[[d - dlo], [dhi - d]], fmt="o", capsize=3, label=label)
    axes[1].plot([bootstrap(base["lengths"])[0]], [0], "k*", ms=10, label="V")
    axes[1].axhline(-MARGIN, color="gray", ls="--", lw=0.8, label=f"non-inferiority margin −{MARGIN}")
    axes[1].set(xlabel="mean answer length (tokens)", ylabel="accuracy − V (paired)", title="test")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    plots.save_figure(fig, ARTIFACTS / "efficiency.png", force=True)
    train_log = json.loads((ORGANISM / "train.json").read_text())
    tried = sorted(set().union(*(sweeps[k]["runs"] for k in LAYERS)))

    def cell(k: int, a: float) -> str:
        r = sweeps[k]["runs"].get(a)
        return f"{r['accuracy']:.3f}, {r['length']:.1f}" if r else "-"

    def chosen(k: int) -> str:
        s = sweeps[k]
        return f"{s['alpha']:g}" + ("" if s["interior"] else " (edge)") + ("" if s["ok"] else " (none within margin)")

    rows_all = samples()
    n_samples = sum(len(r["texts"]) for r in rows_all)
    lines = [
        "# Stage 5: efficiency steering",
        "",
        "Paper (Zhao et al. 2025): the difference between concise and verbose correct solutions of the same "
        "problem is one direction; added at inference it shortens reasoning while keeping accuracy.",
        f"Here: the verbose-capable organism V = M0 fine-tuned one epoch (lr {train_log['lr']:g}) on "
        f'{train_log["items"]} gold solutions, every other one verbose, e.g. "{train_log["example_verbose"]}". '
        f"V's own samples: {len(rows_all)} training questions it was not tuned on x {SAMPLES} at T {TEMPERATURE}, "
        f"budget {BUDGET} (sample accuracy {sum(sum(r['correct']) for r in rows_all) / n_samples:.3f}); "
        f"{len(found)} pairs of two correct solutions of one question, length ratio >= {MIN_RATIO} "
        f"({vector.metadata['n_train']} training / {vector.metadata['n_test']} held out by question). Each text's "
        "activations averaged over its solution tokens; v = mean (concise − verbose). Generation in bf16, greedy.",
        "",
        *auroc_lines(stats),
        "",
        f"Validation ({len(splits['val'])} items): V's accuracy {base_val['accuracy']:.3f}, mean length "
        f"{mean(base_val['lengths']):.1f} tokens. Per layer, the α (grid {', '.join(f'{a:g}' for a in ALPHAS)}, "
        "doubled past a winning edge) with the shortest answers whose accuracy stays within "
        f"{MARGIN} of V's:",
        "",
        "| layer | " + " | ".join(f"α {a:g}: accuracy, length" for a in tried) + " | chosen |",
        "|---|" + "---|" * (len(tried) + 1),
        *(f"| {k} | " + " | ".join(cell(k, a) for a in tried) + f" | {chosen(k)} |" for k in LAYERS),
        "",
        f"Frozen: layer {layer}, α {alpha:g}.",
        "",
        f"Test ({len(items)} items): V {bootstrap(base['lengths'])[0]:.1f} tokens, accuracy {base['accuracy']:.3f}. "
        "Intervals 95% bootstrap over items, accuracy paired with V; one-sided paired z-tests (shorter than V; "
        f"accuracy above V − {MARGIN}), Holm over the {len(family)} tests:",
        "",
        "| condition | mean length | length / V's − 1 | Holm p (shorter) | accuracy | − V (paired) "
        "| Holm p (non-inferior) | truncated |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {k} | {r['length'][0]:.1f} [{r['length'][1]:.1f}, {r['length'][2]:.1f}] "
            f"| {signed(r['relative_length'])} | {r['p_shorter']:.2g} | {r['accuracy']:.3f} "
            f"| {signed(r['accuracy_diff'])} | {r['p_non_inferior']:.2g} | {r['truncated']:.3f} |"
            for k, r in rows.items()
        ),
        "",
        "![the α sweep and the test conditions](efficiency.png)",
        "",
        "Reproduce: `.venv/bin/python experiments/efficiency.py organism`, then `samples`, then `run`.",
        "",
    ]
    data = {"pairs": len(found), "auroc": stats, "layer": layer, "alpha": alpha, "sweeps": sweeps, "rows": rows,
            "v": {"accuracy": base["accuracy"], "length": bootstrap(base["lengths"])},
            "val_v": {"accuracy": base_val["accuracy"], "length": mean(base_val["lengths"])}}  # fmt: skip
    write_report("efficiency", data, lines)


if __name__ == "__main__":
    commands = {"organism": organism, "samples": samples, "run": main}
    args = sys.argv[1:]
    if len(args) != 1 or args[0] not in commands:
        raise SystemExit(f"usage: {USAGE}")
    commands[args[0]]()
