"""Stages 4 and 5: control vectors from M0's own worked solutions.

``samples``: M0 answers the first ``N_QUESTIONS`` training questions ``SAMPLES`` times at T = 0.8 (the gate's
sampling), graded by the first-answer scorer. Both stages read their pairs from these samples, hold them out by
question (every fifth question with pairs), and read the residual stream at the last token of prompt + solution
at ``LAYERS``, fixed in advance; the steering layer is the one with the best held-out AUROC (training questions
only), α is chosen on validation and frozen before test.

``reasoning`` (Højer et al. 2025): correct vs wrong (answered) solutions of the same question, up to two pairs
per question; mean difference; held-out AUROC with a bootstrap interval and a pair-swap permutation null;
first-token KL and entropy and greedy accuracy over α on validation; at the frozen α on test, beside M0 and a
random direction of equal norm.

``efficiency`` (Zhao et al. 2025): shortest vs longest equally correct solution of the same question (length ratio
>= 1.5); α chosen on validation as the largest length cut whose accuracy stays within ``MARGIN`` of M0's; on
``N_EFFICIENCY`` test items against a "be concise" instruction, a random direction of equal norm and the bundled
``concise`` vector (rescaled to the same norm); accuracy judged non-inferior when the paired interval's lower
end is above −``MARGIN``.

    .venv/bin/python experiments/control_vectors.py samples      # about 30 minutes
    .venv/bin/python experiments/control_vectors.py reasoning    # about 20 minutes; writes its report
    .venv/bin/python experiments/control_vectors.py efficiency   # about 20 minutes; writes its report
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import ARTIFACTS, CACHE, write_report  # noqa: E402
from organisms import ci, signed, task  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit import plots  # noqa: E402
from steerkit._io import atomic_path, write_text  # noqa: E402
from steerkit.capture import capture  # noqa: E402
from steerkit.evals.logits import entropy, kl, next_token_logprobs  # noqa: E402
from steerkit.evals.stats import auroc_null, bootstrap, mcnemar, paired_bootstrap  # noqa: E402
from steerkit.evals.worked import SYSTEM, grade_worked, render, score_worked  # noqa: E402
from steerkit.extract import auroc  # noqa: E402
from steerkit.steer import completions  # noqa: E402

N_QUESTIONS, SAMPLES, TEMPERATURE = 480, 8, 0.8
LAYERS = (10, 15, 20)  # a third, half and two thirds of the 30 blocks, fixed before any pair was seen
REASONING_ALPHAS = (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0)
EFFICIENCY_ALPHAS = (0.5, 1.0, 2.0, 4.0)
MIN_RATIO, MARGIN, N_EFFICIENCY, MIN_PAIRS = 1.5, 0.03, 500, 10
CONCISE_SYSTEM = SYSTEM + " Be concise."
HERE = CACHE / "own"
USAGE = "control_vectors.py samples | reasoning | efficiency"


def samples() -> list[dict]:
    """Per training question: the sampled texts, whether each finished, its answer and correctness (cached)."""
    path = HERE / "samples.json"
    if path.is_file():
        return json.loads(path.read_text())
    spec, splits, _ = task()
    model, tok = sk.load_model("smollm2-135m-instruct")
    items = splits["train"][:N_QUESTIONS]
    torch.manual_seed(0)
    kwargs = {"do_sample": True, "temperature": TEMPERATURE, "top_p": 1.0, "num_return_sequences": SAMPLES}
    prompts = [render(tok, it, spec["example"]) for it in items]
    outs = completions(model, tok, prompts, spec["budget"], 64 // SAMPLES, True, **kwargs)
    rows = []
    for q, item in enumerate(items):
        mine = outs[q * SAMPLES : (q + 1) * SAMPLES]
        scored = [score_worked(t, f, item) for t, f in mine]
        rows.append({"question": q, "texts": [t for t, _ in mine], "finished": [f for _, f in mine],
                     "answers": [s.answer for s in scored], "correct": [s.correct for s in scored]})  # fmt: skip
    write_text(json.dumps(rows), path, force=True)
    accuracy = sum(sum(r["correct"]) for r in rows) / len(rows) / SAMPLES
    print(f"{len(items)} questions x {SAMPLES}: sample accuracy {accuracy:.3f}")
    return rows


def held_out(pairs_by_question: list[list[tuple[str, str]]], prompts: list[str]) -> list[sk.Pair]:
    """Pairs as prompt + solution texts; every fifth question that has pairs goes to the held-out split."""
    out = []
    for k, (q, pairs) in enumerate((q, p) for q, p in enumerate(pairs_by_question) if p):
        for pos, neg in pairs:
            out.append(sk.Pair(prompts[q] + pos, prompts[q] + neg, "test" if k % 5 == 4 else "train"))
    return out


def own_pairs(kind: str, tok, counts: dict | None = None) -> list[sk.Pair]:
    """``reasoning``: (correct, wrong answered) up to two per question. ``efficiency``: (shortest, longest)
    among the correct solutions of a question, and the same among its wrong answered ones, where the longer has
    at least ``MIN_RATIO`` times the tokens (the members of a pair are equally correct); ``counts`` gets how
    many pairs each kind of group gave."""
    spec, splits, _ = task()
    prompts = [render(tok, it, spec["example"]) for it in splits["train"][:N_QUESTIONS]]
    by_question = []
    for r in samples():
        graded = list(zip(r["texts"], r["correct"], r["answers"], strict=True))
        right = list(dict.fromkeys(t for t, c, _ in graded if c))
        wrong = list(dict.fromkeys(t for t, c, a in graded if not c and a is not None))
        if kind == "reasoning":
            by_question.append(list(zip(right * 2, wrong, strict=False))[:2] if right and wrong else [])
            continue
        pairs = []
        for label, group in (("correct", right), ("wrong", wrong)):
            length = {t: len(tok(t, add_special_tokens=False)["input_ids"]) for t in group}
            ranked = sorted(group, key=length.get)
            if len(ranked) >= 2 and length[ranked[-1]] >= MIN_RATIO * length[ranked[0]]:
                pairs.append((ranked[0], ranked[-1]))
                if counts is not None:
                    counts[label] = counts.get(label, 0) + 1
        by_question.append(pairs)
    return held_out(by_question, prompts)


def error_kinds(texts: list[str], items) -> dict[str, int]:
    """How the answers went wrong: the first calculation written uses the wrong operation, the right operation
    miscomputed, or no calculation at all (one-step items only)."""
    counts = {"correct": 0, "wrong operation": 0, "wrong arithmetic": 0, "no calculation": 0}
    for item, text in zip(items, texts, strict=True):
        a, b = (int(x) for x in re.findall(r"\d+", item.question)[:2])
        op = "+" if int(item.answer) == a + b else "-"
        m = re.search(r"\d+\s*([+-])\s*\d+\s*=\s*-?\d+", text)
        if score_worked(text, True, item).correct:
            counts["correct"] += 1
        elif m is None:
            counts["no calculation"] += 1
        else:
            counts["wrong operation" if m[1] != op else "wrong arithmetic"] += 1
    return counts


def directions(model, tok, pairs: list[sk.Pair]) -> tuple[sk.SteeringVector, dict]:
    """Mean-difference vector at ``LAYERS`` and, per layer, held-out AUROC with its bootstrap interval and
    permutation p-value (1000 random swaps within the held-out pairs)."""
    train = [p for p in pairs if p.split == "train"]
    test = [p for p in pairs if p.split == "test"]
    texts = [p.positive for p in train] + [p.negative for p in train] + [p.positive for p in test]
    acts = capture(model, tok, texts + [p.negative for p in test], list(LAYERS), batch_size=16)
    n, m = len(train), len(test)
    stats, vecs = {}, {}
    for j, layer in enumerate(LAYERS):
        diffs = acts[:n, j] - acts[n : 2 * n, j]
        test_pos, test_neg = acts[2 * n : 2 * n + m, j], acts[2 * n + m :, j]
        v = diffs.mean(0)
        pos_scores, neg_scores = test_pos @ v, test_neg @ v
        observed, p, null = auroc_null(pos_scores, neg_scores)
        held = torch.stack([pos_scores, neg_scores], 1)  # bootstrap resamples held-out pairs, not texts
        _, low, high = bootstrap(held, stat=lambda s: torch.tensor(auroc(s[:, 0], s[:, 1])))
        null95 = float(torch.quantile(torch.tensor(null), 0.95))
        stats[layer] = {"auroc": observed, "low": low, "high": high, "p": p, "null95": null95, "norm": float(v.norm())}
        vecs[layer] = v
    return sk.SteeringVector(vecs, {"n_train": n, "n_test": m}), stats


def random_like(vector: sk.SteeringVector, layer: int, seed: int = 0) -> sk.SteeringVector:
    """A random direction at ``layer`` with the norm of ``vector[layer]``."""
    r = torch.randn(vector.d_model, generator=torch.Generator().manual_seed(seed))
    return sk.SteeringVector({layer: r / r.norm() * vector[layer].norm()})


def run(
    name: str, model, tok, items, vector=None, alpha: float = 0.0, system: str = SYSTEM, keep_first: bool = False
) -> dict:
    """Greedy generations of the budget on ``items`` (steered by α·vector when given), graded, with token
    lengths; cached under ``HERE/{name}.json``. ``keep_first``: also the first-token entropy, and the
    first-token log-probabilities in ``{name}.first.pt`` for the KL to another run."""
    path = HERE / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    spec = task()[0]
    prompts = [render(tok, it, spec["example"], system) for it in items]
    steering = sk.steer(model, vector, alpha) if vector is not None else contextlib.nullcontext()
    with steering:
        outs = completions(model, tok, prompts, spec["budget"], 64, return_finished=True)
        first = next_token_logprobs(model, tok, prompts, 32) if keep_first else None
    texts = [t for t, _ in outs]
    result = grade_worked(texts, [f for _, f in outs], items)
    result["lengths"] = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    result["texts"] = texts
    if keep_first:
        result["entropy"] = entropy(first).tolist()
        with atomic_path(HERE / f"{name}.first.pt", force=True) as tmp:
            torch.save(first, tmp)
    write_text(json.dumps(result), path, force=True)
    return result


def first_kl(name: str, reference: str) -> float:
    """Mean KL(P_reference ‖ P_name) of the first generated token over the items."""
    p, q = (torch.load(HERE / f"{n}.first.pt") for n in (reference, name))
    return float(kl(p, q).mean())


def frozen(name: str, choose) -> dict:
    """A choice made on validation, written before any test run and read back after."""
    path = HERE / f"{name}.json"
    if not path.is_file():
        write_text(json.dumps(choose(), indent=1), path, force=True)
    return json.loads(path.read_text())


def auroc_lines(stats: dict) -> list[str]:
    lines = ["| layer | held-out AUROC [95% bootstrap] | permutation p | null 95th percentile | ‖v‖ |",
             "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {layer} | {s['auroc']:.3f} [{s['low']:.3f}, {s['high']:.3f}] | {s['p']:.3g} | {s['null95']:.3f} "
              f"| {s['norm']:.2f} |" for layer, s in stats.items()]  # fmt: skip
    return lines


def reasoning() -> None:
    spec, splits, _ = task()
    model, tok = sk.load_model("smollm2-135m-instruct")
    pairs = own_pairs("reasoning", tok)
    vector, stats = directions(model, tok, pairs)
    layer = max(LAYERS, key=lambda k: stats[k]["auroc"])
    v = sk.SteeringVector({layer: vector[layer]})
    val = {0.0: run("m0-val", model, tok, splits["val"], keep_first=True)}
    for a in REASONING_ALPHAS:
        val[a] = run(f"reasoning-val{a:+g}", model, tok, splits["val"], v, a, keep_first=True)
    kls = {a: (0.0 if a == 0 else first_kl(f"reasoning-val{a:+g}", "m0-val")) for a in val}
    kinds = {a: error_kinds(val[a]["texts"], splits["val"]) for a in val}
    choice = frozen("reasoning_alpha", lambda: {"layer": layer, "alpha": max(REASONING_ALPHAS,
                                                key=lambda a: val[a]["accuracy"])})  # fmt: skip
    alpha = choice["alpha"]
    m0_test = json.loads((CACHE / "eval" / "m0-test.json").read_text())
    steered = run(f"reasoning-test{alpha:+g}", model, tok, splits["test"], v, alpha)
    control = run(f"reasoning-random-test{alpha:+g}", model, tok, splits["test"], random_like(v, layer), alpha)
    n_train, n_test = vector.metadata["n_train"], vector.metadata["n_test"]
    rows = {}
    for label, r in (("M0 + α·v", steered), ("M0 + α·random (equal norm)", control)):
        rows[label] = {"accuracy": r["accuracy"], "diff": paired_bootstrap(r["correct"], m0_test["correct"]),
                       "p": mcnemar(r["correct"], m0_test["correct"]), "truncated": r["truncated"]}  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    alphas = sorted(val)
    axes[0].plot(alphas, [val[a]["accuracy"] for a in alphas], "o-")
    low, high = bootstrap([float(c) for c in val[0.0]["correct"]])[1:]
    axes[0].axhspan(low, high, color="gray", alpha=0.2, label="M0, 95% interval")
    axes[0].set(xlabel="α", ylabel="validation accuracy", title=f"greedy accuracy, layer {layer}")
    axes[0].legend(fontsize=7)
    axes[1].plot(alphas, [kls[a] for a in alphas], "o-")
    axes[1].set(xlabel="α", ylabel="KL(P_0 ‖ P_α)", title="first token")
    axes[2].plot(alphas, [sum(val[a]["entropy"]) / len(val[a]["entropy"]) for a in alphas], "o-")
    axes[2].set(xlabel="α", ylabel="entropy (nats)", title="first token")
    fig.tight_layout()
    plots.save_figure(fig, ARTIFACTS / "reasoning_control.png", force=True)
    lines = [
        "# Stage 4: control vectors for reasoning",
        "",
        "Paper (Højer et al., ICLR 2025): a direction from the model's own correct vs incorrect solutions (last "
        "token, mean difference), added at one block, shifts first-token accuracy, KL and entropy; gains on "
        "GSM8K with Mistral-7B were small (about one to two points).",
        f"Here: M0's own samples ({N_QUESTIONS} training questions x {SAMPLES} at T {TEMPERATURE}); {len(pairs)} "
        f"pairs of a correct and a wrong answered solution of one question ({n_train} training / {n_test} held "
        "out, held out by question). Layers fixed in advance; AUROC of the held-out pairs' projections "
        "(positive vs negative), 95% bootstrap over held-out pairs; permutation null: the two members of each "
        "held-out pair swapped at random (1000 draws).",
        "",
        *auroc_lines(stats),
        "",
        f"Steering layer {layer} (best held-out AUROC). Validation (200 items), greedy, budget {spec['budget']}:",
        "",
        "| α | accuracy [95%] | truncated | first-token KL to M0 | first-token entropy | errors: wrong operation / "
        "wrong arithmetic / no calculation |",
        "|---|---|---|---|---|---|",
        *(
            f"| {a:+g} | {ci(val[a]['correct'])} | {val[a]['truncated']:.3f} | {kls[a]:.4f} "
            f"| {sum(val[a]['entropy']) / len(val[a]['entropy']):.3f} | {kinds[a]['wrong operation']} / "
            f"{kinds[a]['wrong arithmetic']} / {kinds[a]['no calculation']} |"
            for a in alphas
        ),  # fmt: skip
        "",
        f"α = {alpha:+g} frozen (best validation accuracy). Test (1000 items): M0 {ci(m0_test['correct'])}.",
        "",
        "| model | test accuracy | − M0 (paired) | McNemar p | truncated |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {r['accuracy']:.3f} | {signed(r['diff'])} | {r['p']:.2g} | {r['truncated']:.3f} |"
            for k, r in rows.items()
        ),  # fmt: skip
        "",
        "![AUROC and α sweep](reasoning_control.png)",
        "",
        "Reproduce: `.venv/bin/python experiments/control_vectors.py samples`, then `... reasoning`.",
        "",
    ]
    val_rows = {a: {"accuracy": val[a]["accuracy"], "truncated": val[a]["truncated"], "kl": kls[a], "errors": kinds[a]}
                for a in alphas}  # fmt: skip
    data = {"pairs": len(pairs), "n_train": n_train, "n_test": n_test, "auroc": stats, "layer": layer,
            "alpha": alpha, "val": val_rows, "test": rows, "m0_test": m0_test["accuracy"]}  # fmt: skip
    write_report("reasoning_control", data, lines)


def efficiency() -> None:
    spec, splits, _ = task()
    model, tok = sk.load_model("smollm2-135m-instruct")
    counts: dict = {}
    pairs = own_pairs("efficiency", tok, counts)
    if len([p for p in pairs if p.split == "train"]) < MIN_PAIRS:
        raise SystemExit(f"only {len(pairs)} efficiency pairs: too few for a direction")
    vector, stats = directions(model, tok, pairs)
    layer = max(LAYERS, key=lambda k: stats[k]["auroc"])
    v = sk.SteeringVector({layer: vector[layer]})
    base_val = run("m0-val", model, tok, splits["val"], keep_first=True)
    val = {a: run(f"efficiency-val{a:+g}", model, tok, splits["val"], v, a) for a in EFFICIENCY_ALPHAS}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731

    def choose() -> dict:
        ok = [a for a in EFFICIENCY_ALPHAS if val[a]["accuracy"] >= base_val["accuracy"] - MARGIN]
        return {"layer": layer, "alpha": min(ok, key=lambda a: mean(val[a]["lengths"])) if ok else None}

    choice = frozen("efficiency_alpha", choose)
    if choice["alpha"] is None:
        raise SystemExit("no α keeps validation accuracy within the margin: nothing to test")
    alpha = choice["alpha"]
    items = splits["test"][:N_EFFICIENCY]
    bundled = sk.extract(model, tok, sk.load_pairs("concise", split="train"), layers=[layer], progress=False)
    bundled = sk.SteeringVector({layer: bundled[layer] / bundled[layer].norm() * v[layer].norm()})
    runs = {
        "M0": run("m0-test500", model, tok, items),
        f"M0 + {alpha:g}·v (own pairs)": run(f"efficiency-test{alpha:+g}", model, tok, items, v, alpha),
        '"Be concise." in the instruction': run("concise-prompt-test500", model, tok, items, system=CONCISE_SYSTEM),
        f"M0 + {alpha:g}·random (equal norm)": run(
            f"efficiency-random-test{alpha:+g}", model, tok, items, random_like(v, layer), alpha
        ),  # fmt: skip
        f"M0 + {alpha:g}·bundled concise (equal norm)": run(
            f"efficiency-bundled-test{alpha:+g}", model, tok, items, bundled, alpha
        ),  # fmt: skip
    }
    base = runs["M0"]
    rows = {}
    for label, r in runs.items():
        rel = [x / max(y, 1) - 1 for x, y in zip(r["lengths"], base["lengths"], strict=True)]
        acc = paired_bootstrap(r["correct"], base["correct"])
        rows[label] = {"length": bootstrap(r["lengths"]), "relative_length": bootstrap(rel), "accuracy": r["accuracy"],
                       "accuracy_diff": acc, "non_inferior": acc[1] > -MARGIN, "truncated": r["truncated"]}  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, r in rows.items():
        (m, lo, hi), (d, dlo, dhi) = r["length"], r["accuracy_diff"]
        ax.errorbar(m, d, xerr=[[m - lo], [hi - m]], yerr=[[d - dlo], [dhi - d]], fmt="o", capsize=3, label=label)
    ax.axhline(-MARGIN, color="gray", ls="--", lw=0.8, label=f"non-inferiority margin −{MARGIN}")
    ax.set(xlabel="mean answer length (tokens)", ylabel="accuracy − M0 (paired)", title="efficiency steering")
    ax.legend(fontsize=6)
    fig.tight_layout()
    plots.save_figure(fig, ARTIFACTS / "efficiency.png", force=True)
    n_train, n_test = vector.metadata["n_train"], vector.metadata["n_test"]
    lines = [
        "# Stage 5: efficiency steering",
        "",
        "Paper (Zhao et al. 2025): the difference between concise and verbose correct solutions of the same "
        "problem is one direction; added at inference it shortens reasoning while keeping accuracy.",
        f"Here: from the same samples as stage 4, the shortest and the longest of a question's distinct correct "
        f"solutions, and the same for its wrong answered ones, where the longer has >= {MIN_RATIO}x the tokens: "
        f"{len(pairs)} pairs ({counts.get('correct', 0)} between correct solutions, {counts.get('wrong', 0)} "
        f"between wrong ones; {n_train} training / {n_test} held out by question). The paper's pairs are both "
        "correct; on this task correct solutions nearly all take one form, so only "
        f"{counts.get('correct', 0)} such pairs exist in {N_QUESTIONS} x {SAMPLES} samples, and equally wrong "
        "pairs were added to reach a usable number (a pair's members are still equally correct).",
        "",
        *auroc_lines(stats),
        "",
        f"Steering layer {layer} (best held-out AUROC). Validation (200 items): M0 accuracy "
        f"{base_val['accuracy']:.3f}, mean length {mean(base_val['lengths']):.1f} tokens; "
        + ", ".join(f"α {a:+g}: {val[a]['accuracy']:.3f}, {mean(val[a]['lengths']):.1f}" for a in EFFICIENCY_ALPHAS)
        + f". α = {alpha:+g} frozen (shortest with accuracy >= M0 − {MARGIN}).",
        "",
        f"Test ({len(items)} items), greedy, budget {spec['budget']}; intervals 95% bootstrap over items, "
        f"accuracy paired with M0; non-inferior = the interval's lower end above −{MARGIN}:",
        "",
        "| condition | mean length | length / M0's − 1 | accuracy | − M0 (paired) | non-inferior | truncated |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {k} | {r['length'][0]:.1f} [{r['length'][1]:.1f}, {r['length'][2]:.1f}] "
            f"| {signed(r['relative_length'])} "
            f"| {r['accuracy']:.3f} | {signed(r['accuracy_diff'])} | {'yes' if r['non_inferior'] else 'no'} "
            f"| {r['truncated']:.3f} |"
            for k, r in rows.items()
        ),  # fmt: skip
        "",
        "![length against accuracy](efficiency.png)",
        "",
        "Reproduce: `.venv/bin/python experiments/control_vectors.py samples`, then `... efficiency`.",
        "",
    ]
    data = {"pairs": len(pairs), "pair_counts": counts, "auroc": stats, "layer": layer, "alpha": alpha, "rows": rows,
            "val": {a: {"accuracy": val[a]["accuracy"], "length": mean(val[a]["lengths"])} for a in val}}  # fmt: skip
    write_report("efficiency", data, lines)


if __name__ == "__main__":
    commands = {"samples": samples, "reasoning": reasoning, "efficiency": efficiency}
    args = sys.argv[1:]
    if len(args) != 1 or args[0] not in commands:
        raise SystemExit(f"usage: {USAGE}")
    commands[args[0]]()
