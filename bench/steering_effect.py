"""Evidence that control vectors work on the embedded model, each beside a prompting baseline.

Writes artifacts/steering_effect/{report.md, *.csv, *.png}. All vectors are mean differences of the bundled
sets' train splits; steering is at block LAYER (chosen before measuring: the demo's layer), all positions.
  * separation: held-out AUROC per layer for sentiment, concise, reasoning;
  * sentiment: lexicon score and distinct-token ratio of greedy completions of neutral prompts over α,
    against a system prompt asking for joy / misery;
  * concise: mean completion length on open questions and free-form arithmetic accuracy over α, against a
    system prompt asking for brevity;
  * reasoning: first-token accuracy, KL and entropy over α on arithmetic and deduction (Højer et al.).

Run: .venv/bin/python bench/steering_effect.py   (about 15 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit import plots  # noqa: E402
from steerkit._io import atomic_path  # noqa: E402
from steerkit.evals import load_task, score, write_csv  # noqa: E402
from steerkit.models import chat_prompt  # noqa: E402
from steerkit.steer import completions  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "artifacts" / "steering_effect"
LAYER = 10  # the demo's layer: separation table and reasoning sweeps
# Chosen on separate development prompts (not the ones measured here), by looking at a grid of layers and α:
SENTIMENT_LAYERS = [8]
CONCISE_SETTINGS = [([4], 0.5), ([4], 1.0), ([4], 1.5), ([4], 2.0), (list(range(2, 7)), 0.5)]

NEUTRAL_PROMPTS = [
    "Tell me about your weekend.",
    "How was the movie?",
    "Describe your morning.",
    "What did you eat today?",
    "Write a note to a friend.",
    "What is your favourite season?",
    "Describe a walk in the park.",
    "How is work going?",
    "Tell me about your neighbourhood.",
    "What did you do yesterday?",
    "Describe the weather today.",
    "Tell me about a book you read.",
    "How was the trip?",
    "Describe your kitchen.",
    "What are your plans for tonight?",
    "Tell me about your family.",
    "Describe a train journey.",
    "What happened at school today?",
    "Tell me about your garden.",
    "How was the concert?",
    "Describe your commute.",
    "Tell me about your best friend.",
    "What do you think of the city?",
    "Describe a rainy afternoon.",
    "How did the meeting go?",
    "Tell me about your first job.",
    "Describe the view from your window.",
    "What was dinner like?",
    "Tell me about the holidays.",
    "Describe a visit to the market.",
    "How was your birthday?",
    "Tell me about the new neighbours.",
]
OPEN_QUESTIONS = [
    "Why is the sky blue?",
    "How do plants grow?",
    "What is photosynthesis?",
    "Why do we have seasons?",
    "How does a bicycle work?",
    "What causes rain?",
    "Why do cats purr?",
    "How do airplanes fly?",
    "What is the internet?",
    "Why is exercise healthy?",
    "How are rainbows made?",
    "What is gravity?",
    "How do bees make honey?",
    "Why do leaves change colour?",
    "What is a volcano?",
    "How does a fridge work?",
    "Why do we sleep?",
    "What is electricity?",
    "How do fish breathe?",
    "Why is the ocean salty?",
    "What is a computer?",
    "How does the heart work?",
    "Why do stars shine?",
    "What is democracy?",
]


_VADER = None


def lexicon_score(text: str) -> float:
    """VADER's compound score in [-1, 1] (a standard sentiment lexicon with rules for negation and emphasis)."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return _VADER.polarity_scores(text)["compound"]


def longest_increasing_run(values: list[float]) -> range:
    """Indices of the longest contiguous run over which ``values`` strictly increase."""
    best, start = range(0, 1), 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] <= values[i - 1]:
            if i - start > len(best):
                best = range(start, i)
            start = i
    return best


def distinct_ratio(tok, text: str) -> float:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return len(set(ids)) / max(len(ids), 1)


def complete(model, tok, prompts, tokens, vector=None, alpha=0.0, layers=(LAYER,)):
    """Greedy completions, steered at ``layers`` when a vector and a nonzero α are given."""
    if vector is None or alpha == 0:
        return completions(model, tok, prompts, tokens, 16, do_sample=False)
    with sk.steer(model, vector.select(layers), alpha):
        return completions(model, tok, prompts, tokens, 16, do_sample=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer prompts and α values (a smoke run)")
    args = parser.parse_args()
    start = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    model, tok = sk.load_model("smollm2-135m-instruct")
    layers = list(range(1, sk.num_layers(model)))
    vectors = {
        name: sk.extract(model, tok, sk.load_pairs(name), layers=layers)
        for name in ("sentiment", "concise", "reasoning")
    }
    report = [
        "# Steering effect on smollm2-135m-instruct",
        "",
        "Mean-difference vectors from the bundled sets' train splits; steering at all positions; greedy decoding; "
        "each section names its layers. Command: `.venv/bin/python bench/steering_effect.py`.",
        "",
    ]

    # --- separation ----------------------------------------------------------------------------
    report += [
        "## Separation (held-out AUROC of the projection)",
        "",
        f"| set | best layer | AUROC there | AUROC at layer {LAYER} | min over layers 1-29 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, vec in vectors.items():
        best = vec.best_layers(1)[0]
        report.append(
            f"| {name} | {best} | {vec.separation[best]:.3f} | {vec.separation[LAYER]:.3f} | "
            f"{min(vec.separation.values()):.3f} |"
        )
        plots.separation(vec, title=f"{name}: held-out AUROC by layer", path=OUT / f"separation_{name}.png", force=True)
    pairs = sk.load_pairs("sentiment", split="test")
    acts = sk.capture(model, tok, [p.positive for p in pairs] + [p.negative for p in pairs], [LAYER])[:, 0]
    plots.pca_scatter(
        acts[: len(pairs)],
        acts[len(pairs) :],
        layer=LAYER,
        labels=("joyful", "miserable"),
        path=OUT / "pca_sentiment.png",
        force=True,
    )

    # --- sentiment -----------------------------------------------------------------------------
    neutral = NEUTRAL_PROMPTS[:8] if args.quick else NEUTRAL_PROMPTS
    alphas = [-1.0, 0.0, 1.0] if args.quick else [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    rendered = [chat_prompt(tok, p) for p in neutral]
    rows = []
    for alpha in alphas:
        texts = complete(model, tok, rendered, 40, vectors["sentiment"], alpha, SENTIMENT_LAYERS)
        rows.append(
            {
                "setting": f"alpha={alpha:g}",
                "alpha": alpha,
                "sentiment": sum(map(lexicon_score, texts)) / len(texts),
                "distinct_ratio": sum(distinct_ratio(tok, t) for t in texts) / len(texts),
                "example": texts[0].strip().replace("\n", " ")[:90],
            }
        )
    for label, system in (
        ("prompt: joyful", "You are extremely happy and joyful. Everything delights you."),
        ("prompt: miserable", "You are deeply sad and miserable. Everything disappoints you."),
    ):
        texts = completions(model, tok, [chat_prompt(tok, p, system) for p in neutral], 40, 16, do_sample=False)
        rows.append(
            {
                "setting": label,
                "alpha": float("nan"),
                "sentiment": sum(map(lexicon_score, texts)) / len(texts),
                "distinct_ratio": sum(distinct_ratio(tok, t) for t in texts) / len(texts),
                "example": texts[0].strip().replace("\n", " ")[:90],
            }
        )
    write_csv(rows, OUT / "sentiment.csv", force=True)
    steered = [r for r in rows if r["setting"].startswith("alpha")]
    run = longest_increasing_run([r["sentiment"] for r in steered])
    alphas_run = [steered[i]["alpha"] for i in run]
    report += [
        "",
        f"## Sentiment ({len(neutral)} neutral prompts, 40 tokens)",
        "",
        f"Steering at layers {SENTIMENT_LAYERS}. Sentiment = VADER compound score in [-1, 1] (a standard lexicon), "
        "mean over completions; distinct-token ratio = unique / all tokens of a completion (low: repetition).",
        "",
        "| setting | sentiment | distinct-token ratio | first completion |",
        "| --- | --- | --- | --- |",
    ]
    report += [f"| {r['setting']} | {r['sentiment']:+.4f} | {r['distinct_ratio']:.2f} | {r['example']} |" for r in rows]
    report += [
        "",
        f"Longest run of α values over which the score strictly increases: **{len(run)} values, "
        f"α = {alphas_run[0]:g} … {alphas_run[-1]:g}** (of {len(steered)} measured).",
    ]

    # --- concise ------------------------------------------------------------------------------
    questions = OPEN_QUESTIONS[:8] if args.quick else OPEN_QUESTIONS
    items = load_task("arithmetic", n=16 if args.quick else 48, steps=1, seed=7)
    brief = "Answer as briefly as possible."
    rows = []

    def measure(label, alpha, layers=(LAYER,), system=None):
        qs = [chat_prompt(tok, q, system) for q in questions]
        texts = complete(model, tok, qs, 96, vectors["concise"], alpha, layers)
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        ps = [chat_prompt(tok, it.question, system) for it in items]
        answers = complete(model, tok, ps, 48, vectors["concise"], alpha, layers)
        scored = [score(a, it) for a, it in zip(answers, items, strict=True)]
        rows.append(
            {
                "setting": label,
                "alpha": alpha,
                "mean_length": sum(lengths) / len(lengths),
                "accuracy": sum(c for c, _ in scored) / len(scored),
                "unparsed": sum(p is None for _, p in scored),
                "distinct_ratio": sum(distinct_ratio(tok, t) for t in texts) / len(texts),
                "example": texts[0].strip().replace("\n", " ")[:90],
            }
        )

    measure("alpha=0", 0.0)
    for layers_, alpha in CONCISE_SETTINGS[:1] if args.quick else CONCISE_SETTINGS:
        span = f"{layers_[0]}-{layers_[-1]}" if len(layers_) > 1 else str(layers_[0])
        measure(f"layers {span}, alpha={alpha:g}", alpha, layers_)
    measure("prompt: brief", 0.0, system=brief)
    write_csv(rows, OUT / "concise.csv", force=True)
    base = rows[0]
    plots.length_accuracy(
        [{"label": r["setting"], "length": r["mean_length"], "accuracy": r["accuracy"]} for r in rows],
        path=OUT / "concise_length_accuracy.png",
        force=True,
    )
    report += [
        "",
        f"## Concise (settings chosen on 6 separate questions; {len(questions)} open questions, up to 96 tokens; "
        f"{len(items)} one-step arithmetic problems, free-form, 48 tokens, final number scored)",
        "",
        "| setting | mean length | vs α=0 | distinct-token ratio | arithmetic accuracy | vs α=0 (points) | unparsed "
        "| first completion |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        report.append(
            f"| {r['setting']} | {r['mean_length']:.1f} | {r['mean_length'] / base['mean_length'] - 1:+.0%} | "
            f"{r['distinct_ratio']:.2f} | {r['accuracy']:.3f} | {100 * (r['accuracy'] - base['accuracy']):+.1f} | "
            f"{r['unparsed']} | {r['example']} |"
        )
    ok = [
        r["setting"]
        for r in rows
        if r["mean_length"] <= 0.7 * base["mean_length"] and r["accuracy"] >= base["accuracy"] - 0.05
    ]
    report += ["", f"Settings with ≥ 30% shorter answers and ≤ 5 points accuracy loss: **{ok or 'none'}**."]

    # --- reasoning ----------------------------------------------------------------------------
    r_alphas = [-1.0, 0.0, 1.0] if args.quick else [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]
    r_layers = [LAYER] if args.quick else [6, LAYER, 16]
    report += ["", f"## Reasoning vector: first-token metrics (Højer et al.), layers {r_layers}", ""]
    for task, kwargs in (("arithmetic", {"steps": 2}), ("deduction", {})):
        task_items = load_task(task, n=24 if args.quick else 48, seed=3, **kwargs)
        rows = sk.sweep(model, tok, vectors["reasoning"], task_items, alphas=r_alphas, layers=r_layers)
        write_csv(rows, OUT / f"reasoning_{task}.csv", force=True)
        plots.sweep_metrics(
            rows,
            metrics=("accuracy", "kl", "entropy", "mass_correct"),
            title=f"reasoning vector on {task}",
            path=OUT / f"reasoning_{task}.png",
            force=True,
        )
        report += [
            f"### {task} ({len(task_items)} items, 4 options)",
            "",
            "| layer | α | accuracy | KL | entropy | mass correct | mass incorrect |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        report += [
            f"| {r['layer']} | {r['alpha']:g} | {r['accuracy']:.3f} | {r['kl']:.4f} | {r['entropy']:.3f} | "
            f"{r['mass_correct']:.3f} | {r['mass_incorrect']:.3f} |"
            for r in rows
        ]
        report.append("")
    report.append(f"Total time: {time.time() - start:.0f} s.")
    with atomic_path(OUT / "report.md", force=True) as tmp:
        tmp.write_text("\n".join(report) + "\n")
    print("\n".join(report))
    print(f"\nwrote {OUT}/report.md\nreproduce: .venv/bin/python bench/steering_effect.py")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
