"""Crashes that resume: a real ``steerkit train-sae`` process killed with SIGKILL at a random moment after its
first checkpoint, then resumed, ends with an SAE equal bit for bit to an uninterrupted run's; a merge killed
mid-write keeps the old output and leaves a named temporary that ``steerkit clean`` removes."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from steerkit import cli
from tests.conftest import make_tiny
from tests.test_safety import _SLOW_MERGE
from tests.test_weights import _perturbed, _save

ROOT = Path(__file__).resolve().parents[1]
STEPS = 128
TRAIN = ["--layer", "1", "--d-sae", "64", "--k", "8", "--tokens", str(STEPS * 256), "--batch-size", "256", "--ctx-len",
         "64", "--buffer-tokens", "4096", "--checkpoint-every", "1024", "--device", "cpu"]  # fmt: skip


def _steerkit(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "steerkit.cli", "-q", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _step(state: Path) -> int:
    """The step of the run's last checkpoint (0 before the first; the file is replaced atomically)."""
    try:
        return json.loads(state.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


def test_train_sae_killed_at_a_random_step_resumes_to_the_same_sae_bit_for_bit(tmp_path, tok):
    model = tmp_path / "tiny"
    _save(make_tiny("llama", len(tok)), model)
    tok.save_pretrained(model)
    whole = _steerkit("train-sae", "-m", str(model), "-o", str(tmp_path / "whole"), *TRAIN)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-2000:]

    out = tmp_path / "killed"
    run = _steerkit("train-sae", "-m", str(model), "-o", str(out), *TRAIN)
    state = out.with_name("killed.ckpt") / "state.json"
    rng = random.Random()
    target = rng.randrange(8, STEPS * 3 // 4)  # a random step after the first checkpoint (step 4), well before the end
    deadline = time.monotonic() + 300
    while _step(state) < target:
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()[-2000:]
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.05))  # mid-step, or while the next checkpoint is written
    run.send_signal(signal.SIGKILL)
    assert run.wait(timeout=60) == -signal.SIGKILL
    assert not out.exists()

    resumed = _steerkit("train-sae", "-m", str(model), "-o", str(out), *TRAIN, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    expected, got = _weights(tmp_path / "whole"), _weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), (name, target)
    cli.main(["clean", str(tmp_path)])  # a temporary the kill left (if it struck a checkpoint write) goes
    assert not [p for p in tmp_path.iterdir() if "steerkit-tmp" in p.name or "steerkit-old" in p.name]


def test_a_merge_killed_mid_write_keeps_the_old_output_and_clean_removes_its_temporary(tmp_path, tok, capsys):
    base = _save(make_tiny("llama", len(tok)), tmp_path / "base")
    a = _perturbed("llama", len(tok), 1, tmp=tmp_path, name="a")
    b = _perturbed("llama", len(tok), 2, tmp=tmp_path, name="b")
    cli.main(["diff", str(a), str(b), "-o", str(tmp_path / "tv")])
    out = tmp_path / "merged"
    cli.main(["merge", str(base), "--add", f"{tmp_path / 'tv'}:1", "-o", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cmd = [sys.executable, "-c", _SLOW_MERGE, "merge", str(base), "--add", f"{tmp_path / 'tv'}:0.5", "-o", str(out),
           "--force"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.readline().strip() == b"merging", proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old output, untouched
    left = [p for p in tmp_path.iterdir() if ".merged.steerkit-tmp-" in p.name]
    assert len(left) == 1  # named after what it was writing
    capsys.readouterr()
    cli.main(["clean", str(tmp_path)])
    assert f"removed {left[0]}" in capsys.readouterr().out
    assert not left[0].exists() and {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_shuffle_buffer_hands_out_every_row_once_in_an_order_its_generator_fixes():
    from steerkit.sae.train import ShuffleBuffer

    def run(seed: int) -> list[int]:
        buffer = ShuffleBuffer(capacity=48, batch_size=8, generator=torch.Generator().manual_seed(seed))
        out = []
        for start in range(0, 120, 20):  # chunks of 20 rows, ids in the values
            out += [int(v) for batch in buffer.make_room(20) for v in batch[0][:, 0]]
            buffer.insert({0: torch.arange(start, start + 20, dtype=torch.float32).unsqueeze(1).repeat(1, 3)})
        out += [int(v) for batch in buffer.drain() for v in batch[0][:, 0]]
        return out

    first = run(0)
    assert sorted(first) == list(range(120)) and first == run(0) and first != run(1)
    assert first != sorted(first)  # mixed across chunks
