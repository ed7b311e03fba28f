"""steerkit serve under load: per-request vectors must not cost batching.

A real server (``steerkit serve``, a subprocess on 127.0.0.1) with four vectors of the embedded model. Three
workloads of the same 32 prompts, each request streamed with ``ignore_eos`` so every one yields exactly
--new-tokens tokens:

* steered: 32 concurrent requests, 8 on each of the four vectors;
* unsteered: the same 32 concurrent requests without steering (the baseline, same server, same run);
* sequential: the 32 steered requests sent one after another.

Rounds alternate the order of the concurrent workloads. Printed: total tokens/s of each, the ratios
steered/unsteered (target >= 0.9) and steered/sequential (target >= 3) per round with their median,
and time-to-first-token percentiles. Written to artifacts/serve/report.txt.

Run: .venv/bin/python bench/serve.py   (--rounds 5 --new-tokens 32)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
from steering_effect import NEUTRAL_PROMPTS  # noqa: E402  (bench/ is on sys.path when run as a script)

import steerkit as sk  # noqa: E402
from steerkit._io import write_text  # noqa: E402
from steerkit.serve import launch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "serve" / "report.txt"
# the layer and α of each vector: the steering-effect bench's settings (sentiment, concise), layer 10 otherwise
VECTORS = {"sentiment": ([8], 0.5), "concise": ([4], 1.0), "reasoning": ([10], 0.5), "truthful": ([10], 0.5)}


def one(url: str, prompt: str, steering: list | None, tokens: int) -> tuple[float, float, int]:
    """(start, time to first token, completion tokens) of one streamed chat request."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if steering:
        body["steering"] = steering
    start, first, count = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
    return start, first, count


def workload(url: str, jobs: list, tokens: int, concurrent: bool) -> dict:
    """Total tokens/s over the workload's wall time and each request's time to first token."""
    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: one(url, *job, tokens), jobs))
    else:
        results = [one(url, *job, tokens) for job in jobs]
    wall = time.perf_counter() - start
    counts = [r[2] for r in results]
    if counts != [tokens] * len(jobs):
        raise RuntimeError(f"expected {tokens} tokens from every request, got {sorted(set(counts))}")
    return {"tps": sum(counts) / wall, "wall": wall, "ttft": [r[1] for r in results]}


def percentiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return f"p50 {q[49]:.2f} s  p90 {q[89]:.2f} s  p99 {q[98]:.2f} s"


def spread(values: list[float]) -> str:
    """Median over rounds, and every round (a burst of noise on this shared machine hits one round, not all)."""
    return f"median {statistics.median(values):.2f} (rounds {', '.join(f'{v:.2f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, tok = sk.load_model("smollm2-135m-instruct")
        for name, (layers, _) in VECTORS.items():
            sk.extract(model, tok, sk.load_pairs(name), layers=layers).save(folder / f"{name}.safetensors")
        del model
        proc, url = launch(folder, "--device", "cpu", "--max-batch", str(args.requests), "--max-queue", "64")
        try:
            names = list(VECTORS)
            prompts = [NEUTRAL_PROMPTS[i % len(NEUTRAL_PROMPTS)] for i in range(args.requests)]
            steered = [
                (p, [{"vector": names[i % 4], "alpha": VECTORS[names[i % 4]][1]}]) for i, p in enumerate(prompts)
            ]
            plain = [(p, None) for p in prompts]
            workload(url, steered[:4], 4, concurrent=True)  # warm up
            rows = []
            for r in range(args.rounds):
                order = [("steered", steered), ("unsteered", plain)][:: 1 if r % 2 == 0 else -1]
                result = {label: workload(url, jobs, args.new_tokens, concurrent=True) for label, jobs in order}
                result["sequential"] = workload(url, steered, args.new_tokens, concurrent=False)
                rows.append(result)
                print(f"round {r + 1}: " + "  ".join(f"{k} {v['tps']:.1f} tok/s" for k, v in result.items()))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    vs_plain = [row["steered"]["tps"] / row["unsteered"]["tps"] for row in rows]
    vs_seq = [row["steered"]["tps"] / row["sequential"]["tps"] for row in rows]
    lines = [
        f"steerkit serve, embedded model (smollm2-135m-instruct) on CPU ({os.cpu_count()} cores), "
        f"{args.requests} requests x {args.new_tokens} tokens, {args.rounds} rounds",
        "",
        *(
            f"{label:<11} tokens/s {spread([row[label]['tps'] for row in rows]).replace('x (', ' (')}"
            for label in ("steered", "unsteered", "sequential")
        ),  # fmt: skip
        "",
        f"steered / unsteered (concurrent)   {spread(vs_plain)}   target >= 0.9",
        f"steered concurrent / sequential    {spread(vs_seq)}   target >= 3",
        "",
        "time to first token (all rounds):",
        *(
            f"  {label:<11} {percentiles([t for row in rows for t in row[label]['ttft']])}"
            for label in ("steered", "unsteered", "sequential")
        ),  # fmt: skip
        "",
        "reproduce: .venv/bin/python bench/serve.py " + " ".join(sys.argv[1:]),
    ]
    report = "\n".join(lines)
    print("\n" + report)
    write_text(report + "\n", OUT, force=True)


if __name__ == "__main__":
    main()
