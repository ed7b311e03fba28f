"""SAE training throughput: steerkit's train_sae against sae-lens' LanguageModelSAETrainingRunner.

Same model (SmolLM2-135M-Instruct, float32), block 13, TopK k = 32, d_sae = 4608, batches of 1024
activations, 128-token contexts, an activation buffer of 65,536 tokens, the same training tokens of the
embedded corpus (sae-lens reads them from a local jsonl dataset). Throughput counts activation generation.
sae-lens drives the transformers model through its HookedProxyLM (hook ``model.layers.13``, stopped there).
Then activation generation alone: steerkit's block_activations against a plain forward of the first 14
blocks (the model truncated at the layer), best of 3, interleaved.

    .venv/bin/python bench/sae_train.py [--tokens 131072]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

import steerkit as sk
from steerkit.sae.train import block_activations

CACHE = Path("bench/.cache/sae_train")
LAYER, D_SAE, K, BATCH, CTX, BUFFER = 13, 4608, 32, 1024, 128, 65_536


def corpus_as_dataset(corpus) -> Path:
    """The corpus' train split as a local jsonl dataset folder that datasets.load_dataset reads offline."""
    folder = CACHE / "dataset"
    if not (folder / "train.jsonl").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "train.jsonl").open("w") as handle:
            for text in corpus.documents("train"):
                handle.write(json.dumps({"text": text}) + "\n")
    return folder


def run_steerkit(model, tok, corpus, tokens: int) -> float:
    start = time.perf_counter()
    sk.train_sae(model, tok, corpus, LAYER, d_sae=D_SAE, k=K, tokens=tokens, ctx_len=CTX, batch_size=BATCH,
                 buffer_tokens=BUFFER, progress=False)  # fmt: skip
    return time.perf_counter() - start


def run_sae_lens(model_dir: Path, dataset: Path, tokens: int) -> float:
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    out = CACHE / "sae_lens_out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=576, d_sae=D_SAE, k=K, normalize_activations="expected_average_only_in"),
        model_name=str(model_dir),
        model_class_name="AutoModelForCausalLM",
        hook_name=f"model.layers.{LAYER}",
        dataset_path=str(dataset),
        is_dataset_tokenized=False,
        streaming=True,
        context_size=CTX,
        training_tokens=tokens,
        train_batch_size_tokens=BATCH,
        store_batch_size_prompts=32,
        n_batches_in_buffer=BUFFER // (32 * CTX),
        n_batches_for_norm_estimate=4,
        prepend_bos=False,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=str(out),
        verbose=False,
    )
    start = time.perf_counter()
    LanguageModelSAETrainingRunner(cfg).run()
    return time.perf_counter() - start


def activation_generation(model, tok, corpus, batches: int = 6) -> tuple[float, float]:
    """Seconds for ``batches`` batches: steerkit's block_activations, and a plain forward of blocks 0..LAYER."""
    data = [b for _, b in zip(range(batches), corpus.batches(tok, CTX, 32), strict=False)]
    inner = model.model
    full = inner.layers

    def ours():
        for b in data:
            block_activations(model, b, [LAYER])

    def plain():
        inner.layers = nn.ModuleList(full[: LAYER + 1])
        try:
            with torch.no_grad():
                for b in data:
                    inner(input_ids=b, use_cache=False)
        finally:
            inner.layers = full

    best = {"ours": float("inf"), "plain": float("inf")}
    for _ in range(3):
        for name, fn in (("plain", plain), ("ours", ours)):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best["ours"], best["plain"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131_072)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    corpus = sk.load_corpus("default")
    model, tok = sk.load_model("smollm2-135m-instruct")
    dataset = corpus_as_dataset(corpus)
    ours = run_steerkit(model, tok, corpus, args.tokens)
    theirs = run_sae_lens(sk.embedded_checkpoint(), dataset, args.tokens)
    gen, plain = activation_generation(model, tok, corpus)
    n = 6 * 32 * CTX
    lines = [
        f"SAE training, {args.tokens:,} tokens, TopK k={K}, d_sae={D_SAE}, block {LAYER}, float32, this machine:",
        f"  steerkit train_sae      {ours:7.1f} s  {args.tokens / ours:7.0f} tokens/s",
        f"  sae-lens runner         {theirs:7.1f} s  {args.tokens / theirs:7.0f} tokens/s",
        f"  ratio (steerkit / sae-lens throughput): {theirs / ours:.2f}x   (goal >= 1.0)",
        f"Activation generation, {n:,} tokens, best of 3:",
        f"  steerkit block_activations {n / gen:7.0f} tokens/s",
        f"  plain forward of blocks 0..{LAYER} {n / plain:7.0f} tokens/s",
        f"  ratio: {plain / gen:.2f}x a plain truncated forward   (goal >= 0.9)",
        "Reproduce: .venv/bin/python bench/sae_train.py",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
