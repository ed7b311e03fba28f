"""The two embedded models side by side: SmolLM2-135M-Instruct (Llama) and Gemma 3 270M base (Gemma 3).

For each: held-out separation of the sentiment pairs per block (mean-difference AUROC on the set's test pairs),
capture throughput against a plain forward pass, the sentiment vector's effect on the next-token log-probability
of " wonderful" against a random direction of the same norm (16 neutral prompts, paired bootstrap), and a TopK
SAE (8 x d_model latents, k 32, 200k tokens) at the block at 45% depth: explained variance, L0, dead latents, CE
loss recovered on held-out text.

Run: make gemma && .venv/bin/python bench/models.py   (about 25 minutes on 2 cores)
Writes artifacts/models/report.{md,json}.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit._io import atomic_path  # noqa: E402
from steerkit.evals import next_token_logprobs  # noqa: E402
from steerkit.evals.stats import paired_bootstrap  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "models"
PROMPTS = ["I think that my day was", "Honestly, the movie felt", "The weather this morning is", "My new job is",
           "The food at the party was", "Our trip to the coast was", "The meeting this afternoon was",
           "Reading that book made me feel", "The concert last night was", "My neighbour's garden looks",
           "The train journey was", "This weekend has been", "The news today is", "The old house feels",
           "Working from home is", "The view from the hill is"]  # fmt: skip


def measure(name: str) -> dict:
    model, tok = sk.load_model(name)
    depth, width = sk.num_layers(model), sk.hidden_size(model)
    vec = sk.extract(model, tok, sk.load_pairs("sentiment"), layers=range(1, depth))
    best = vec.best_layers(1)[0]
    texts = [p.positive for p in sk.load_pairs("sentiment")] * 2
    batch = tok(texts[:16], return_tensors="pt", padding=True)
    started = time.perf_counter()
    with torch.no_grad():
        model(**batch)
    forward = time.perf_counter() - started
    started = time.perf_counter()
    sk.capture(model, tok, texts[:16], layers=list(range(depth)), position="last", progress=False)
    capture = time.perf_counter() - started
    layer = round(0.45 * depth)
    good = tok(" wonderful", add_special_tokens=False)["input_ids"][0]
    g = torch.Generator().manual_seed(0)
    direction = vec.select([layer])
    random = sk.SteeringVector({layer: torch.randn(width, generator=g) * direction[layer].norm() / width**0.5})
    base = next_token_logprobs(model, tok, PROMPTS)[:, good]
    shifts = {}
    for label, v in (("sentiment", direction), ("random", random)):
        with sk.steer(model, v, alpha=0.5):
            shifts[label] = paired_bootstrap(next_token_logprobs(model, tok, PROMPTS)[:, good].tolist(), base.tolist())
    corpus = sk.load_corpus("default")
    sae = sk.train_sae(model, tok, corpus, layer, d_sae=8 * width, k=32, tokens=200_000, autocast=True, progress=False)
    metrics = sk.evaluate_sae(model, tok, sae, corpus=corpus, tokens=16_384, progress=False)
    return {"model": name, "depth": depth, "width": width, "separation": vec.separation, "best layer": best,
            "capture / forward": capture / forward, "steering layer": layer, "steering": shifts,
            "sae": {k: float(v) for k, v in metrics.items() if k != "latent_frequency"}}  # fmt: skip


def main() -> None:
    rows = [measure(name) for name in ("smollm2-135m-instruct", "gemma3-270m")]
    table = {
        "blocks, d_model": [f"{r['depth']}, {r['width']}" for r in rows],
        "sentiment: best held-out AUROC (its block)": [
            f"{r['separation'][r['best layer']]:.3f} ({r['best layer']})" for r in rows
        ],
        "capture of every block / plain forward": [f"{r['capture / forward']:.2f}x" for r in rows],
    }
    for label in ("sentiment", "random"):
        name = f'Δ log p(" wonderful"), α 0.5 at 45% depth, {label} direction [95% CI]'
        table[name] = ["{:+.2f} [{:+.2f}, {:+.2f}]".format(*r["steering"][label]) for r in rows]
    for key in ("explained_variance", "l0", "dead_fraction", "ce_loss_recovered"):
        table[f"SAE (TopK, 8·d latents, k 32, 200k tokens): {key}"] = [f"{r['sae'][key]:.3f}" for r in rows]
    lines = ["# The two embedded models side by side", "", "| | SmolLM2-135M-Instruct | Gemma 3 270M base |",
             "| --- | --- | --- |", *(f"| {k} | {' | '.join(v)} |" for k, v in table.items()), "",
             "reproduce: `make gemma && .venv/bin/python bench/models.py`"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    for name, content in (("report.md", text), ("report.json", json.dumps(rows, default=str, indent=1) + "\n")):
        with atomic_path(OUT / name, force=True) as tmp:
            Path(tmp).write_text(content)


if __name__ == "__main__":
    main()
