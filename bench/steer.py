"""Steering and extraction speed on the embedded model, as ratios against unsteered runs in the same process.

* Greedy generation at batch 1 and batch 8 (32 new tokens each), steered (sentiment vector, layers 8-12)
  against unsteered, interleaved, best of --repeats: tokens/s ratio (target >= 0.97).
* Extraction of 64 pairs (128 texts) over all 30 layers against one plain forward pass over the same texts
  (target <= 0.9), and repeng 0.4.0's ControlVector.train(pca_diff) against its own plain forward pass,
  run in repeng's environment (make bench-env) in a subprocess.

Run: make bench   (or .venv/bin/python bench/steer.py --repeats 5)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402
from steering_effect import NEUTRAL_PROMPTS  # noqa: E402  (bench/ is on sys.path when run as a script)

import steerkit as sk  # noqa: E402
from steerkit.models import chat_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPENG_PY = ROOT / "bench" / ".venv-repeng" / "bin" / "python"
PROMPTS = NEUTRAL_PROMPTS[:8]  # the steering-effect bench's neutral prompts


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward pass in extraction")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = sk.load_model("smollm2-135m-instruct")
    pairs = sk.load_pairs("sentiment")[:64]
    layers = list(range(sk.num_layers(model)))
    texts = [t for p in pairs for t in (p.positive, p.negative)]

    # --- extraction vs a plain forward pass -----------------------------------------------------
    def plain():
        with torch.inference_mode():
            for s in range(0, len(texts), args.batch_size):
                model(**tok(texts[s : s + args.batch_size], padding=True, return_tensors="pt"))

    vec = None

    def extract():
        nonlocal vec
        vec = sk.extract(model, tok, pairs, layers=layers, batch_size=args.batch_size)

    plain()
    t_plain = t_extract = float("inf")
    for _ in range(args.repeats):
        t_plain = min(t_plain, timed(plain))
        t_extract = min(t_extract, timed(extract))
    print(
        f"extraction: 64 pairs = 128 texts, all {len(layers)} layers, batch {args.batch_size}, best of {args.repeats}"
    )
    print(f"  plain forward            {t_plain:7.2f} s")
    print(f"  steerkit extract         {t_extract:7.2f} s   {t_extract / t_plain:.2f}x plain   (target <= 0.90)")

    if REPENG_PY.exists():
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([[p.positive, p.negative] for p in pairs], f)
        cmd = [
            str(REPENG_PY),
            str(ROOT / "bench" / "repeng_side.py"),
            f.name,
            str(sk.embedded_checkpoint()),
            str(args.batch_size),
            str(args.repeats),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        os.unlink(f.name)
        rp = json.loads(out)
        ratio = rp["repeng_s"] / rp["plain_s"]
        print(
            f"  repeng 0.4.0 pca_diff    {rp['repeng_s']:7.2f} s   {ratio:.2f}x its plain forward "
            f"({rp['plain_s']:.2f} s, numpy {rp['numpy']})"
        )
        print(f"  steerkit is {ratio / (t_extract / t_plain):.2f}x faster than repeng, relative to plain forward")
    else:
        print("  repeng: not measured (build its environment with `make bench-env`)")

    # --- steered vs unsteered generation -----------------------------------------------------------
    steer_vec = vec.select(range(8, 13))
    print(
        f"\ngeneration: greedy, {args.new_tokens} new tokens, steering layers 8-12 at alpha 1, best of {args.repeats}"
    )
    for batch in (1, 8):
        enc = tok(
            [chat_prompt(tok, p) for p in PROMPTS[:batch]],
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )

        def gen(enc=enc):
            with torch.no_grad():
                model.generate(
                    **enc,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )

        def steered():
            with sk.steer(model, steer_vec, alpha=1.0):
                gen()

        gen()
        t_gen = t_steer = float("inf")
        for _ in range(args.repeats):
            t_gen = min(t_gen, timed(gen))
            t_steer = min(t_steer, timed(steered))
        n = batch * args.new_tokens
        print(
            f"  batch {batch}: unsteered {n / t_gen:6.1f} tok/s, steered {n / t_steer:6.1f} tok/s, "
            f"ratio {t_gen / t_steer:.3f}   (target >= 0.97)"
        )
    print("\nreproduce: make bench   (or .venv/bin/python bench/steer.py --repeats 5)")


if __name__ == "__main__":
    main()
