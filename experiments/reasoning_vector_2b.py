"""Stage 2b: the reasoning vector with the paper's ordering (Zbeeb et al. 2025), round three.

Stage 2 subtracted a better SFT organism from a worse GRPO one. Here the SFT organism is trained as the paper's
is, on final answers only ("The answer is N."), on exactly the questions and batches the GRPO run of its seed
saw (``organisms.py sft-answer-lr SEED``), so that GRPO > SFT as in the paper's checkpoints. v = θ_GRPO −
θ_SFT-answer; the target M1 is stage 2's (M0 fine-tuned on prose).

Validation: M1 + α·v for α in ``ALPHAS`` (extended past an edge that wins, ``interior_choice``), and at each
α, ``NULLS`` random directions with v's per-tensor norms (``TaskVector.random_like``). The α with the best
validation accuracy is frozen before test. Test: M1 + α·v at the frozen α, at the paper's α = 1 and at −1,
each beside the random directions at the same α; the organisms and M0. Seeds 1 and 2 replicate seed 0 at its
frozen α and add the structured nulls θ_K-s − θ_K-s′ (two seeds of one recipe K). Evaluations in bf16 (weights
added in float32, then cast): ``EVAL_DTYPE``.

    .venv/bin/python experiments/reasoning_vector.py m1          # M1, as stage 2 (a few minutes)
    .venv/bin/python experiments/reasoning_vector_2b.py val 0    # the α sweep and its nulls (about 10 minutes)
    .venv/bin/python experiments/reasoning_vector_2b.py test 0   # about 25 minutes
    .venv/bin/python experiments/organisms.py grpo 1             # then sft-answer 1, and the same for seed 2
    .venv/bin/python experiments/reasoning_vector_2b.py test 1   # seed 1 and its structured nulls (15-25 minutes)
    .venv/bin/python experiments/reasoning_vector_2b.py report
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import ARTIFACTS, CACHE, interior_choice, plain, write_report  # noqa: E402
from organisms import RUNS, ci, evaluate, signed, task, update_norm  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit import plots  # noqa: E402
from steerkit._io import write_text  # noqa: E402
from steerkit.evals.logits import kl, next_token_logprobs  # noqa: E402
from steerkit.evals.stats import bootstrap, empirical_p, holm, mcnemar, paired_bootstrap, t_interval  # noqa: E402
from steerkit.evals.worked import render  # noqa: E402

ALPHAS, NULLS, EVAL_DTYPE, SEEDS = (-1.0, -0.5, 0.5, 1.0), 5, torch.bfloat16, (0, 1, 2)
HERE = CACHE / "reasoning_vector_2b"


def test_null_alphas(alpha: float) -> set[float]:
    """The α whose nulls also run on test: the frozen one and the paper's 1 (at −1, validation's only)."""
    return {alpha, 1.0} - {0.0}


M0 = "smollm2-135m-instruct"
USAGE = "reasoning_vector_2b.py val SEED | test SEED | report"


def vector(seed: int, null: int | None = None) -> sk.TaskVector:
    """v = θ_GRPO − θ_SFT-answer of ``seed``, or its ``null``-th random direction with v's per-tensor norms."""
    v = sk.TaskVector.between(RUNS / f"grpo-{seed}" / "model", RUNS / f"sft-answer-{seed}" / "model")
    return v if null is None else v.random_like(100 * seed + null)


def nulls_of(seed: int) -> Iterator:
    """``NULLS`` builders of v's random directions, one at a time, each built at most once and only when a
    result is not cached (a null holds a model's worth of float32)."""
    for n in range(NULLS):
        yield functools.cache(lambda n=n: vector(seed, n))


def score(name: str, source, split: str, vec=None, alpha: float = 0.0) -> dict:
    """Accuracy of ``source`` (+ α·vec) on ``split``, evaluated in ``EVAL_DTYPE``, cached as ``2b-{name}``.
    ``vec``: a TaskVector, or a function that builds one (a null, built only when the result is not cached)."""
    path = CACHE / "eval" / f"2b-{name}-{split}.json"
    if path.is_file():
        return json.loads(path.read_text())
    spec, splits, _ = task()
    model, tok = sk.load_model(source)
    if vec is not None:
        (vec() if callable(vec) else vec).add_to(model, alpha)
    return evaluate(f"2b-{name}", model.to(EVAL_DTYPE), tok, splits[split], split, spec["example"], spec["budget"])


def m1() -> Path:
    return CACHE / "m1" / "model"


def sweep(seed: int) -> dict:
    """The α sweep on validation (frozen in ``HERE/alpha-SEED.json`` at first run) and the nulls at each α."""
    path = HERE / f"alpha-{seed}.json"
    if path.is_file():
        frozen = json.loads(path.read_text())
        return {**frozen, "val": {float(a): x for a, x in frozen["val"].items()},
                "nulls": {float(a): x for a, x in frozen["nulls"].items()}}  # fmt: skip
    v = vector(seed)
    base = score("m1", m1(), "val")["accuracy"]

    def accuracy(alpha: float) -> float:
        return base if alpha == 0 else score(f"v{seed}{alpha:+g}", m1(), "val", v, alpha)["accuracy"]

    choice, scores, interior = interior_choice(accuracy, [*ALPHAS, 0.0])
    nulls = {a: [0.0] * NULLS for a in scores if a != 0}
    for n, null in enumerate(nulls_of(seed)):
        for a in nulls:
            nulls[a][n] = score(f"null{seed}.{n}{a:+g}", m1(), "val", null, a)["accuracy"]
    write_text(json.dumps({"alpha": choice, "interior": interior, "val": scores, "nulls": nulls}, indent=1), path)
    return sweep(seed)


def precision(seed: int) -> dict:
    """The measuring stick: validation accuracy in float32 and in ``EVAL_DTYPE`` for M0, the GRPO organism and
    M1 + v (the one whose small weight update could be lost to rounding), with the share of items graded alike."""
    path = HERE / f"precision-{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    spec, splits, _ = task()
    out = {}
    for name, source, vec in (("m0", M0, None), (f"grpo-{seed}", RUNS / f"grpo-{seed}" / "model", None),
                              (f"v{seed}+1", m1(), vector(seed))):  # fmt: skip
        low = score(name, source, "val", vec, 1.0)
        model, tok = sk.load_model(source)
        if vec is not None:
            vec.add_to(model, 1.0)
        full = evaluate(f"2b32-{name}", model, tok, splits["val"], "val", spec["example"], spec["budget"])
        same = sum(a == b for a, b in zip(low["correct"], full["correct"], strict=True)) / len(full["correct"])
        out[name] = {"float32": full["accuracy"], "bf16": low["accuracy"], "graded_alike": same}
    write_text(json.dumps(out, indent=1), path, force=True)
    return out


def test(seed: int) -> None:
    """Seed 0: the organisms, v at the tested α, its random nulls and halves. Seeds ≥ 1 replicate it at seed
    0's frozen α (no sweep of their own): the organisms and v at the tested α; then the structured nulls between
    this seed's organisms and each earlier seed's (``structured``)."""
    alpha = sweep(0)["alpha"]
    for name, source in (("m0", M0), ("m1", m1()), (f"grpo-{seed}", RUNS / f"grpo-{seed}" / "model"),
                         (f"sft-answer-{seed}", RUNS / f"sft-answer-{seed}" / "model")):  # fmt: skip
        score(name, source, "test")
    v = vector(seed)
    for a in tested(alpha):
        score(f"v{seed}{a:+g}", m1(), "test", v, a)
    distances(seed)
    if seed == 0:
        for n, null in enumerate(nulls_of(seed)):
            for a in sorted(test_null_alphas(alpha)):
                score(f"null{seed}.{n}{a:+g}", m1(), "test", null, a)
        for name, tv, a in halves(seed, alpha):
            score(name, m1(), "test", tv, a)
    for name, _, build in structured(seed):
        for a in sorted(test_null_alphas(alpha)):
            score(f"{name}{a:+g}", m1(), "test", build, a)


def v_label(a: float) -> str:
    """The comparison of M1 + α·v with M1, as the tables name it."""
    return f"M1 {'+' if a > 0 else '−'} {abs(a):g}·v − M1"


def tested(alpha: float) -> list[float]:
    """The α run on test, the frozen one first: it, the paper's 1 and −1."""
    return sorted({alpha, 1.0, -1.0} - {0.0}, key=lambda a: (a != alpha, -a))


def structured(seed: int) -> list[tuple[str, str, Callable[[], sk.TaskVector]]]:
    """The structured nulls that ``seed`` completes, as (cache name, label, builder): θ_K-s − θ_K-seed for each
    earlier seed s with both runs, K in GRPO and SFT-answer — what two runs of one recipe differ by."""
    out = []
    for s in range(seed):
        for kind, label in (("grpo", "GRPO"), ("sft-answer", "SFT-answer")):
            a, b = RUNS / f"{kind}-{s}" / "model", RUNS / f"{kind}-{seed}" / "model"
            if a.is_dir() and b.is_dir():
                build = functools.cache(lambda a=a, b=b: sk.TaskVector.between(a, b))
                out.append((f"sn-{kind}{s}-{seed}", f"θ_{label}-{s} − θ_{label}-{seed}", build))
    return out


def halves(seed: int, alpha: float) -> list[tuple[str, sk.TaskVector, float]]:
    """v's two halves as controls at the frozen α: α·Δ_GRPO and −α·Δ_SFT-answer (Δ = θ − θ_M0), whose sum is
    α·v: which of the two carries v's effect."""
    m0_path = sk.embedded_checkpoint()
    grpo = sk.TaskVector.between(RUNS / f"grpo-{seed}" / "model", m0_path)
    sft = sk.TaskVector.between(RUNS / f"sft-answer-{seed}" / "model", m0_path)
    return [(f"dgrpo{seed}{alpha:+g}", grpo, alpha), (f"dsft{seed}{-alpha:+g}", sft, -alpha)]


def total(tv: sk.TaskVector) -> float:
    """‖tv‖ over every tensor."""
    return sum(s["norm"] ** 2 for s in tv.stats()["tensors"].values()) ** 0.5


def distances(seed: int) -> dict:
    """Norms of v, of the organisms' updates and of M1's distance to M0; M1's first-token KL from M0 (cached)."""
    path = HERE / f"distances-{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    m0_path = sk.embedded_checkpoint()
    spec, splits, _ = task()
    model0, tok = sk.load_model(M0)
    model1 = sk.load_model(m1())[0]
    prompts = [render(tok, it, spec["example"]) for it in splits["val"]]
    p0, p1 = next_token_logprobs(model0, tok, prompts, 32), next_token_logprobs(model1, tok, prompts, 32)
    result = {
        "v": total(vector(seed)),
        "delta_grpo": total(sk.TaskVector.between(RUNS / f"grpo-{seed}" / "model", m0_path)),
        "delta_sft_answer": total(sk.TaskVector.between(RUNS / f"sft-answer-{seed}" / "model", m0_path)),
        "m1_m0": update_norm(model1, model0),
        "m1_first_token_kl": float(kl(p0, p1).mean()),
    }
    write_text(json.dumps(result, indent=1), path, force=True)
    return result


def replication(alpha: float) -> tuple[list[str], dict]:
    """Every seed with test results at ``alpha``: the ordering check and v's effect at each tested α, the mean
    over seeds with its t-interval, and the structured nulls' effects; Holm over this section's comparisons."""
    seeds = [s for s in SEEDS if (CACHE / "eval" / f"2b-v{s}{alpha:+g}-test.json").is_file()]
    m1_, alphas, null_alphas = load("m1", "test"), tested(alpha), sorted(test_null_alphas(alpha))
    comparisons, per_seed = [], {}  # (key, label, treated, base)
    steered = {(s, a): load(f"v{s}{a:+g}", "test") for s in seeds for a in alphas}
    for s in seeds:
        grpo, sft = load(f"grpo-{s}", "test"), load(f"sft-answer-{s}", "test")
        per_seed[s] = {"grpo": grpo["accuracy"], "sft_answer": sft["accuracy"], "norms": distances(s)}
        comparisons.append(((s, "order"), f"seed {s}: GRPO − SFT-answer", grpo, sft))
        comparisons += [((s, a), f"seed {s}: {v_label(a)}", steered[s, a], m1_) for a in alphas]
    found = [n for s in seeds for n in structured(s)]
    comparisons += [((name, a), f"{label} at α {a:+g}", load(f"{name}{a:+g}", "test"), m1_)
                    for name, label, _ in found for a in null_alphas]  # fmt: skip
    p_values = [mcnemar(t["correct"], b["correct"]) for *_, t, b in comparisons]
    cells = {key: {"comparison": label, "diff": paired_bootstrap(t["correct"], b["correct"]), "p": p, "holm": q}
             for (key, label, t, b), p, q in zip(comparisons, p_values, holm(p_values), strict=True)}  # fmt: skip

    def cell(key) -> str:
        return f"{signed(cells[key]['diff'])} ({cells[key]['holm']:.2g})"

    keys = ["order", *alphas]
    heads = ["GRPO − SFT-answer"] + [v_label(a) for a in alphas]
    lines = [
        "",
        f"## Seeds {', '.join(map(str, seeds))}: replication and structured nulls",
        "",
        "Seeds ≥ 1 repeat seed 0's recipe (GRPO seed s; SFT-answer on its questions and batches at seed 0's lr, "
        f"frozen) and are tested at seed 0's frozen α = {alpha:+g}, with no sweep of their own. Test differences "
        f"paired on items (95% bootstrap), Holm-adjusted p in brackets over the {len(comparisons)} comparisons "
        "of this section; the mean over seeds with its t-interval.",
        "",
        "| seed | ‖v‖ | ‖Δ_GRPO‖ | ‖Δ_SFT-answer‖ | GRPO | SFT-answer | " + " | ".join(heads) + " |",
        "|---" * (6 + len(heads)) + "|",
    ]
    for s, r in per_seed.items():
        n = r["norms"]
        lines.append(
            f"| {s} | {n['v']:.2f} | {n['delta_grpo']:.2f} | {n['delta_sft_answer']:.2f} | {r['grpo']:.3f} "
            f"| {r['sft_answer']:.3f} | " + " | ".join(cell((s, k)) for k in keys) + " |"
        )
    if len(seeds) > 1:
        accs = [plain(t_interval([r[k] for r in per_seed.values()])) for k in ("grpo", "sft_answer")]
        means = [signed(t_interval([cells[s, k]["diff"][0] for s in seeds])) for k in keys]
        lines.append(f"| mean of {len(seeds)} | - | - | - | " + " | ".join(accs + means) + " |")
    truncated = "; ".join(f"seed {s}: " + ", ".join(f"{a:+g}·v {steered[s, a]['truncated']:.3f}" for a in alphas)
                          for s in seeds)  # fmt: skip
    lines += ["", f"Share of answers that ran out of the budget (M1 {m1_['truncated']:.3f}): {truncated}."]
    norms = {name: total(build()) for name, _, build in found}
    if found:
        lines += [
            "",
            "Structured nulls: θ_K-s − θ_K-s′ for two seeds of one recipe K, added to M1 (effect = accuracy − M1's, "
            "paired; Holm p in brackets): a difference of trained weights that no recipe chose. Compare by norm: "
            f"α·‖null‖ against α·‖v‖ (α {alpha:+g}: {abs(alpha) * per_seed[seeds[0]]['norms']['v']:.2f} for seed "
            f"{seeds[0]}'s v).",
            "",
            "| null | ‖·‖ | " + " | ".join(f"α {a:+g}" for a in null_alphas) + " |",
            "|---|---|" + "---|" * len(null_alphas),
            *(f"| {label} | {norms[name]:.2f} | " + " | ".join(cell((name, a)) for a in null_alphas) + " |"
              for name, label, _ in found),
        ]  # fmt: skip
    seeds_figure(cells, seeds, [name for name, _, _ in found], null_alphas, m1_["accuracy"])
    lines += ["", "![seeds and nulls](reasoning_vector_2b_seeds.png)"]
    data = {"seeds": {str(s): r for s, r in per_seed.items()}, "comparisons": list(cells.values()),
            "structured": {name: {"label": label, "norm": norms[name]} for name, label, _ in found}}  # fmt: skip
    return lines, data


def seeds_figure(cells: dict, seeds: list[int], nulls: list[str], alphas: list[float], m1_accuracy: float) -> None:
    """v's test effect per seed (95% paired interval) beside the structured nulls' and seed 0's random nulls'."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for k, a in enumerate(alphas):
        for j, s in enumerate(seeds):
            mean, low, high = cells[s, a]["diff"]
            ax.errorbar(k - 0.2 + 0.04 * j, mean, yerr=[[mean - low], [high - mean]], fmt="o", color="C0",
                        capsize=2, label="v, one per seed" if k == j == 0 else None)  # fmt: skip
        for kind, label, color, x in (("grpo", "GRPO", "C1", 0.0), ("sft-answer", "SFT-answer", "C2", 0.1)):
            pts = [cells[name, a]["diff"][0] for name in nulls if name.startswith(f"sn-{kind}")]
            ax.plot([k + x] * len(pts), pts, "s", color=color, label=f"θ_{label}-s − θ_{label}-s′" if k == 0 else None)
        if (CACHE / "eval" / f"2b-null0.0{a:+g}-test.json").is_file():
            pts = [load(f"null0.{n}{a:+g}", "test")["accuracy"] - m1_accuracy for n in range(NULLS)]
            ax.plot([k + 0.2] * len(pts), pts, ".", color="gray", label="random, v's norms" if k == 0 else None)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(alphas)), [f"α {a:+g}" for a in alphas])
    ax.set(ylabel="test accuracy − M1's", title="v against structured and random nulls")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save_figure(fig, ARTIFACTS / "reasoning_vector_2b_seeds.png", force=True)


def load(name: str, split: str) -> dict:
    return json.loads((CACHE / "eval" / f"2b-{name}-{split}.json").read_text())


def report(seed: int = 0) -> None:
    choice, dist, prec = sweep(seed), distances(seed), precision(seed)
    alpha = choice["alpha"]
    val_of = choice["val"].get
    lr = json.loads((RUNS / f"sft-answer_lr-{seed}.json").read_text())
    grpo_log = json.loads((RUNS / f"grpo-{seed}" / "train.json").read_text())
    sft_log = json.loads((RUNS / f"sft-answer-{seed}" / "train.json").read_text())
    m0, m1_, grpo, sft = (load(n, "test") for n in ("m0", "m1", f"grpo-{seed}", f"sft-answer-{seed}"))
    # the family Holm corrects: the ordering check, then each α's v against M1 and against its nulls
    comparisons = [("GRPO organism − SFT-answer organism", grpo, sft)]
    null_rows = {}
    for a in tested(alpha):
        steered = load(f"v{seed}{a:+g}", "test")
        comparisons.append((v_label(a), steered, m1_))
        if a not in test_null_alphas(alpha):
            continue
        null_acc = [load(f"null{seed}.{n}{a:+g}", "test")["accuracy"] for n in range(NULLS)]
        effect = steered["accuracy"] - m1_["accuracy"]
        null_effects = [x - m1_["accuracy"] for x in null_acc]
        below, p_null = empirical_p(effect if a > 0 else -effect, [e if a > 0 else -e for e in null_effects])
        null_rows[a] = {"accuracy": steered["accuracy"], "effect": effect, "null_effects": null_effects,
                        "share_of_nulls_below": below, "p": p_null}  # fmt: skip
    if alpha:
        comparisons.append((f"control: M1 + {alpha:g}·Δ_GRPO − M1", load(f"dgrpo{seed}{alpha:+g}", "test"), m1_))
        comparisons.append((f"control: M1 − {alpha:g}·Δ_SFT-answer − M1", load(f"dsft{seed}{-alpha:+g}", "test"), m1_))
    p_values = [mcnemar(t["correct"], b["correct"]) for _, t, b in comparisons]
    with_nulls = [a for a in tested(alpha) if a in null_rows]
    adjusted = holm(p_values + [null_rows[a]["p"] for a in with_nulls])
    rows = []
    lines = [
        "# Stage 2b: the reasoning vector with the paper's ordering",
        "",
        "Paper (Zbeeb et al. 2025): SFT and GRPO checkpoints of one base on the same data, GRPO far better "
        "(their GSM8K logs: SFT 7.0, GRPO 19.7); v = θ_GRPO − θ_SFT added at α = 1 to an instruct model: GSM8K "
        "+4.9 points; subtracting it: −11.8.",
        f"Here (seed {seed}): GRPO as in stage 1 ({len(grpo_log['history'])} steps × 8 questions × 8 samples); "
        f'the SFT organism on answer-only targets ("The answer is N."), one pass over the same '
        f"{sft_log['examples']} question presentations in GRPO's batches of 8, lr {sft_log['lr']:g} chosen among "
        + ", ".join(f"{c['lr']:g} (update norm {c['update_norm']:.2f}, val {c['val']:.3f})" for c in lr["candidates"])
        + " by stage 1's rule (update norm within 2x of GRPO's, then validation). Target M1 = M0 fine-tuned on "
        "prose (stage 2). Evaluated in bf16 (weights added in float32, then cast), greedy, budget 48.",
        "Measuring stick, validation accuracy float32 / bf16 (share of items graded alike): "
        + "; ".join(f"{n} {r['float32']:.3f} / {r['bf16']:.3f} ({r['graded_alike']:.0%})" for n, r in prec.items())
        + ".",
        f"Norms: ‖v‖ = {dist['v']:.2f}, ‖Δ_GRPO‖ = {dist['delta_grpo']:.2f}, ‖Δ_SFT-answer‖ = "
        f"{dist['delta_sft_answer']:.2f}, ‖θ_M1 − θ_M0‖ = {dist['m1_m0']:.2f}; M1's first-token KL from M0 on "
        f"the validation prompts {dist['m1_first_token_kl']:.4f} nats.",
        "",
        "Validation (200 items), M1 + α·v and the mean of "
        f"{NULLS} random directions with v's per-tensor norms: "
        + ", ".join(
            f"α {a:+g}: {s:.3f}" + (f" (nulls {sum(choice['nulls'][a]) / NULLS:.3f})" if a else " (M1)")
            for a, s in sorted(choice["val"].items())
        )  # fmt: skip
        + f". α = {alpha:+g} frozen ({'interior' if choice['interior'] else 'at the edge of the grid tried'}).",
        "",
        f"Test (1000 items). Differences paired on items (95% bootstrap); McNemar p and Holm-adjusted p over the "
        f"{len(adjusted)} comparisons of these two tables (the ordering check, v against M1 at each α, v's two "
        "halves at the frozen α, v against its nulls at each α).",
        "",
        "| model | accuracy [95%] | truncated |",
        "|---|---|---|",
        *(
            f"| {n} | {ci(r['correct'])} | {r['truncated']:.3f} |"
            for n, r in (("M0", m0), ("M1", m1_), (f"GRPO-{seed}", grpo), (f"SFT-answer-{seed}", sft))
        ),  # fmt: skip
        "",
        "| comparison | difference [95%] | McNemar p | Holm p |",
        "|---|---|---|---|",
    ]
    for (label, t, b), p, q in zip(comparisons, p_values, adjusted, strict=False):
        diff = paired_bootstrap(t["correct"], b["correct"])
        rows.append({"comparison": label, "diff": diff, "p": p, "holm": q})
        lines.append(f"| {label} | {signed(diff)} | {p:.2g} | {q:.2g} |")
    lines += [
        "",
        "Against the random directions (same α, v's per-tensor norms; effect = accuracy − M1's; for α < 0 the "
        "null is ranked in the harmful direction):",
        "",
        "| α | v's effect | nulls' effects | share of nulls v beats | empirical p | Holm p |",
        "|---|---|---|---|---|---|",
    ]
    for k, a in enumerate(with_nulls):
        r, q = null_rows[a], adjusted[len(comparisons) + k]
        nulls = ", ".join(f"{e:+.3f}" for e in r["null_effects"])
        lines.append(
            f"| {a:+g} | {r['effect']:+.3f} | {nulls} | {r['share_of_nulls_below']:.2f} | {r['p']:.2g} | {q:.2g} |"
        )
    for a in (a for a in tested(alpha) if a not in null_rows):
        sign = "+" if a > 0 else "−"
        lines += ["", f"At α {a:+g} the nulls ran on validation only: M1 {sign} {abs(a):g}·v {val_of(a):.3f}, its "
                  f"{NULLS} random directions {min(choice['nulls'][a]):.3f}–{max(choice['nulls'][a]):.3f}, M1 "
                  f"{choice['val'][0.0]:.3f}."]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 3.4))
    val = choice["val"]
    xs = sorted(val)
    ax.plot(xs, [val[a] for a in xs], "o-", color="C0", label="M1 + α·v")
    for n in range(NULLS):
        pts = sorted([(0.0, val[0.0]), *((a, accs[n]) for a, accs in choice["nulls"].items())])
        ax.plot(*zip(*pts, strict=True), ".-", color="gray", alpha=0.5, label="random, v's norms" if n == 0 else None)
    low, high = bootstrap([float(c) for c in load("m1", "val")["correct"]])[1:]
    ax.axhspan(low, high, color="gray", alpha=0.15, label="M1, 95% interval")
    ax.set(xlabel="α", ylabel="validation accuracy", title="M1 + α·(θ_GRPO − θ_SFT-answer)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save_figure(fig, ARTIFACTS / "reasoning_vector_2b.png", force=True)
    seed_lines, seed_data = replication(alpha)
    lines += ["", "![validation sweep](reasoning_vector_2b.png)", *seed_lines, "",
              f"Reproduce: `.venv/bin/python experiments/organisms.py grpo {seed}`, `organisms.py sft-answer-lr "
              f"{seed}`, `reasoning_vector.py m1`, then `reasoning_vector_2b.py val {seed}`, `test {seed}`; for each "
              "further seed s, `organisms.py grpo s`, `organisms.py sft-answer s`, `reasoning_vector_2b.py test s`; "
              "then `report`.", ""]  # fmt: skip
    data = {"seed": seed, "alpha": choice, "distances": dist, "precision": prec, "sft_answer_lr": lr,
            "comparisons": rows,
            "nulls": {str(a): r for a, r in null_rows.items()},
            "accuracy": {"m0": m0["accuracy"], "m1": m1_["accuracy"], "grpo": grpo["accuracy"],
                         "sft_answer": sft["accuracy"]}, "replication": seed_data}  # fmt: skip
    write_report("reasoning_vector_2b", data, lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["report"]:
        report()
    elif len(args) == 2 and args[0] == "val" and args[1].isdigit():
        sweep(int(args[1]))
        precision(int(args[1]))
    elif len(args) == 2 and args[0] == "test" and args[1].isdigit():
        test(int(args[1]))
    else:
        raise SystemExit(f"usage: {USAGE}")
