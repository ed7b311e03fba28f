"""Conditional steering (CAST) on the embedded model: does the condition find its prompts, and does the
behaviour then land only on them?

* Condition: pair-centred PCA directions at blocks 2-12 from the bundled cooking set's train split; block,
  threshold and comparison chosen on its val split (``find_condition``); F1 on the test split (18 cooking +
  18 other questions, never used before) with a bootstrap 95% interval. Controls: a random direction of equal
  norm through the same search, and the trivial "always fires" answer. Then 24 hand-written questions phrased
  unlike the set's templates, to see whether it generalises beyond them.
* Behaviour: the sentiment vector (layer 8, α=-0.5: the steering-effect bench's setting, chosen on other
  prompts) on the 36 test prompts in one mixed batch, greedy, 40 tokens, VADER sentiment of each completion.
  Per group (cooking / other): unsteered, steered always, steered under the condition, and a random vector of
  equal norm under the condition. Effects are paired differences from unsteered with bootstrap 95% intervals.

Writes artifacts/cast/report.md and cast_effect.png. Run: .venv/bin/python bench/cast.py
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402
from steering_effect import lexicon_score  # noqa: E402  (bench/ is on sys.path when run as a script)

import steerkit as sk  # noqa: E402
from steerkit import condition as cast  # noqa: E402
from steerkit._io import atomic_path, write_text  # noqa: E402
from steerkit.evals.stats import bootstrap  # noqa: E402
from steerkit.models import chat_prompt  # noqa: E402
from steerkit.steer import completions  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "artifacts" / "cast"
LAYER, ALPHA, TOKENS, SEARCHED = 8, -0.5, 40, range(2, 13)
# Questions phrased unlike the bundled set's templates (written by hand, once): does the condition generalise?
OUT_OF_TEMPLATE = (
    ["How do I make a fluffy omelette?", "What's a good marinade for lamb chops?", "Why does my pasta stick together?",
     "How can I tell when a steak is medium rare?", "What is the secret to crispy roast potatoes?",
     "How do I thicken a soup?", "Can I freeze homemade pizza dough?", "What should I serve with grilled fish?",
     "How do I stop onions from burning in the pan?",
     "What's the difference between baking soda and baking powder in a cake?", "How much salt goes in bread dough?",
     "How do I caramelise onions?"],
    ["How do I fix a flat tyre?", "What is the capital of Australia?", "How do I write a cover letter?",
     "Why is the sky blue?", "How do I reset my router?", "What are good stretches for back pain?",
     "How do I file my taxes?", "What is quantum computing?", "How can I sleep better?",
     "How do I train my puppy to sit?", "What causes earthquakes?", "How do I change a light bulb?"],
)  # fmt: skip


def fmt(ci: tuple[float, float, float], digits: int = 3) -> str:
    return f"{ci[0]:+.{digits}f} [{ci[1]:+.{digits}f}, {ci[2]:+.{digits}f}]"


def f1_interval(predicted: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float]:
    rows = torch.stack([predicted, truth], 1)
    return bootstrap(rows, lambda r: torch.tensor(cast.f1(r[:, 0], r[:, 1])))


def main() -> None:
    model, tok = sk.load_model("smollm2-135m-instruct")
    train, val, test = (cast.condition_prompts("cooking", split) for split in ("train", "val", "test"))
    directions = sk.extract_condition(model, tok, *train, layers=SEARCHED)
    condition = sk.find_condition(model, tok, directions, *val)
    g = torch.Generator().manual_seed(0)
    noise = {layer: torch.randn(directions.d_model, generator=g) for layer in directions.layers}
    random_dirs = sk.SteeringVector({layer: v / v.norm() * directions[layer].norm() for layer, v in noise.items()})
    random_condition = sk.find_condition(model, tok, random_dirs, *val)

    prompts = [p for pair in zip(*test, strict=True) for p in pair]  # cooking, other, cooking, ... one batch
    truth = torch.tensor([i % 2 == 0 for i in range(len(prompts))])
    fired = condition.predict(model, tok, prompts)
    random_fired = random_condition.predict(model, tok, prompts)
    ood_pos, ood_neg = OUT_OF_TEMPLATE
    ood_fired = condition.predict(model, tok, ood_pos + ood_neg)
    ood_truth = torch.tensor([True] * len(ood_pos) + [False] * len(ood_neg))

    sentiment = sk.extract(model, tok, sk.load_pairs("sentiment"), layers=[LAYER])
    v = torch.randn(sentiment.d_model, generator=g)
    random_vec = sk.SteeringVector({LAYER: v / v.norm() * sentiment[LAYER].norm()})
    rendered = [chat_prompt(tok, p) for p in prompts]

    def scores(vector=None, cond=None) -> tuple[torch.Tensor, list[str]]:
        if vector is None:
            texts = completions(model, tok, rendered, TOKENS, len(rendered), do_sample=False)
        else:
            with sk.steer(model, vector, ALPHA, condition=cond):
                texts = completions(model, tok, rendered, TOKENS, len(rendered), do_sample=False)
        return torch.tensor([lexicon_score(t) for t in texts]), texts

    settings = {
        "unsteered": scores(),
        "steered always": scores(sentiment),
        "steered if cooking": scores(sentiment, condition),
        "random vector if cooking": scores(random_vec, condition),
    }
    base = settings["unsteered"][0]
    lines = [
        "# Conditional steering (CAST) on smollm2-135m-instruct",
        "",
        f"Command: `.venv/bin/python bench/cast.py`. Bundled cooking condition set: {len(train[0]) * 2} train / "
        f"{len(val[0]) * 2} val / {len(test[0]) * 2} test prompts (half cooking questions). Intervals: bootstrap "
        "95% over test prompts.",
        "",
        "## The condition",
        "",
        f"Chosen on val: block {condition.layer}, fires when similarity is {condition.comparator} than "
        f"{condition.threshold:.4f} (val F1 {condition.f1:.3f}).",
        "",
        "| detector | block | val F1 | test F1 [95% CI] |",
        "| --- | --- | --- | --- |",
        f"| condition direction (PCA, blocks {SEARCHED.start}-{SEARCHED.stop - 1}) | {condition.layer} | "
        f"{condition.f1:.3f} | {fmt(f1_interval(fired, truth))} |",
        f"| random direction of equal norm, same search | {random_condition.layer} | {random_condition.f1:.3f} | "
        f"{fmt(f1_interval(random_fired, truth))} |",
        f"| always fires (trivial) | - | - | {cast.f1(torch.ones_like(truth), truth):.3f} |",
        "",
        f"On test the condition fires on {int(fired[truth].sum())}/{int(truth.sum())} cooking prompts and "
        f"{int(fired[~truth].sum())}/{int((~truth).sum())} others.",
        "",
        f"Out of template ({len(ood_pos)} cooking and {len(ood_neg)} other questions phrased unlike the set's "
        f"templates): F1 {fmt(f1_interval(ood_fired, ood_truth))}; fires on {int(ood_fired[ood_truth].sum())}/"
        f"{len(ood_pos)} cooking and {int(ood_fired[~ood_truth].sum())}/{len(ood_neg)} others "
        f"({[p for p, f in zip(ood_neg, ood_fired[len(ood_pos) :].tolist(), strict=True) if f]}).",
        "",
        f"## The behaviour: sentiment vector, layer {LAYER}, α={ALPHA}, {TOKENS} greedy tokens, all 36 test prompts "
        "in one batch",
        "",
        "VADER compound sentiment in [-1, 1]: mean per group, and the mean paired change from unsteered.",
        "",
        "| setting | cooking: mean | cooking: change | other: mean | other: change | rows identical to unsteered |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, (values, texts) in settings.items():
        cells = []
        for group in (truth, ~truth):
            cells += [fmt(bootstrap(values[group])), fmt(bootstrap((values - base)[group]))]
        same = sum(a == b for a, b in zip(texts, settings["unsteered"][1], strict=True))
        lines.append(f"| {name} | {' | '.join(cells)} | {same}/{len(texts)} |")
    conditioned = settings["steered if cooking"][1]
    unfired_same = all(conditioned[i] == settings["unsteered"][1][i] for i in range(len(prompts)) if not fired[i])
    lines += [
        "",
        f"Rows where the condition did not fire are {'all' if unfired_same else 'NOT all'} token-identical to "
        "unsteered. An interval that spans 0 is a change inside the noise of these 18 prompts.",
        "",
        "First completions (cooking prompt, other prompt):",
        "",
        *(f"- {name}: {texts[0][:90]!r} / {texts[1][:90]!r}" for name, (_, texts) in settings.items()),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    write_text(report, OUT / "report.md", force=True)
    figure(settings, truth, OUT / "cast_effect.png")
    print(
        f"wrote {OUT}/report.md and cast_effect.png\nreproduce: .venv/bin/python bench/cast.py {' '.join(sys.argv[1:])}"
    )


def figure(settings: dict, truth: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    width = 0.2
    for k, (name, (values, _)) in enumerate(settings.items()):
        for x, group in enumerate((truth, ~truth)):
            mean, low, high = bootstrap(values[group])
            ax.bar(x + (k - 1.5) * width, mean, width, yerr=[[mean - low], [high - mean]], capsize=3,
                   color=f"C{k}", label=name if x == 0 else None)  # fmt: skip
    ax.set_xticks([0, 1], ["cooking prompts", "other prompts"])
    ax.set_ylabel("VADER sentiment (mean, 95% CI)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"CAST: sentiment vector (α={ALPHA}) only where the cooking condition fires")
    fig.tight_layout()
    with atomic_path(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
