"""mergekit configs side by side: the same YAML through mergekit 0.1.5 and through `steerkit merge --config`.

Inputs are bench/merge.py's three bf16 copies of the embedded model (base, A, B: base plus seeded noise).
Each config computes in float32 and writes bfloat16. Deterministic methods (task_arithmetic, ties, linear)
are compared tensor by tensor: how many output elements differ, and how many by more than one bf16 step.
DARE draws random masks, so its outputs are compared by their statistics: the fraction of entries that
moved from the base, and the L1 norm of the merged delta.

Run: .venv/bin/python bench/merge_configs.py   (mergekit comes from `make bench-env`)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from merge import CACHE, MERGEKIT, prepare  # noqa: E402  (bench/ is on sys.path when run as a script)

from steerkit._io import write_text  # noqa: E402
from steerkit.weights import CheckpointReader  # noqa: E402
from steerkit.weights.mergekit import merge_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "artifacts" / "mergekit_configs"


def configs(paths: dict[str, Path]) -> dict[str, dict]:
    def two(method, a: dict, b: dict, shared=None):
        config = {
            "merge_method": method,
            "base_model": str(paths["base"]),
            "models": [{"model": str(paths["a"]), "parameters": a}, {"model": str(paths["b"]), "parameters": b}],
            "dtype": "float32",
            "out_dtype": "bfloat16",
        }
        return {**config, "parameters": shared} if shared else config

    linear = {
        "merge_method": "linear",
        "models": [{"model": str(paths[k]), "parameters": {"weight": w}} for k, w in (("a", 3.0), ("b", 1.0))],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    return {
        "task_arithmetic": two("task_arithmetic", {"weight": 1.0}, {"weight": -0.5}),
        "ties": two("ties", {"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.3}),
        "dare_ties": two("dare_ties", {"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}),
        "dare_linear": two("dare_linear", {"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}),
        "linear": linear,
    }


def compare(ours: Path, theirs: Path, config: dict) -> tuple[int, int, int, int]:
    """(elements, elements that differ, more than one bf16 step apart, differing entries that are not tied at a
    TIES trimming threshold), over every tensor."""
    a, b = CheckpointReader(ours), CheckpointReader(theirs)
    if set(a) != set(b):
        raise RuntimeError(f"different tensors: {sorted(set(a) ^ set(b))[:5]}")
    trims = []
    if config["merge_method"] == "ties":
        base = CheckpointReader(config["base_model"])
        trims = [(CheckpointReader(m["model"]), m["parameters"]["density"]) for m in config["models"]]
    total = differ = far = untied = 0
    for name in a:
        x, y = a[name].float(), b[name].float()
        total += x.numel()
        moved = x != y
        differ += int(moved.sum())
        step = y.abs() * 2**-7 + 1e-30  # one bf16 step (8 significant bits)
        far += int(((x - y).abs() > step).sum())
        if trims and moved.any():  # entries whose |delta| equals the k-th largest: mergekit picks among them
            tied = torch.zeros_like(moved)
            for reader, density in trims:
                d = (reader[name].float() - base[name].float()).abs()
                tied |= d == d.flatten().topk(max(1, int(density * d.numel()))).values[-1]
            moved &= ~tied
        untied += int(moved.sum())
    return total, differ, far, untied


def stats(out: Path, base: Path) -> tuple[float, float]:
    """(fraction of entries that moved from the base, L1 norm of the merged delta), over every tensor."""
    o, r = CheckpointReader(out), CheckpointReader(base)
    moved = total = 0
    l1 = 0.0
    for name in r:
        d = o[name].float() - r[name].float()
        moved += int((d != 0).sum())
        total += d.numel()
        l1 += float(d.abs().sum())
    return moved / total, l1


def main() -> None:
    if not MERGEKIT.exists():
        raise SystemExit("mergekit is not installed: run `make bench-env` first")
    paths = prepare("100MB")
    lines = ["method            steerkit s  mergekit s  comparison"]
    for name, config in configs(paths).items():
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            tmp = Path(tmp)
            (tmp / "config.yml").write_text(yaml.safe_dump(config))
            start = time.perf_counter()
            merge_config(config, tmp / "steerkit", progress=False)
            ours = time.perf_counter() - start
            start = time.perf_counter()
            cmd = [str(MERGEKIT), str(tmp / "config.yml"), str(tmp / "mergekit"), "--out-shard-size", "100M"]
            subprocess.run(cmd, check=True, capture_output=True)
            theirs = time.perf_counter() - start
            if name.startswith("dare"):
                (fa, la), (fb, lb) = stats(tmp / "steerkit", paths["base"]), stats(tmp / "mergekit", paths["base"])
                note = (
                    f"moved entries {fa:.4f} vs {fb:.4f}; L1 of the merged delta {la:.1f} vs {lb:.1f} ({la / lb:.4f}x)"
                )
            else:
                total, differ, far, untied = compare(tmp / "steerkit", tmp / "mergekit", config)
                note = f"{differ:,} of {total:,} differ ({differ / total:.2e}), {far:,} by > 1 bf16 step"
                if config["merge_method"] == "ties":
                    note += f"; {untied:,} of them not tied at a trim threshold"
        lines.append(f"{name:<16}{ours:>11.1f}{theirs:>12.1f}  {note}")
        print(lines[-1], flush=True)
    lines += [
        "",
        "inputs: 3-shard bf16 copies of the embedded model (bench/merge.py); dtype float32, out_dtype bfloat16",
        "reproduce: .venv/bin/python bench/merge_configs.py   (after make bench-env)",
    ]
    write_text("\n".join(lines) + "\n", OUT / "report.txt", force=True)
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    sys.exit(main())
