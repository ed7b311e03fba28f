"""Steering's cost inside vLLM: 32 requests x 32 tokens, unsteered vs 4 vectors mixed through the plugin.

Both workloads run on one engine (vLLM CPU build, the embedded model, float32, eager), rounds alternated, prefix
caching off so that every round computes its prompts. Run in the vLLM environment::

    make vllm-env && .venv-vllm/bin/python bench/vllm.py [--rounds 3]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def vector_folder() -> str:
    """Four vectors: the committed sentiment vector and three seeded random directions of its norms."""
    from steerkit import SteeringVector

    folder = tempfile.mkdtemp(prefix="steerkit-vllm-bench-")
    sentiment = SteeringVector.load(ROOT / "artifacts" / "sentiment.safetensors").select([8, 12])
    sentiment.save(Path(folder) / "sentiment.safetensors")
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        dirs = {layer: torch.randn(sentiment.d_model, generator=g) for layer in sentiment.layers}
        dirs = {layer: v * sentiment[layer].norm() / v.norm() for layer, v in dirs.items()}
        SteeringVector(dirs, metadata={"method": "random"}).save(Path(folder) / f"random{i}.safetensors")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ["STEERKIT_VECTORS"] = vector_folder()  # before vLLM loads its plugins (inherited by its processes)
    from vllm import LLM, SamplingParams

    from steerkit.models import embedded_checkpoint

    llm = LLM(model=str(embedded_checkpoint()), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.25, enable_prefix_caching=False)  # fmt: skip
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Tell me fact number {i} about the sea."}],
                                       tokenize=False, add_generation_prompt=True) for i in range(32)]  # fmt: skip
    names = ["sentiment", "random0", "random1", "random2"]

    def params(i: int | None) -> SamplingParams:
        extra = None if i is None else {"steering": [{"vector": names[i % 4], "alpha": 0.5, "layers": [8, 12]}]}
        return SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, extra_args=extra)

    workloads = {"unsteered": [params(None)] * 32, "4 vectors mixed": [params(i) for i in range(32)]}
    llm.generate(prompts[:4], workloads["unsteered"][:4], use_tqdm=False)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(args.rounds):
        for name, sampling in workloads.items():
            start = time.perf_counter()
            outs = llm.generate(prompts, sampling, use_tqdm=False)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rates[name].append(tokens / (time.perf_counter() - start))
    print("| workload | tok/s, median (rounds) |\n| --- | --- |")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.1f} ({', '.join(f'{x:.1f}' for x in r)}) |")
    ratios = [s / u for s, u in zip(rates["4 vectors mixed"], rates["unsteered"], strict=True)]
    print(f"steered / unsteered: {statistics.median(ratios):.2f}x (rounds {min(ratios):.2f} - {max(ratios):.2f})")
    print("reproduce: make vllm-env && .venv-vllm/bin/python bench/vllm.py")


if __name__ == "__main__":  # vLLM spawns its engine process
    main()
