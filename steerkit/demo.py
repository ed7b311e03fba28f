"""``make demo``: extract a sentiment vector on the embedded model, steer three prompts, save the vector."""

from __future__ import annotations

from pathlib import Path

import steerkit as sk

PROMPTS = ["Tell me about your weekend.", "How was the movie?", "Describe your morning."]
LAYER, ALPHA = 8, 0.5  # the cleanest setting in bench/steering_effect.py (sentiment +0.91 at +0.5)
OUT = Path("artifacts/sentiment.safetensors")


def main() -> None:
    model, tok = sk.load_model("smollm2-135m-instruct")
    print(f"model: smollm2-135m-instruct, {sk.num_layers(model)} blocks, d_model {sk.hidden_size(model)}")
    pairs = sk.load_pairs("sentiment")
    vec = sk.extract(model, tok, pairs, layers=range(1, sk.num_layers(model)), method="mean_diff")
    print(f"extracted a mean-difference vector from {len(pairs)} joyful/miserable pairs, layers 1-29")
    shown = (4, 10, 16, 22, 28)
    print("held-out AUROC by layer: " + ", ".join(f"{layer}: {vec.separation[layer]:.2f}" for layer in shown))
    vec.save(OUT, force=True)  # the demo's own artifact, rewritten each run
    print(f"saved {OUT}")
    print(f"\nsteering block {LAYER} with alpha = +{ALPHA} (joyful) and -{ALPHA} (miserable), greedy, 40 tokens:")
    plus = sk.generate(model, tok, PROMPTS, vector=vec.select([LAYER]), alpha=ALPHA, max_new_tokens=40)
    minus = sk.generate(model, tok, PROMPTS, vector=vec.select([LAYER]), alpha=-ALPHA, max_new_tokens=40)
    for p, m in zip(plus, minus, strict=True):
        print(f"\n>>> {p['prompt']}")
        print(f"  unsteered : {p['unsteered'].strip()}")
        print(f"  +{ALPHA} joyful : {p['steered'].strip()}")
        print(f"  -{ALPHA} miserable: {m['steered'].strip()}")


if __name__ == "__main__":
    main()
