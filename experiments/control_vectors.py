"""Stage 4: control vectors from M0's own correct and wrong solutions (Højer et al. 2025), round three.

``samples``: M0 answers the first ``N_QUESTIONS`` training questions ``SAMPLES`` times at T = 0.8 (the gate's
sampling, in bf16), graded by the first-answer scorer. Pairs: a correct and a wrong (answered) solution of the
same question, up to two per question, held out by question (every fifth question with pairs). The direction
at each of ``LAYERS`` (fixed in advance) is the mean difference at the last token of prompt + solution; its
held-out AUROC has a bootstrap interval and a pair-swap permutation null. On validation, greedy accuracy,
first-token KL and entropy for each layer over α (the grid doubled past a winning edge); the layer and α with
the best validation accuracy are frozen before test. On test: M0 + α·v beside M0 and ``N_RANDOM`` random
directions of equal norm (the steered effect's rank among theirs), split by gold operation and by whether the
first calculation uses it; Holm over the stage's tests. Stage 5 (``efficiency.py``) reuses ``run``.

    .venv/bin/python experiments/control_vectors.py samples      # about 6 minutes
    .venv/bin/python experiments/control_vectors.py reasoning    # about 45 minutes; writes its report
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import ARTIFACTS, CACHE, EVAL_BATCH, interior_choice, write_report  # noqa: E402
from organisms import ci, signed, task  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit import plots  # noqa: E402
from steerkit._io import atomic_path, write_text  # noqa: E402
from steerkit.capture import capture  # noqa: E402
from steerkit.evals.logits import entropy, kl, next_token_logprobs  # noqa: E402
from steerkit.evals.stats import auroc_null, bootstrap, empirical_p, holm, mcnemar, paired_bootstrap  # noqa: E402
from steerkit.evals.worked import SYSTEM, grade_worked, render, score_worked  # noqa: E402
from steerkit.extract import auroc  # noqa: E402
from steerkit.steer import completions  # noqa: E402

N_QUESTIONS, SAMPLES, TEMPERATURE = 480, 8, 0.8
LAYERS = (10, 15, 20)  # a third, half and two thirds of the 30 blocks, fixed before any pair was seen
REASONING_ALPHAS = (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0)
MARGIN = 0.03  # stage 5's non-inferiority margin (accuracy)
N_RANDOM, N_NULL_ITEMS = 20, 500  # stage 4's null: random directions, on the first 500 test items
EVAL_DTYPE = torch.bfloat16  # generation runs in bf16
HERE = CACHE / "own"
USAGE = "control_vectors.py samples | reasoning"


def samples() -> list[dict]:
    """Per training question: the sampled texts, whether each finished, its answer and correctness (cached)."""
    path = HERE / "samples.json"
    if path.is_file():
        return json.loads(path.read_text())
    spec, splits, _ = task()
    model, tok = sk.load_model("smollm2-135m-instruct", dtype=EVAL_DTYPE)
    items = splits["train"][:N_QUESTIONS]
    torch.manual_seed(0)
    kwargs = {"do_sample": True, "temperature": TEMPERATURE, "top_p": 1.0, "num_return_sequences": SAMPLES}
    prompts = [render(tok, it, spec["example"]) for it in items]
    outs = completions(model, tok, prompts, spec["budget"], EVAL_BATCH // SAMPLES, True, **kwargs)
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


def own_pairs(tok) -> list[sk.Pair]:
    """(correct, wrong answered) solutions of one question, up to two pairs per question."""
    spec, splits, _ = task()
    prompts = [render(tok, it, spec["example"]) for it in splits["train"][:N_QUESTIONS]]
    by_question = []
    for r in samples():
        graded = list(zip(r["texts"], r["correct"], r["answers"], strict=True))
        right = list(dict.fromkeys(t for t, c, _ in graded if c))
        wrong = list(dict.fromkeys(t for t, c, a in graded if not c and a is not None))
        by_question.append(list(zip(right * 2, wrong, strict=False))[:2] if right and wrong else [])
    return held_out(by_question, prompts)


def operations(texts: list[str], items) -> list[tuple[str, str | None]]:
    """Per one-step item: the gold operation ("+" or "-", from its gold calculation) and the operation of the
    first calculation the answer writes (None when it writes none)."""
    out = []
    for item, text in zip(items, texts, strict=True):
        m = re.search(r"\d+\s*([+-])\s*\d+\s*=\s*-?\d+", text)
        out.append((re.search(r"[+-]", item.meta["expression"])[0], m[1] if m else None))
    return out


def error_kinds(texts: list[str], items) -> dict[str, int]:
    """How the answers went wrong: the first calculation written uses the wrong operation, the right operation
    miscomputed, or no calculation at all (one-step items only)."""
    counts = {"correct": 0, "wrong operation": 0, "wrong arithmetic": 0, "no calculation": 0}
    for item, text, (gold, chosen) in zip(items, texts, operations(texts, items), strict=True):
        if score_worked(text, True, item).correct:
            counts["correct"] += 1
        elif chosen is None:
            counts["no calculation"] += 1
        else:
            counts["wrong operation" if chosen != gold else "wrong arithmetic"] += 1
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
    name: str,
    model,
    tok,
    items,
    vector=None,
    alpha: float = 0.0,
    system: str = SYSTEM,
    keep_first: bool = False,
    budget: int | None = None,
) -> dict:
    """Greedy generations of ``budget`` tokens (the task's by default) on ``items`` (steered by α·vector when
    given), graded, with token lengths; cached under ``HERE/{name}.json``. ``keep_first``: also the
    first-token entropy, and the first-token log-probabilities in ``{name}.first.pt`` for the KL to another
    run."""
    path = HERE / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    spec = task()[0]
    prompts = [render(tok, it, spec["example"], system) for it in items]
    steering = sk.steer(model, vector, alpha) if vector is not None else contextlib.nullcontext()
    with steering:
        outs = completions(model, tok, prompts, budget or spec["budget"], EVAL_BATCH, return_finished=True)
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


def cached(name: str) -> dict:
    """A run already made (``run``'s cache)."""
    return json.loads((HERE / f"{name}.json").read_text())


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


def m0_models() -> tuple:
    """M0 in float32 (for reading activations) and in ``EVAL_DTYPE`` (for generating), and its tokenizer."""
    model, tok = sk.load_model("smollm2-135m-instruct")
    return model, copy.deepcopy(model).to(EVAL_DTYPE), tok


def operation_split(runs: dict[str, dict], items) -> dict[str, dict]:
    """Per run: accuracy on the add and the subtract items, and how often the first calculation uses the gold
    operation, with the accuracy of the answers that do (arithmetic given the right operation)."""
    out = {}
    for label, r in runs.items():
        ops = operations(r["texts"], items)
        row = {}
        for op, name in (("+", "add"), ("-", "subtract")):
            idx = [k for k, (gold, _) in enumerate(ops) if gold == op]
            row[name] = {"n": len(idx), "correct": [r["correct"][k] for k in idx]}
        right = [chosen == gold for gold, chosen in ops]
        row["right_operation"] = right
        row["correct_given_right"] = [c for c, ok in zip(r["correct"], right, strict=True) if ok]
        out[label] = row
    return out


def reasoning() -> None:
    spec, splits, _ = task()
    model, model16, tok = m0_models()
    pairs = own_pairs(tok)
    vector, stats = directions(model, tok, pairs)
    val0 = run("m0-val", model16, tok, splits["val"], keep_first=True)
    sweeps, kls, entropies = {}, {}, {}
    for layer in LAYERS:
        v = sk.SteeringVector({layer: vector[layer]})

        def accuracy(a: float, layer: int = layer, v: sk.SteeringVector = v) -> float:
            if a == 0:
                return val0["accuracy"]
            return run(f"reasoning-L{layer}-val{a:+g}", model16, tok, splits["val"], v, a, keep_first=True)["accuracy"]

        best, scores, interior = interior_choice(accuracy, [*REASONING_ALPHAS, 0.0], geometric=True)
        sweeps[layer] = {"alpha": best, "interior": interior, "val": scores}
        kls[layer] = {a: 0.0 if a == 0 else first_kl(f"reasoning-L{layer}-val{a:+g}", "m0-val") for a in scores}
        runs = {a: val0 if a == 0 else cached(f"reasoning-L{layer}-val{a:+g}") for a in scores}
        entropies[layer] = {a: sum(r["entropy"]) / len(r["entropy"]) for a, r in runs.items()}

    def choose() -> dict:
        layer = max(LAYERS, key=lambda k: sweeps[k]["val"][sweeps[k]["alpha"]])
        return {"layer": layer, "alpha": sweeps[layer]["alpha"], "interior": sweeps[layer]["interior"]}

    choice = frozen("reasoning_alpha", choose)
    layer, alpha = choice["layer"], choice["alpha"]
    v = sk.SteeringVector({layer: vector[layer]}, {"alpha": alpha, "stage": "4: correct − wrong, M0"})
    v.save(ARTIFACTS / "vectors" / "reasoning_control.safetensors", force=True)
    chosen_val = cached(f"reasoning-L{layer}-val{alpha:+g}") if alpha else val0
    items = splits["test"]
    m0_test = run("m0-test", model16, tok, items)
    steered = run(f"reasoning-test{alpha:+g}", model16, tok, items, v, alpha)
    sub = items[:N_NULL_ITEMS]
    nulls = [run(f"reasoning-random{n}-test{N_NULL_ITEMS}{alpha:+g}", model16, tok, sub, random_like(v, layer, n),
                 alpha) for n in range(N_RANDOM)]  # fmt: skip
    on_sub = lambda r: sum(r["correct"][:N_NULL_ITEMS]) / N_NULL_ITEMS  # noqa: E731
    effect = on_sub(steered) - on_sub(m0_test)  # on the items the nulls ran on
    null_effects = [r["accuracy"] - on_sub(m0_test) for r in nulls]
    share_below, p_null = empirical_p(effect, null_effects)
    split = operation_split({"m0": m0_test, "steered": steered}, items)
    split |= operation_split({f"null{n}": r for n, r in enumerate(nulls)}, sub)
    # the family Holm corrects: overall against M0, against the nulls, each operation, the operation choice
    family = {
        "steered − M0 (all items)": mcnemar(steered["correct"], m0_test["correct"]),
        "steered against the random directions": p_null,
        **{
            f"steered − M0 ({op} items)": mcnemar(split["steered"][op]["correct"], split["m0"][op]["correct"])
            for op in ("add", "subtract")
        },  # fmt: skip
        "right operation chosen: steered − M0": mcnemar(
            split["steered"]["right_operation"], split["m0"]["right_operation"]
        ),  # fmt: skip
    }
    adjusted = dict(zip(family, holm(list(family.values())), strict=True))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for k in LAYERS:
        xs = sorted(sweeps[k]["val"])
        axes[0].plot(xs, [sweeps[k]["val"][a] for a in xs], "o-", label=f"layer {k} (AUROC {stats[k]['auroc']:.2f})")
        axes[1].plot(xs, [kls[k][a] for a in xs], "o-", label=f"layer {k}")
        axes[2].plot(xs, [entropies[k][a] for a in xs], "o-", label=f"layer {k}")
    low, high = bootstrap([float(c) for c in val0["correct"]])[1:]
    axes[0].axhspan(low, high, color="gray", alpha=0.2, label="M0, 95% interval")
    axes[0].set(xlabel="α", ylabel="validation accuracy", title="greedy accuracy by layer")
    axes[1].set(xlabel="α", ylabel="KL(P_0 ‖ P_α)", title="first token", yscale="symlog")
    axes[2].set(xlabel="α", ylabel="entropy (nats)", title="first token")
    axes[3].hist(null_effects, bins=10, color="gray", label=f"{N_RANDOM} random directions")
    axes[3].axvline(effect, color="C3", label=f"v (layer {layer}, α {alpha:+g})")
    axes[3].set(xlabel=f"accuracy − M0 (first {N_NULL_ITEMS} test items)", ylabel="directions",
                title="steered effect among the null")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    plots.save_figure(fig, ARTIFACTS / "reasoning_control.png", force=True)
    n_train, n_test = vector.metadata["n_train"], vector.metadata["n_test"]
    null_acc = [r["accuracy"] for r in nulls]

    def op_row(label: str, key: str) -> str:
        m, st = split["m0"][key], split["steered"][key]
        diff = paired_bootstrap(st["correct"], m["correct"])
        nulls_mean = mean([mean(split[f"null{n}"][key]["correct"]) for n in range(N_RANDOM)])
        p = family[f"steered − M0 ({key} items)"]
        return (f"| {label} | {m['n']} | {mean(m['correct']):.3f} | {mean(st['correct']):.3f} | {signed(diff)} "
                f"| {nulls_mean:.3f} | {p:.2g} | {adjusted[f'steered − M0 ({key} items)']:.2g} |")  # fmt: skip

    tried = sorted(set().union(*(sweeps[k]["val"] for k in LAYERS)))
    right = {k: mean(split[k]["right_operation"]) for k in ("m0", "steered")}
    given = {k: mean(split[k]["correct_given_right"]) for k in ("m0", "steered")}
    null_right = mean([mean(split[f"null{n}"]["right_operation"]) for n in range(N_RANDOM)])
    null_given = mean([mean(split[f"null{n}"]["correct_given_right"]) for n in range(N_RANDOM)])
    right_diff = paired_bootstrap(split["steered"]["right_operation"], split["m0"]["right_operation"])
    lines = [
        "# Stage 4: control vectors for reasoning",
        "",
        "Paper (Højer et al., ICLR 2025): a direction from the model's own correct vs incorrect solutions (last "
        "token, mean difference), added at one block, shifts first-token accuracy, KL and entropy; gains on "
        "GSM8K with Mistral-7B were small (about one to two points).",
        f"Here: M0's own samples ({N_QUESTIONS} training questions x {SAMPLES} at T {TEMPERATURE}, bf16); {len(pairs)} "
        f"pairs of a correct and a wrong answered solution of one question ({n_train} training / {n_test} held "
        "out, held out by question). Layers fixed in advance; AUROC of the held-out pairs' projections "
        "(positive vs negative), 95% bootstrap over held-out pairs; permutation null: the two members of each "
        "held-out pair swapped at random (1000 draws). Generation in bf16, greedy, budget "
        f"{spec['budget']}.",
        "",
        *auroc_lines(stats),
        "",
        f"Validation ({len(splits['val'])} items): accuracy at each layer and α (the α grid extended by doubling "
        "past a winning edge); the layer and α with the best validation accuracy are frozen before test.",
        "",
        "| layer | " + " | ".join(f"α {a:+g}" for a in tried) + " | best α |",
        "|---|" + "---|" * (len(tried) + 1),
        *(
            f"| {k} | "
            + " | ".join(f"{sweeps[k]['val'].get(a, float('nan')):.3f}" for a in tried)
            + f" | {sweeps[k]['alpha']:+g}{'' if sweeps[k]['interior'] else ' (edge)'} |"
            for k in LAYERS
        ),  # fmt: skip
        "",
        f"Frozen: layer {layer}, α {alpha:+g} ({'interior' if choice['interior'] else 'at the edge of the grid'}); "
        f"validation errors at that setting (wrong operation / wrong arithmetic / no calculation): M0 "
        + "{wrong operation} / {wrong arithmetic} / {no calculation}".format(
            **error_kinds(val0["texts"], splits["val"])
        )
        + ", steered "
        + "{wrong operation} / {wrong arithmetic} / {no calculation}".format(
            **error_kinds(chosen_val["texts"], splits["val"])
        )
        + ".",
        "",
        f"Test ({len(items)} items). Differences paired on items (95% bootstrap); McNemar p; the steered effect "
        f"ranked among {N_RANDOM} random directions of equal norm at the same layer and α, all on the first "
        f"{N_NULL_ITEMS} test items (empirical p = (1 + #null ≥ effect) / {N_RANDOM + 1}); Holm over the "
        f"{len(family)} tests of this stage.",
        "",
        "| model | accuracy [95%] | − M0 (paired) | McNemar p | Holm p | truncated |",
        "|---|---|---|---|---|---|",
        f"| M0 | {ci(m0_test['correct'])} | - | - | - | {m0_test['truncated']:.3f} |",
        f"| M0 + {alpha:g}·v (layer {layer}) | {ci(steered['correct'])} | "
        f"{signed(paired_bootstrap(steered['correct'], m0_test['correct']))} "
        f"| {family['steered − M0 (all items)']:.2g} | {adjusted['steered − M0 (all items)']:.2g} "
        f"| {steered['truncated']:.3f} |",
        f"| {N_RANDOM} random directions, equal norm (first {N_NULL_ITEMS} items; M0 there "
        f"{on_sub(m0_test):.3f}): mean [min, max] | {mean(null_acc):.3f} [{min(null_acc):.3f}, {max(null_acc):.3f}] | "
        f"{mean(null_effects):+.3f} | - | - | {mean([r['truncated'] for r in nulls]):.3f} |",
        "",
        f"On those {N_NULL_ITEMS} items the steered effect {effect:+.3f} beats {share_below:.0%} of the random "
        f"directions' effects (empirical p {p_null:.2g}, Holm "
        f"{adjusted['steered against the random directions']:.2g}).",
        "",
        "By gold operation (is it a push towards one operation?):",
        "",
        f"| items | n | M0 | steered | steered − M0 | random directions (mean, first {N_NULL_ITEMS}) | McNemar p "
        "| Holm p |",
        "|---|---|---|---|---|---|---|---|",
        op_row("add", "add"),
        op_row("subtract", "subtract"),
        "",
        "By operation chosen (the first calculation written):",
        "",
        f"| | M0 | steered | random directions (mean, first {N_NULL_ITEMS}) |",
        "|---|---|---|---|",
        f"| first calculation uses the gold operation | {right['m0']:.3f} | {right['steered']:.3f} "
        f"({signed(right_diff)}, Holm p {adjusted['right operation chosen: steered − M0']:.2g}) | {null_right:.3f} |",
        f"| accuracy when it does (arithmetic) | {given['m0']:.3f} | {given['steered']:.3f} | {null_given:.3f} |",
        "",
        "![accuracy by layer and α, first-token KL and entropy, and the null](reasoning_control.png)",
        "",
        "Reproduce: `.venv/bin/python experiments/control_vectors.py samples`, then `... reasoning`.",
        "",
    ]
    data = {"pairs": len(pairs), "n_train": n_train, "n_test": n_test, "auroc": stats, "layer": layer,
            "alpha": alpha, "sweeps": sweeps, "kl": kls, "entropy": entropies, "m0_test": m0_test["accuracy"],
            "steered_test": steered["accuracy"], "null_test": null_acc, "effect": effect,
            "null_effects": null_effects, "m0_null_items": on_sub(m0_test),
            "share_of_nulls_below": share_below, "p_null": p_null, "family": family, "holm": adjusted,
            "operations": {k: {"add": mean(split[k]["add"]["correct"]),
                               "subtract": mean(split[k]["subtract"]["correct"]),
                               "right_operation": mean(split[k]["right_operation"]),
                               "correct_given_right": mean(split[k]["correct_given_right"])}
                           for k in split}}  # fmt: skip
    write_report("reasoning_control", data, lines)


if __name__ == "__main__":
    commands = {"samples": samples, "reasoning": reasoning}
    args = sys.argv[1:]
    if len(args) != 1 or args[0] not in commands:
        raise SystemExit(f"usage: {USAGE}")
    commands[args[0]]()
