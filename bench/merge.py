"""Merge speed and memory: steerkit against mergekit 0.1.5 on the job base + 1.0·(A − B).

base, A and B are 3-shard bfloat16 copies of the embedded model (A and B: base plus seeded noise, as two
fine-tunes of one initialisation), written once under bench/.cache/merge. Each merge runs in its own
process; wall time and peak RSS (ru_maxrss from wait4) are measured per process. Both outputs are compared
with a direct torch computation, (base + A − B in float32) rounded to bfloat16. A second steerkit run with
smaller shards, and runs on synthetic checkpoints of growing size, show how peak RSS follows the largest
tensor, not the shard size or the model. Last, a synthetic bf16 checkpoint of at least 2 GB (generated here,
never committed) is merged with the default 5 GB shards and with 100 MB shards: the writer streams each
tensor to disk, so the two peaks should match (target: default <= 1.5x the 100 MB run).

Run: make bench   (or .venv/bin/python bench/merge.py; mergekit comes from `make bench-env`)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit.weights import CheckpointReader, CheckpointWriter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache" / "merge"
MERGEKIT = ROOT / "bench" / ".venv-mergekit" / "bin" / "mergekit-yaml"


def prepare(shard: str) -> dict[str, Path]:
    """base, A, B: bf16, 3 shards each; A and B differ from base by seeded noise of relative size ~1e-2."""
    paths = {name: CACHE / name for name in ("base", "a", "b")}
    if all((p / "model.safetensors.index.json").is_file() for p in paths.values()):
        return paths
    source = CheckpointReader(sk.embedded_checkpoint())
    specs = {name: (source.shape(name), torch.bfloat16) for name in source}
    for seed, (name, path) in enumerate(paths.items()):
        generator = torch.Generator().manual_seed(seed)
        with CheckpointWriter(path, specs, max_shard_size=shard, source=source.path, force=True) as writer:
            for tensor_name in source:
                t = source[tensor_name]
                if name != "base":
                    t = t + 0.01 * t.std() * torch.randn(t.shape, generator=generator)
                writer.add(tensor_name, t.to(torch.bfloat16))
    return paths


def synthetic(n_tensors: int, shard: str) -> dict[str, Path]:
    """base, A, B of ``n_tensors`` bf16 tensors of 4 MB each (a llama-shaped name per tensor)."""
    root = CACHE / f"synthetic-{n_tensors}"
    paths = {name: root / name for name in ("base", "a", "b")}
    if all((p / "model.safetensors.index.json").is_file() for p in paths.values()):
        return paths
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(n_tensors)]
    specs = {name: ((1024, 2048), torch.bfloat16) for name in names}
    for seed, path in enumerate(paths.values()):
        generator = torch.Generator().manual_seed(seed)
        with CheckpointWriter(path, specs, max_shard_size=shard, force=True) as writer:
            for name in names:
                writer.add(name, torch.randn(1024, 2048, generator=generator).to(torch.bfloat16))
            writer.add_file("config.json", json.dumps({"model_type": "llama", "num_hidden_layers": n_tensors}))
    return paths


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def steerkit_cmd(paths: dict[str, Path], out: Path, shard: str) -> list[str]:
    code = (
        "import steerkit as sk, sys; "
        f"tv = sk.TaskVector.between({str(paths['a'])!r}, {str(paths['b'])!r}); "
        f"sk.merge({str(paths['base'])!r}, [(tv, 1.0)], {str(out)!r}, max_shard_size={shard!r}, force=True, "
        "progress=False)"
    )
    return [sys.executable, "-c", code]


def mergekit_cmd(paths: dict[str, Path], out: Path, shard: str) -> list[str]:
    # mergekit: base_model + sum_i w_i (model_i - base_model); with base_model B and models A, base (w = 1)
    # that is A + base - B = base + (A - B), the same job.
    config = CACHE / "mergekit.yml"
    config.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {paths['b']}\n"
        "models:\n"
        f"  - model: {paths['a']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {paths['base']}\n    parameters: {{weight: 1.0}}\n"
        "parameters: {normalize: false}\n"
        "dtype: float32\nout_dtype: bfloat16\n"
    )
    return [str(MERGEKIT), str(config), str(out), "--out-shard-size", shard.replace("MB", "M")]


def max_error(out: Path, paths: dict[str, Path]) -> tuple[int, int]:
    """(tensors differing from the direct computation, tensors more than one bf16 step off)."""
    readers = {k: CheckpointReader(p) for k, p in paths.items()}
    merged = CheckpointReader(out)
    differ = far = 0
    for name in readers["base"]:
        direct = readers["base"][name].float() + readers["a"][name].float() - readers["b"][name].float()
        expected = direct.to(torch.bfloat16)
        got = merged[name]
        if not torch.equal(got, expected):
            differ += 1
            step = expected.float().abs() * 2**-7 + 1e-30
            far += int(((got.float() - expected.float()).abs() > step).any())
    if set(merged) != set(readers["base"]):
        raise RuntimeError(f"{out} holds other tensors than the base")
    return differ, far


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard", default="100MB", help="shard size of inputs and outputs")
    parser.add_argument("--big-gb", type=float, default=2.0, help="size of the default-shard memory check (0: skip)")
    args = parser.parse_args()
    paths = prepare(args.shard)
    n_shards = len(list(paths["base"].glob("model-*.safetensors")))
    size_mb = sum(f.stat().st_size for f in paths["base"].glob("model-*.safetensors")) / 2**20
    print(f"job: base + 1.0*(A - B), bf16, {size_mb:.0f} MB in {n_shards} shards each, output shards {args.shard}")
    rows = []
    out = CACHE / "out-steerkit"
    wall, rss = run(steerkit_cmd(paths, out, args.shard))
    differ, far = max_error(out, paths)
    rows.append(("steerkit", wall, rss, f"{differ} tensors differ, {far} beyond one bf16 step"))
    small = CACHE / "out-steerkit-small"
    wall_s, rss_s = run(steerkit_cmd(paths, small, "25MB"))
    rows.append(("steerkit, 25MB output shards", wall_s, rss_s, ""))
    if MERGEKIT.exists():
        out_mk = CACHE / "out-mergekit"
        shutil.rmtree(out_mk, ignore_errors=True)
        wall_m, rss_m = run(mergekit_cmd(paths, out_mk, args.shard))
        differ_m, far_m = max_error(out_mk, paths)
        rows.append(
            (
                "mergekit 0.1.5 task_arithmetic",
                wall_m,
                rss_m,
                f"{differ_m} tensors differ, {far_m} beyond one bf16 step",
            )
        )
    print(f"\n{'run':<32}{'wall s':>8}{'peak RSS MB':>13}  output vs direct torch")
    for name, w, r, note in rows:
        print(f"{name:<32}{w:>8.2f}{r:>13.0f}  {note}")
    if MERGEKIT.exists():
        print(
            f"\nsteerkit / mergekit: wall {rows[0][1] / wall_m:.2f}x (target <= 0.8), "
            f"peak RSS {rows[0][2] / rss_m:.2f}x (target <= 0.8)"
        )
    else:
        print("\nmergekit: not measured (build its environment with `make bench-env`)")
    print(f"peak RSS with 25MB vs {args.shard} output shards: {rss_s:.0f} vs {rows[0][2]:.0f} MB")
    print("\nscaling with model size (synthetic bf16 checkpoints of 4 MB tensors, 100MB shards, steerkit):")
    for n in (64, 256):
        syn = synthetic(n, "100MB")
        wall_n, rss_n = run(steerkit_cmd(syn, syn["base"].parent / "out", "100MB"))
        print(f"  {n * 4:>5} MB model: wall {wall_n:6.2f} s, peak RSS {rss_n:5.0f} MB")
    if args.big_gb > 0:
        n = int(args.big_gb * 256)  # 4 MB tensors
        syn = synthetic(n, "100MB")
        size_gb = sum(f.stat().st_size for f in syn["base"].glob("*.safetensors")) / 2**30
        print(f"\ndefault shard size vs 100MB shards, synthetic bf16 checkpoint of {size_gb:.2f} GB:")
        peaks = {}
        for shard in ("5GB", "100MB"):
            out = syn["base"].parent / f"out-{shard}"
            wall_n, peaks[shard] = run(steerkit_cmd(syn, out, shard))
            files = len(list(out.glob("*.safetensors")))
            print(
                f"  output shards {shard:>5}: {files:>3} file(s), wall {wall_n:6.2f} s, peak RSS {peaks[shard]:5.0f} MB"
            )
            shutil.rmtree(out)
        ratio = peaks["5GB"] / peaks["100MB"]
        print(f"  peak RSS ratio 5GB / 100MB shards: {ratio:.2f}x (target <= 1.5x)")
    print("\nreproduce: make bench   (or .venv/bin/python bench/merge.py [--big-gb 2])")


if __name__ == "__main__":
    main()
