"""Steering's cost inside vLLM, and vLLM against steerkit serve: 32 requests x 32 tokens, sent at once, over HTTP.

Servers (the embedded model, float32, 127.0.0.1): vLLM's OpenAI server without the plugin (the baseline) and
with it (eager; with ``--compiled`` also one that compiles the model), and ``steerkit serve --max-batch 32``.
Workloads: all unsteered, and 4 vectors mixed (α 0.5 at layers 8 and 12, request i gets vector i mod 4). Every
round runs every (server, workload) pair once, in turn; the servers not measured sit idle, and the CPU seconds
they use meanwhile are reported. Writes ``artifacts/vllm/throughput.{md,json}``. Run from the project's environment::

    make vllm-env && .venv/bin/python bench/vllm.py [--rounds 3] [--compiled]
"""

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch

from steerkit import SteeringVector
from steerkit.models import chat_prompt, embedded_checkpoint
from steerkit.serve import launch

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
NAMES = ["sentiment", "random0", "random1", "random2"]
PLAIN = "no plugin"
REQUESTS, TOKENS = 32, 32


def vector_folder() -> Path:
    """Four vectors: the committed sentiment vector and three seeded random directions of its norms."""
    folder = Path(tempfile.mkdtemp(prefix="steerkit-vllm-bench-"))
    sentiment = SteeringVector.load(ROOT / "artifacts" / "sentiment.safetensors").select([8, 12])
    sentiment.save(folder / "sentiment.safetensors")
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        dirs = {layer: torch.randn(sentiment.d_model, generator=g) for layer in sentiment.layers}
        dirs = {layer: v * sentiment[layer].norm() / v.norm() for layer, v in dirs.items()}
        SteeringVector(dirs, metadata={"method": "random"}).save(folder / f"random{i}.safetensors")
    return folder


def start_vllm(folder: Path | None, compiled: bool) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server, with the plugin's vector folder unless ``folder`` is None: (process, base URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_checkpoint()),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
           "--served-model-name", "m", "--gpu-memory-utilization", "0.25", "--no-enable-prefix-caching",
           *([] if compiled else ["--enforce-eager"])]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("STEERKIT_VECTORS", None)
    if folder is not None:
        env["STEERKIT_VECTORS"] = str(folder)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 900
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vLLM did not start (exit code {proc.poll()})")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=1):
                return proc, url
        except OSError:
            time.sleep(1)


def body(server: str, prompt: str, i: int, steered: bool) -> dict:
    """One chat request; vLLM takes the steering as a JSON string in ``vllm_xargs``, steerkit serve as a list."""
    out = {"model": "m", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
    if steered:
        steering = [{"vector": NAMES[i % 4], "alpha": 0.5, "layers": [8, 12]}]
        out.update({"vllm_xargs": {"steering": json.dumps(steering)}} if server.startswith("vLLM") else
                   {"steering": steering})  # fmt: skip
    return out


def round_trip(url: str, bodies: list[dict]) -> float:
    """Send every body at once; the completion tokens per second of the whole batch."""
    import httpx

    def post(b: dict) -> int:
        reply = httpx.post(f"{url}/v1/completions", json=b, timeout=600)
        reply.raise_for_status()
        return reply.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        tokens = sum(pool.map(post, bodies))
    assert tokens == len(bodies) * TOKENS, tokens
    return tokens / (time.perf_counter() - start)


def tree_cpu(proc: subprocess.Popen) -> float:
    """CPU seconds used so far by a server and its children (vLLM's engine runs in one)."""
    root = psutil.Process(proc.pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compiled", action="store_true", help="also a vLLM server that compiles the model")
    args = parser.parse_args()
    folder = vector_folder()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_checkpoint())
    prompts = [chat_prompt(tok, f"Tell me fact number {i} about the sea.") for i in range(REQUESTS)]
    servers: dict[str, tuple[subprocess.Popen, str]] = {"vLLM, no plugin (eager)": start_vllm(None, False),
                                                        "vLLM + plugin (eager)": start_vllm(folder, False)}  # fmt: skip
    if args.compiled:
        servers["vLLM + plugin (compiled)"] = start_vllm(folder, True)
    servers["steerkit serve"] = launch(folder, "--device", "cpu", "--max-batch", str(REQUESTS), "--max-queue",
                                       str(REQUESTS), timeout=300)  # fmt: skip
    rates: dict[tuple[str, str], list[float]] = {}
    idle: dict[str, float] = {name: 0.0 for name in servers}
    try:
        for name, (_, url) in servers.items():  # warm-up
            round_trip(url, [body(name, p, i, PLAIN not in name) for i, p in enumerate(prompts[:4])])
        for _ in range(args.rounds):
            for name, (_, url) in servers.items():
                for workload in ("unsteered",) if PLAIN in name else ("unsteered", "4 vectors mixed"):
                    others = {n: tree_cpu(proc) for n, (proc, _) in servers.items() if n != name}
                    bodies = [body(name, p, i, workload != "unsteered") for i, p in enumerate(prompts)]
                    rates.setdefault((name, workload), []).append(round_trip(url, bodies))
                    for n, before in others.items():
                        idle[n] += tree_cpu(servers[n][0]) - before
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    write_report(rates, idle, args)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f} – {max(values):.2f})"


def write_report(rates: dict, idle: dict, args) -> None:
    from steerkit._io import atomic_path

    lines = [f"# vLLM plugin and steerkit serve: {REQUESTS} requests x {TOKENS} tokens, sent at once", "",
             "| server | workload | tok/s, median (min – max over rounds) |", "| --- | --- | --- |"]  # fmt: skip
    for (name, workload), values in rates.items():
        lines.append(f"| {name} | {workload} | {spread(values)} |")
    lines += ["", "| ratio (per round, median (min – max)) | value |", "| --- | --- |"]
    ratios = {}
    baseline = rates[("vLLM, no plugin (eager)", "unsteered")]
    for name in dict.fromkeys(n for n, _ in rates if PLAIN not in n):
        steered = rates[(name, "4 vectors mixed")]
        ratios[f"{name}: steered / unsteered"] = [
            s / u for s, u in zip(steered, rates[(name, "unsteered")], strict=True)
        ]
        if name.startswith("vLLM"):
            for workload in ("unsteered", "4 vectors mixed"):
                ratios[f"{name}, {workload} / vLLM without the plugin"] = [
                    v / b for v, b in zip(rates[(name, workload)], baseline, strict=True)
                ]
            for workload in ("unsteered", "4 vectors mixed"):
                ratios[f"{name} / steerkit serve, {workload}"] = [
                    v / s for v, s in zip(rates[(name, workload)], rates[("steerkit serve", workload)], strict=True)
                ]
    lines += [f"| {k} | {spread(v)} |" for k, v in ratios.items()]
    lines += ["", "CPU seconds the idle servers used while another was measured (all rounds): "
              + ", ".join(f"{n} {s:.1f}" for n, s in idle.items()), "",
              f"{args.rounds} rounds on {os.cpu_count()} cores; reproduce: `make vllm-env && .venv/bin/python "
              f"bench/vllm.py --rounds {args.rounds}{' --compiled' if args.compiled else ''}`"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "artifacts" / "vllm"
    data = {"rates": {f"{n} | {w}": v for (n, w), v in rates.items()}, "ratios": ratios, "idle_cpu_s": idle,
            "rounds": args.rounds}  # fmt: skip
    for name, content in (("throughput.md", text), ("throughput.json", json.dumps(data, indent=2) + "\n")):
        with atomic_path(out / name, force=True) as tmp:
            Path(tmp).write_text(content)


if __name__ == "__main__":
    main()
