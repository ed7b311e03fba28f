"""Capture speed on the embedded model, as ratios against a plain forward pass in the same run.

Capturing the last token at every layer for N texts of ~64 tokens, against:
  * a plain forward pass (model(**batch), LM head included) over the same padded batches;
  * TransformerLens' run_with_cache on a TransformerBridge (resid_post hooks only);
  * an nnsight trace saving every block's output;
and capturing layer 5 alone (early exit). Each timing is the best of --repeats runs.

Run: .venv/bin/python bench/capture.py [--texts 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import random
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit.batching import length_batches, pad_batch, tokenize  # noqa: E402

WORDS = (
    "the a river mountain city quiet bright old young teacher garden window morning evening story letter road "
    "market friend music table winter summer because although while after before slowly carefully often never "
    "walked found wrote opened carried remembered noticed built painted listened returned believed small large "
    "green golden distant early late simple heavy gentle clever honest"
).split()


def make_texts(n: int, tokens: int, tok, seed: int = 0) -> list[str]:
    """n seeded pseudo-sentences of about ``tokens`` tokens each."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = []
        while len(tok(" ".join(words))["input_ids"]) < tokens:
            words.extend(rng.choice(WORDS) for _ in range(8))
        texts.append(" ".join(words).capitalize() + ".")
    return texts


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = sk.load_model("smollm2-135m-instruct")
    texts = make_texts(args.texts, args.tokens, tok)
    n_layers = sk.num_layers(model)
    all_layers = list(range(n_layers))

    ids = tokenize(tok, texts, None, False)
    batches = [
        pad_batch([ids[i] for i in index], tok.pad_token_id, "right") for index in length_batches(ids, args.batch_size)
    ]
    n_tokens = sum(len(row) for row in ids)
    print(
        f"{args.texts} texts, {n_tokens / args.texts:.1f} tokens each on average, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}"
    )

    def plain():
        with torch.inference_mode():
            for input_ids, mask, _ in batches:
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)

    def capture_all():
        sk.capture(model, tok, texts, all_layers, batch_size=args.batch_size)

    def capture_five():
        sk.capture(model, tok, texts, [5], batch_size=args.batch_size)

    from nnsight import LanguageModel
    from transformer_lens.model_bridge import TransformerBridge

    path = str(sk.embedded_checkpoint())
    bridge = TransformerBridge.boot_transformers(path, device="cpu")
    names = {f"blocks.{i}.hook_resid_post" for i in all_layers}

    def tl_cache():
        with torch.inference_mode():
            for input_ids, mask, _ in batches:
                last = mask.sum(-1) - 1
                _, cache = bridge.run_with_cache(input_ids, names_filter=lambda name: name in names)
                torch.stack(
                    [cache[f"blocks.{i}.hook_resid_post"][torch.arange(len(last)), last] for i in all_layers], 1
                )

    nn_model = LanguageModel(path, dispatch=True)

    def nnsight_trace():
        with torch.inference_mode():
            for input_ids, mask, _ in batches:
                last = mask.sum(-1) - 1
                saved = []
                with nn_model.trace({"input_ids": input_ids, "attention_mask": mask}):
                    for i in all_layers:
                        saved.append(nn_model.model.layers[i].output.save())
                torch.stack([s[torch.arange(len(last)), last] for s in saved], 1)

    runs = {
        "plain forward": plain,
        "steerkit capture, all 30 layers": capture_all,
        "steerkit capture, layer 5 only": capture_five,
        "TransformerLens run_with_cache (bridge)": tl_cache,
        "nnsight trace": nnsight_trace,
    }
    plain()  # warm-up
    times = {name: best_of(fn, args.repeats) for name, fn in runs.items()}
    base = times["plain forward"]
    print(f"\n{'method':<42}{'seconds':>9}{'x plain':>9}")
    for name, seconds in times.items():
        print(f"{name:<42}{seconds:>9.2f}{seconds / base:>9.2f}")
    cap = times["steerkit capture, all 30 layers"]
    print("\nratios (targets from issue 2):")
    print(f"  capture / plain forward           {cap / base:.2f}  (target <= 0.90)")
    print(
        f"  TransformerLens / capture         {times['TransformerLens run_with_cache (bridge)'] / cap:.2f}  (>= 1.15)"
    )
    print(f"  nnsight / capture                 {times['nnsight trace'] / cap:.2f}  (target >= 1.30)")
    print(f"  layer 5 only / plain forward      {times['steerkit capture, layer 5 only'] / base:.2f}")
    print("\nreproduce: make bench  (or .venv/bin/python bench/capture.py --texts 256 --repeats 2)")


if __name__ == "__main__":
    main()
