"""SAE latents as steering directions, against mean-difference vectors; transcoders against SAEs (embedded model).

Steering (AxBench compared SAE directions with DiffMean and found them weaker): at block LAYER, for the sentiment
set and the formality set (formal vs casual; its test pairs held out from everything but scoring the scorer),
three directions of the same norm: the mean difference of the train pairs; the decoder row of the latent that
best separates the pairs (``top_latents``: held-out AUROC), scaled to that norm; and a random live latent's
decoder row, scaled alike. Greedy completions of 16 validation and 16 test prompts over α; each direction's α
is chosen on validation (largest mean score change with a distinct-token ratio of at least 0.5) and reported on
test with a paired bootstrap interval against α = 0, beside a prompting baseline. Scores: VADER's compound
(sentiment, as bench/steering_effect.py) and a formality classifier (bag of words, logistic regression on the
formality train pairs; its held-out AUROC is reported first, so the stick is checked before what it measures).

Transcoders: a BatchTopK transcoder of block 13's MLP and a BatchTopK SAE of block 13's output, same width and
k, same tokens: FVU of each one's target and CE loss recovered when spliced, on held-out text.

Run: .venv/bin/python bench/features.py   (about 45 minutes on 2 cores; stages cached under bench/.cache/features)
Writes artifacts/features/{report.md, report.json, steering.png} and a dashboard of 200 latents,
artifacts/features/dashboard/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit._io import atomic_path  # noqa: E402
from steerkit.evals.stats import bootstrap, paired_bootstrap  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT, CACHE = ROOT / "artifacts" / "features", ROOT / "bench" / ".cache" / "features"
LAYER, ALPHAS, TOKENS, DASHBOARD = 8, [-1.0, -0.5, 0.5, 1.0, 1.5], 40, 200
SAE = dict(arch="topk", d_sae=4608, k=32, tokens=1_000_000, batch_size=1024, autocast=True)
CODERS = dict(arch="batchtopk", d_sae=4608, k=32, tokens=500_000, batch_size=1024, autocast=True)
PROMPTS = ["Tell me about your weekend.", "How was the movie?", "Describe your morning.", "What did you eat today?",
           "Write a note to a friend.", "What is your favourite season?", "Describe a walk in the park.",
           "How is work going?", "Tell me about your neighbourhood.", "What did you do yesterday?",
           "Describe the weather today.", "Tell me about a book you read.", "How was the trip?",
           "Describe your kitchen.", "What are your plans for tonight?", "Tell me about your family.",
           "Describe a train journey.", "What happened at school today?", "Tell me about your garden.",
           "How was the concert?", "Describe your commute.", "Tell me about your best friend.",
           "What do you think of the city?", "Describe a rainy afternoon.", "How did the meeting go?",
           "Tell me about your first job.", "Describe the view from your window.", "What was dinner like?",
           "Tell me about the holidays.", "Describe a visit to the market.", "How was your birthday?",
           "Tell me about the new neighbours."]  # fmt: skip
VAL, TEST = PROMPTS[::2], PROMPTS[1::2]
SYSTEM = {"sentiment": "Answer joyfully, with great enthusiasm.", "formality": "Answer in a formal, polite tone."}


def cached(name: str, compute):
    """A stage's JSON result, computed once (delete bench/.cache/features to recompute)."""
    path = CACHE / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def scorer(behaviour: str):
    """(score(text) -> float, what the score is checked against): VADER, or the formality classifier."""
    if behaviour == "sentiment":
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        vader = SentimentIntensityAnalyzer()
        return (lambda text: vader.polarity_scores(text)["compound"]), None
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from steerkit.extract import auroc, split_pairs

    train, test = split_pairs(sk.load_pairs("formality"))
    texts = [p.positive for p in train] + [p.negative for p in train]
    model = make_pipeline(CountVectorizer(ngram_range=(1, 2), lowercase=True), LogisticRegression(C=1.0))
    model.fit(texts, [1] * len(train) + [0] * len(train))
    prob = lambda text: float(model.predict_proba([text])[0, 1])  # noqa: E731
    check = auroc(torch.tensor([prob(p.positive) for p in test]), torch.tensor([prob(p.negative) for p in test]))
    return prob, check


def directions(model, tok, sae, behaviour: str) -> tuple[dict, dict]:
    """Mean difference, best latent and a random live latent's decoder rows, all of the mean difference's norm."""
    pairs = sk.load_pairs(behaviour)
    mean_diff = sk.extract(model, tok, pairs, layers=[LAYER])[LAYER]
    best = sk.top_latents(model, tok, sae, pairs, n=1)[0]
    live = torch.nonzero(sk.latent_stats(model, tok, sae, latents=None, tokens=4096, top=1, progress=False)
                         .frequency > 0).flatten().tolist()  # fmt: skip
    rng = torch.Generator().manual_seed(0)
    random_latent = live[int(torch.randint(len(live), (1,), generator=rng))]
    rows = sae.W_dec.detach().float().cpu()
    scale = lambda v: v / v.norm() * mean_diff.norm()  # noqa: E731
    return {"mean difference": mean_diff, f"best latent ({best['latent']})": scale(rows[best["latent"]]),
            f"random latent ({random_latent})": scale(rows[random_latent])}, best  # fmt: skip


def sweep(model, tok, behaviour: str, dirs: dict, score) -> dict:
    """Scores and distinct-token ratios of greedy completions per direction and α (α 0: unsteered)."""

    def run(prompts, vector=None, alpha=0.0, system=None):
        rows = sk.generate(model, tok, prompts, vector=vector, alpha=alpha, max_new_tokens=TOKENS, system=system)
        texts = [r["steered" if vector is not None else "unsteered"] for r in rows]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        return {"score": [score(t) for t in texts], "distinct": [len(set(i)) / max(1, len(i)) for i in ids],
                "texts": texts[:3]}  # fmt: skip

    out = {
        "base": {split: run(p) for split, p in (("val", VAL), ("test", TEST))},
        "prompting": {split: run(p, system=SYSTEM[behaviour]) for split, p in (("val", VAL), ("test", TEST))},
    }
    for name, v in dirs.items():
        vec = sk.SteeringVector({LAYER: v})
        out[name] = {f"{a:g}": {split: run(p, vec, a) for split, p in (("val", VAL), ("test", TEST))}
                     for a in ALPHAS}  # fmt: skip
    return out


def choose(result: dict, name: str) -> tuple[float, dict]:
    """The α whose validation mean change is largest among those keeping a distinct-token ratio of 0.5; its test
    change against α = 0 with a paired bootstrap interval."""
    base = result["base"]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    change = lambda split, a: mean(result[name][a][split]["score"]) - mean(base[split]["score"])  # noqa: E731

    usable = [a for a in result[name] if sum(result[name][a]["val"]["distinct"]) / 16 >= 0.5] or list(result[name])
    alpha = max(usable, key=lambda a: change("val", a))
    scores = result[name][alpha]["test"]["score"]
    diff = paired_bootstrap(scores, base["test"]["score"])
    return float(alpha), {"test change": diff, "distinct": sum(result[name][alpha]["test"]["distinct"]) / 16,
                          "scores": scores}  # fmt: skip


def main() -> None:
    import argparse

    from steerkit.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings, to check the script runs (not a result)")
    if parser.parse_args().smoke:
        global CACHE, OUT, VAL, TEST, ALPHAS, TOKENS
        CACHE, OUT = CACHE.with_name("features-smoke"), CACHE.with_name("features-smoke") / "out"
        VAL, TEST, ALPHAS, TOKENS = VAL[:16], TEST[:16], [0.5], 4
        SAE.update(tokens=16_384), CODERS.update(tokens=16_384)

    model, tok = load_model("smollm2-135m-instruct")
    corpus = sk.load_corpus("default")
    sae_dir = CACHE / "sae_l8"
    if not (sae_dir / "cfg.json").is_file():
        sk.train_sae(model, tok, corpus, LAYER, out=sae_dir, force=True, **SAE)
    sae = sk.load_sae(sae_dir)
    report = {"steering": {}, "transcoder": {}}
    for behaviour in ("sentiment", "formality"):
        score, check = scorer(behaviour)
        dirs, best = directions(model, tok, sae, behaviour)
        result = cached(f"sweep_{behaviour}", lambda: sweep(model, tok, behaviour, dirs, score))  # noqa: B023
        chosen = {name: choose(result, name) for name in dirs}
        prompting = paired_bootstrap(result["prompting"]["test"]["score"], result["base"]["test"]["score"])
        report["steering"][behaviour] = {"scorer held-out AUROC": check, "best latent": best, "chosen": chosen,
                                         "prompting": prompting, "result": result}  # fmt: skip
    report["transcoder"] = cached("coders", lambda: coders(model, tok, corpus))
    write(report)
    dashboard(model, tok, sae, corpus)


def dashboard(model, tok, sae, corpus) -> None:
    """The dashboard of the DASHBOARD latents that best separate the formality pairs (held-out AUROC)."""
    from steerkit.dashboard import write as write_site

    ranked = sk.top_latents(model, tok, sae, "formality", n=DASHBOARD)
    latents = [r["latent"] for r in ranked]
    stats = sk.latent_stats(model, tok, sae, corpus, latents=latents, tokens=32_768, top=6)
    separation = {r["latent"]: r["auroc"] for r in ranked}
    title = f"Block {LAYER} TopK SAE (1M tokens): the {DASHBOARD} latents that best separate formal from casual"
    site = write_site(stats, OUT / "dashboard", f"bench/.cache/features/sae_l{LAYER}", separation, "formality",
                      title=title, force=True)  # fmt: skip
    screenshot(site / "latents" / f"{latents[0]}.html", OUT / "dashboard.png")


def screenshot(page: Path, out: Path) -> None:
    """A picture of a dashboard page, for the docs, where chromium is installed (it names its file by suffix)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        return
    with tempfile.TemporaryDirectory() as folder, atomic_path(out, force=True) as tmp:
        shot = Path(folder) / "page.png"
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                   "--window-size=1200,1000", page.as_uri()]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        shutil.move(shot, tmp)


def coders(model, tok, corpus) -> dict:
    """A transcoder of block 13's MLP and an SAE of block 13's output, same width, k and tokens; their metrics."""
    out = {}
    for kind in ("sae", "transcoder"):
        coder = sk.train_sae(model, tok, corpus, 13, out=CACHE / f"{kind}_l13", force=True, kind=kind, **CODERS)
        metrics = sk.evaluate_sae(model, tok, coder, corpus=corpus, tokens=16_384)
        out[kind] = {k: float(v) for k, v in metrics.items() if k != "latent_frequency"}
    return out


def write(report: dict) -> None:
    lines = ["# SAE latents as steering directions, and transcoders", "",
             f"Embedded model, block {LAYER}, greedy, {TOKENS} tokens; 16 validation / 16 test prompts; directions "
             "of equal norm. Test change of the score against α = 0 (paired bootstrap 95% interval) at the α chosen "
             "on validation.", ""]  # fmt: skip
    for behaviour, part in report["steering"].items():
        check = part["scorer held-out AUROC"]
        lines += [f"## {behaviour}", "", f"best latent by held-out AUROC: {part['best latent']['latent']} "
                  f"(AUROC {part['best latent']['auroc']:.3f}, mean activation difference "
                  f"{part['best latent']['mean_diff']:.3g})" + ("" if check is None else
                  f"; the formality scorer separates the held-out pairs with AUROC {check:.3f}"), "",
                  "| direction | α (validation) | test change [95% CI] | against the random latent [95% CI] "
                  "| distinct-token ratio |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
        control = next(got["scores"] for name, (_, got) in part["chosen"].items() if name.startswith("random"))
        for name, (alpha, got) in part["chosen"].items():
            against = "—" if got["scores"] is control else _interval(paired_bootstrap(got["scores"], control))
            change, distinct = _interval(got["test change"]), got["distinct"]
            lines.append(f"| {name} | {alpha:g} | {change} | {against} | {distinct:.2f} |")
        scores = {name.split(" (")[0]: got["scores"] for name, (_, got) in part["chosen"].items()}
        lines += [f'| prompting: "{SYSTEM[behaviour]}" | — | {_interval(part["prompting"])} | — | — |', "",
                  "best latent against the mean difference, each at its α: "
                  f"{_interval(paired_bootstrap(scores['best latent'], scores['mean difference']))}", ""]  # fmt: skip
    tc = report["transcoder"]
    lines += ["## Transcoder against SAE (block 13, BatchTopK, d_sae 4608, k 32, 500k tokens)", "",
              "| | target | FVU | L0 | CE loss: clean → spliced → target zeroed | CE loss recovered |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for kind, target in (("sae", "block output"), ("transcoder", "MLP output")):
        m = tc[kind]
        losses = f"{m['ce_loss_clean']:.3f} → {m['ce_loss_spliced']:.3f} → {m['ce_loss_zero']:.3f}"
        recovered = m["ce_loss_recovered"]
        lines.append(f"| {kind} | {target} | {m['fvu']:.3f} | {m['l0']:.1f} | {losses} | {recovered:.3f} |")
    lines += ["", "Zeroing the block output and zeroing the MLP output are different baselines: compare the spliced "
              "losses, not the fractions recovered."]  # fmt: skip
    lines += ["", "reproduce: `.venv/bin/python bench/features.py`"]
    text = "\n".join(lines) + "\n"
    print(text)
    figure(report)
    for name, content in (("report.md", text), ("report.json", json.dumps(report, default=str) + "\n")):
        with atomic_path(OUT / name, force=True) as tmp:
            Path(tmp).write_text(content)


def _interval(stat: tuple[float, float, float]) -> str:
    mean, lo, hi = stat
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def figure(report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (behaviour, part) in zip(axes, report["steering"].items(), strict=True):
        result, base = part["result"], part["result"]["base"]["test"]["score"]
        for name in part["chosen"]:
            points = [(float(a), bootstrap([s - b for s, b in zip(result[name][a]["test"]["score"], base,
                                                                    strict=True)])) for a in result[name]]  # fmt: skip
            xs = [a for a, _ in points]
            ax.errorbar(xs, [m for _, (m, _, _) in points], yerr=[[m - lo for _, (m, lo, _) in points],
                        [hi - m for _, (m, _, hi) in points]], marker="o", capsize=3, label=name)  # fmt: skip
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(title=behaviour, xlabel="α", ylabel="test score change vs α = 0")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(OUT / "steering.png", force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
