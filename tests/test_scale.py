"""Scale: devices and dtypes checked, models dispatched by accelerate, several processes under torchrun."""

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import steerkit as sk
from steerkit import cli
from steerkit.data.corpus import load_corpus
from steerkit.models import check_device
from tests.conftest import make_tiny
from tests.test_sae import SMALL

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "torchrun_worker.py"
TEXTS = ["The cat sat on the mat.", "Hello there", "A longer text about nothing much at all, really."]


def _torchrun(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "STEERKIT_DIST_TIMEOUT": "30", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=environ)


# --- devices and dtypes -----------------------------------------------------------------------------------


def test_devices_that_are_not_here_are_clear_errors(monkeypatch, capsys):
    assert check_device("cpu") == torch.device("cpu") and check_device("auto") == "auto"
    for device, message in (("cuda", "no CUDA device is visible"), ("gpu", "expected cpu, cuda")):
        with pytest.raises(ValueError, match=message):
            check_device(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"only 2 CUDA device\(s\) are visible \(cuda:0..cuda:1\)"):
        check_device("cuda:3")
    monkeypatch.setattr(sk, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "-v", "x.safetensors", "-p", "hi", "--device", "cuda:3", "--dtype", "float32"])
    assert info.value.code == 2 and "only 2 CUDA device(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "-v", "x.safetensors", "-p", "hi", "--device", "cpu", "--dtype", "int8"])
    assert "expected a floating dtype" in capsys.readouterr().err


def test_load_model_takes_device_and_dtype(embedded_dir):
    model, _ = sk.load_model("smollm2-135m-instruct", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"


def test_capture_can_keep_results_where_the_model_runs(smollm):
    model, tok = smollm
    kept = sk.capture(model, tok, TEXTS, [3], device=None)
    moved = sk.capture(model, tok, TEXTS, [3])
    assert kept.dtype == moved.dtype == torch.float32 and torch.equal(kept, moved)


# --- models dispatched by accelerate ----------------------------------------------------------------------------


@pytest.fixture
def dispatched(tok, tmp_path):
    """(tiny llama in one piece, the same model with block 1 offloaded to disk and block 0 to CPU memory)."""
    from accelerate import cpu_offload, dispatch_model

    whole = make_tiny("llama", len(tok))
    parts = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu"}
    parts.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    split = dispatch_model(copy.deepcopy(whole), device_map=parts, offload_dir=tmp_path / "offload")
    cpu_offload(split.model.layers[0], execution_device="cpu")
    assert split.model.layers[0].mlp.up_proj.weight.device.type == "meta"  # really offloaded
    assert split.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    return whole, split


def _close(a, b, rel=1e-5):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return float((a - b).abs().max()) <= rel * max(float(a.abs().max()), 1e-12)


def test_dispatched_models_give_the_same_results(dispatched, tok, default_corpus):
    whole, split = dispatched
    for position in ("last", "all"):
        a, b = (sk.capture(m, tok, TEXTS, [0, 1, 2], position=position) for m in (whole, split))
        assert _close(a[0] if position == "all" else a, b[0] if position == "all" else b)
    ids = tok(TEXTS[:1], return_tensors="pt")["input_ids"]
    with torch.no_grad(), sk.Recorder(whole, [1, 2]) as ra:
        whole(ids)
    with torch.no_grad(), sk.Recorder(split, [1, 2]) as rb:
        split(ids)
    assert _close(ra[1], rb[1]) and _close(ra[2], rb[2])
    vec = sk.SteeringVector({0: torch.randn(32), 1: torch.randn(32)})
    outputs = []
    for model in (whole, split):
        with torch.no_grad(), sk.steer(model, vec, alpha=2.0):
            outputs.append(model(ids).logits)
    assert _close(*outputs)
    pairs = sk.load_pairs("sentiment")[:10]
    va, vb = (sk.extract(m, tok, pairs, layers=[1, 2]) for m in (whole, split))
    assert all(_close(va[layer], vb[layer]) for layer in (1, 2))
    rows = [sk.sweep(m, tok, vec, TEXTS, alphas=[0, 1], layers=[1]) for m in (whole, split)]
    for row_a, row_b in zip(*rows, strict=True):
        assert _close(row_a["kl"], row_b["kl"], 1e-4) and _close(row_a["entropy"], row_b["entropy"])
    sae = sk.train_sae(whole, tok, default_corpus, 1, **{**SMALL, "tokens": 2048})
    metrics = [sk.evaluate_sae(m, tok, sae, 1, default_corpus, tokens=1024, progress=False) for m in (whole, split)]
    for key in ("explained_variance", "ce_loss_spliced", "ce_loss_recovered", "kl_score"):
        assert _close(metrics[0][key], metrics[1][key]), key
    spliced = []
    for model in (whole, split):
        with torch.no_grad(), sk.splice(model, sae, 1):
            spliced.append(model(ids).logits)
    assert _close(*spliced)


# --- several processes --------------------------------------------------------------------------------------


def test_corpus_shards_are_disjoint_and_complete(tok):
    corpus = load_corpus("default")
    take = 60

    def first(shard, skip=0):
        out = []
        for seq in corpus.sequences(tok, 32, "train", skip=skip, shard=shard):
            out.append(tuple(seq.tolist()))
            if len(out) == take // shard[1]:
                return out
        return out

    whole = first((0, 1))
    zero, one = first((0, 2)), first((1, 2))
    assert not set(zero) & set(one) and sorted(zero + one) == sorted(whole)
    assert zero == whole[0::2] and one == whole[1::2]
    assert first((1, 2), skip=5)[0] == whole[5]  # resume: skip counts the whole stream


def test_torchrun_sae_is_data_parallel_and_matches_one_process(tmp_path, tok, default_corpus):
    result = _torchrun(WORKER, "sae", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"sequences_{rank}.json").read_text()) for rank in (0, 1)]
    assert seen[0] and seen[1] and not {tuple(s) for s in seen[0]} & {tuple(s) for s in seen[1]}
    assert [p.name for p in tmp_path.iterdir() if "steerkit-tmp" in p.name] == []
    two = sk.load_sae(tmp_path / "sae")
    from tests.torchrun_worker import SAE

    model = make_tiny("llama", len(tok))
    one = sk.train_sae(model, tok, default_corpus, 1, **SAE)
    ev = [sk.evaluate_sae(model, tok, s, 1, default_corpus, tokens=4096, progress=False)["explained_variance"]
          for s in (one, two)]  # fmt: skip
    assert abs(ev[0] - ev[1]) <= 0.02, ev


def test_torchrun_extract_equals_one_process(tmp_path, smollm):
    result = _torchrun(WORKER, "extract", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model, tok = smollm
    here = sk.extract(model, tok, sk.load_pairs("sentiment")[:30], layers=[4, 10])
    there = sk.SteeringVector.load(tmp_path / "vector.safetensors")
    for layer in (4, 10):
        assert _close(here[layer], there[layer])
    assert there.separation == pytest.approx(here.separation, abs=1e-6)


def test_the_cli_runs_unchanged_under_torchrun(tmp_path, smollm):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS + ["One more line of text.", "And a fifth."]) + "\n")
    out = tmp_path / "acts.safetensors"
    result = _torchrun("-m", "steerkit.cli", "capture", "-t", texts, "-o", out, "--layers", "2,7", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote") == 1  # rank 0 alone prints and writes
    model, tok = smollm
    expected = sk.capture(model, tok, texts.read_text().splitlines(), [2, 7])
    with safe_open(str(out), "pt") as f:
        assert _close(f.get_tensor("activations"), expected)


def test_torchrun_bad_input_is_clear(tmp_path, tok, default_corpus):
    result = _torchrun(WORKER, "bad-batch", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert "does not split evenly over 2 ranks" in (tmp_path / f"error_{rank}.txt").read_text()
    crashed = _torchrun(WORKER, "sae-crash", tmp_path)  # both ranks stop after a checkpoint
    assert crashed.returncode != 0 and "stops on purpose" in crashed.stderr
    state = json.loads((tmp_path / "sae.ckpt" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["consumed"]) == 2 and not (tmp_path / "sae").exists()
    from tests.torchrun_worker import SAE

    with pytest.raises(ValueError, match=r"made by 2 rank\(s\); resume it with the same number"):
        sk.train_sae(make_tiny("llama", len(tok)), tok, default_corpus, 1, out=tmp_path / "sae", resume=True,
                     **{**SAE, "checkpoint_every": 2048})  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(tmp_path):
    """Without torchrun's agent to kill the survivors, rank 0 must time out, say why, and leave nothing."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", STEERKIT_DIST_TIMEOUT="10")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "sae-dies", str(tmp_path)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    start = time.monotonic()
    outputs = [p.communicate(timeout=180) for p in procs]
    assert procs[1].returncode != 0 and "rank 1 stops on purpose" in outputs[1][1]
    assert procs[0].returncode != 0 and "lost the other ranks" in outputs[0][1]
    assert time.monotonic() - start < 120
    assert not (tmp_path / "sae").exists() and not [p for p in tmp_path.iterdir() if "steerkit-tmp" in p.name]


def test_the_prepared_gpu_check_runs_on_the_cpu():
    """scripts/gpu_check.py is what a lent GPU runs; its small mode runs here so it cannot rot."""
    script = ROOT / "scripts" / "gpu_check.py"
    result = subprocess.run([sys.executable, str(script), "--small", "--device", "cpu"], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and " ok " in line]
    checks = {row.split("|")[1].strip() for row in rows}
    assert checks == {"capture", "extract", "steer", "train_sae", "evaluate_sae", "splice", "sae_tune", "bake + reload"}
