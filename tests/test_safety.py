"""Nothing lost, nothing executed: each promise of the Safety section, probed so that a regression fails.

Outputs never replace inputs or what the call did not create; loading never unpickles; names read from files
stay in their folder; user numbers that overflow are refused with the value named; steering is context-local.
"""

import asyncio
import copy
import json
import pickle
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import steerkit as sk
from steerkit import cli, hooks
from steerkit.weights import CheckpointReader, CheckpointWriter
from tests.conftest import make_tiny
from tests.test_weights import _perturbed, _save

ROOT = Path(__file__).resolve().parents[1]


def _main(argv, capsys) -> tuple[int, str]:
    """Run the CLI's entry point; (exit code, stderr)."""
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return info.value.code, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def vec_file(tmp_path):
    return sk.SteeringVector({1: torch.ones(32), 2: -torch.ones(32)}).save(tmp_path / "v.safetensors")


@pytest.fixture
def work(tmp_path, tok):
    """work/base, work/tv (a task vector of two perturbed copies) of a tiny llama."""
    folder = tmp_path / "work"
    base = _save(make_tiny("llama", len(tok)), folder / "base")
    a = _perturbed("llama", len(tok), 1, tmp=tmp_path, name="a")
    b = _perturbed("llama", len(tok), 2, tmp=tmp_path, name="b")
    sk.TaskVector.between(a, b).save(folder / "tv")
    return folder, base, folder / "tv"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model: validation must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr(sk, "load_model", refuse)


# --- 1. outputs -------------------------------------------------------------------------------------------


def test_export_into_an_existing_directory_keeps_it(tmp_path, vec_file, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "run1.csv").write_text("data")
    for extra in ([], ["--force"]):
        code, err = _main(["export-gguf", vec_file, "-o", results, *extra], capsys)
        assert code == 2 and "is a directory; the output is a file" in _one_error_line(err)
    assert (results / "run1.csv").read_text() == "data"


@pytest.mark.parametrize("command", ["export-gguf", "import-gguf"])
def test_a_command_never_overwrites_its_own_input(tmp_path, vec_file, capsys, command):
    source = vec_file
    if command == "import-gguf":
        source = sk.SteeringVector.load(vec_file).to_gguf(tmp_path / "v.gguf")
    before = source.read_bytes()
    code, err = _main([command, source, "-o", source, "--force"], capsys)
    assert code == 2 and "is an input of this command" in _one_error_line(err)
    assert source.read_bytes() == before


def test_merge_never_replaces_the_task_vector_or_the_folder_holding_its_inputs(work, capsys):
    folder, base, tv = work
    before = _snapshot(folder)
    for out in (tv, folder, base):
        code, err = _main(["merge", base, "--add", f"{tv}:0.5", "-o", out, "--force"], capsys)
        assert code == 2 and "an input of this command" in _one_error_line(err)
    assert _snapshot(folder) == before


def test_library_writers_refuse_an_existing_output_without_force(tmp_path, vec_file, work):
    from steerkit import plots
    from steerkit.evals import write_csv
    from steerkit.evals.tasks import load_task, save_task

    _, base, tv = work
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    vec = sk.SteeringVector.load(vec_file)
    import matplotlib.pyplot as plt

    writers = {
        "save": lambda: vec.save(taken),
        "to_gguf": lambda: vec.to_gguf(taken),
        "write_csv": lambda: write_csv([{"a": 1}], taken),
        "save_figure": lambda: plots.save_figure(plt.figure(), taken),
        "save_task": lambda: save_task(load_task("arithmetic", n=2), taken),
    }
    for name, write in writers.items():
        with pytest.raises(FileExistsError, match="already exists"):
            write()
        assert taken.read_text() == "mine", name
    plt.close("all")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for write in (
        lambda: sk.merge(base, [(tv, 1.0)], out),
        lambda: sk.TaskVector.load(tv).save(out),
        lambda: sk.bake(base, vec, 1.0, out),
    ):
        with pytest.raises(FileExistsError, match="already exists"):
            write()
    assert _snapshot(out) == {"notes.txt": b"mine"}


def test_train_sae_refuses_an_existing_output_before_training(tmp_path, tok, default_corpus, monkeypatch):
    from steerkit.sae import train as train_module

    out = tmp_path / "sae"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(train_module, "block_activations", lambda *a: pytest.fail("training started"))
    with pytest.raises(FileExistsError, match="already exists"):
        sk.train_sae(make_tiny("llama", len(tok)), tok, default_corpus, 1, d_sae=64, k=4, tokens=1024, out=out)
    assert _snapshot(out) == {"keep.txt": b"mine"}


def test_force_keeps_the_old_output_until_the_new_one_is_complete(work, tmp_path, monkeypatch):
    import importlib

    merge_module = importlib.import_module("steerkit.weights.merge")
    _, base, tv = work
    out = sk.merge(base, [(tv, 1.0)], tmp_path / "merged")
    before = _snapshot(out)
    calls = {"n": 0}
    real = merge_module.combine

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_module, "combine", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        sk.merge(base, [(tv, 0.5)], out, force=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


_SLOW_MERGE = """
import importlib, sys, time
from steerkit import cli

merge_module = importlib.import_module("steerkit.weights.merge")  # the module, not the re-exported function

real = merge_module.combine
def slow(*args, **kwargs):
    print("merging", flush=True)
    time.sleep(60)
merge_module.combine = slow
cli.main(sys.argv[1:])
"""


def test_sigterm_mid_merge_leaves_no_temporary(work, tmp_path):
    _, base, tv = work
    out = tmp_path / "merged"
    cmd = [sys.executable, "-c", _SLOW_MERGE, "merge", str(base), "--add", f"{tv}:1", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.readline().strip() == b"merging", proc.communicate()[1].decode()[-2000:]
    assert any(".merged.steerkit-tmp-" in p.name for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "terminated" in proc.stderr.read().decode()
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "steerkit-tmp" in p.name]


# --- 2. loading runs no code ------------------------------------------------------------------------------


def test_the_library_never_unpickles_nor_trusts_remote_code():
    pattern = re.compile(r"weights_only\s*=\s*False|\bimport pickle\b|pickle\.loads?\(|trust_remote_code\s*=\s*True")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "steerkit").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_sae_checkpoints_are_safetensors_and_json_and_resume_runs_no_pickle(tmp_path, tok, default_corpus):
    from tests.test_sae import SMALL, _Failing

    model = make_tiny("llama", len(tok))
    out, ckpt = tmp_path / "run", tmp_path / "run.ckpt"
    settings = {**SMALL, "tokens": 8192, "checkpoint_every": 2048}
    with pytest.raises(RuntimeError, match="simulated crash"):
        sk.train_sae(model, tok, _Failing(default_corpus, after=200), 1, out=out, **settings)
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}
    marker = tmp_path / "marker"
    (ckpt / "trainer_1.pt").write_bytes(pickle.dumps(_Payload(marker)))  # a crafted, old-style checkpoint
    sae = sk.train_sae(model, tok, default_corpus, 1, out=out, resume=True, **settings)
    assert not marker.exists() and sae.cfg.metadata.steerkit["tokens"] == 8192


def test_resume_restores_the_optimizer_state(tmp_path, tok, default_corpus):
    from steerkit.sae.train import _load_checkpoint, _new_run, _save_checkpoint

    runs = {1: _new_run("topk", 1, 32, 64, {"k": 4}, 1e-3, {})}
    x = torch.randn(64, 32)
    runs[1].scale = 1.0
    for step in range(3):
        runs[1].step(x, step, 10, 1e-3, 10_000)
    generator = torch.Generator().manual_seed(3)
    _save_checkpoint(tmp_path / "c", runs, {"step": 3, "config": {}}, [generator.get_state()])
    fresh = {1: _new_run("topk", 1, 32, 64, {"k": 4}, 1e-3, {})}
    other = torch.Generator().manual_seed(99)
    _load_checkpoint(tmp_path / "c", fresh, {}, other)
    old, new = runs[1].optimizer.state_dict()["state"], fresh[1].optimizer.state_dict()["state"]
    assert old.keys() == new.keys() and old
    for i in old:
        for key in old[i]:
            assert torch.equal(old[i][key], new[i][key])
    assert torch.equal(generator.get_state(), other.get_state())
    assert torch.equal(fresh[1].since_fired, runs[1].since_fired)


def test_pickled_weights_are_refused(tmp_path, tok):
    model = make_tiny("llama", len(tok))
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # an old-style pickled checkpoint
    with pytest.raises(ValueError, match="safetensors weights only"):
        sk.load_model(tmp_path / "bin")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="safetensors only"):
        sk.attach_adapter(model, adapter)


# --- 3. paths read from files stay inside their folder -----------------------------------------------------


def _point_index_at(ckpt: Path, target: str) -> None:
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = target
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_an_index_cannot_send_reads_outside_the_checkpoint(work, tmp_path, capsys, how):
    folder, base, _ = work
    other = _save(make_tiny("llama", 64, seed=3), tmp_path / "elsewhere", shard="10MB")
    outside = other / "model.safetensors"
    if how == "absolute":
        _point_index_at(base, str(outside))
    elif how == "dotdot":
        _point_index_at(base, "../../elsewhere/model.safetensors")
    else:
        (base / "evil.safetensors").symlink_to(outside)
        _point_index_at(base, "evil.safetensors")
    with pytest.raises(ValueError, match="not a plain name inside|leads outside"):
        CheckpointReader(base)
    with pytest.raises(ValueError, match="not a plain name inside|leads outside"):
        sk.load_model(base)
    code, err = _main(["diff", base, base], capsys)
    assert code == 2 and re.search("not a plain name inside|leads outside", _one_error_line(err))


def test_side_files_leading_outside_are_not_copied(work, tmp_path):
    _, base, tv = work
    secret = tmp_path / "secret.txt"
    secret.write_text("api key")
    (base / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ValueError, match="tokenizer.json.*leads outside"):
        sk.merge(base, [(tv, 1.0)], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_sae_files_leading_outside_are_refused(tmp_path):
    sae_dir = tmp_path / "sae"
    sae_dir.mkdir()
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 4, "d_sae": 8}))
    (sae_dir / "cfg.json").symlink_to(tmp_path / "cfg.json")
    save_file({"W_enc": torch.zeros(4, 8)}, str(sae_dir / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="leads outside"):
        sk.load_sae(sae_dir)


# --- 4. numbers --------------------------------------------------------------------------------------------


def test_an_alpha_that_overflows_is_refused_before_any_forward(tok):
    model = make_tiny("llama", len(tok))
    vec = sk.SteeringVector({1: torch.ones(32)})
    with pytest.raises(ValueError, match=r"alpha=1e\+39 .* not finite in float32"):
        with sk.steer(model, vec, alpha=1e39):
            pytest.fail("entered")
    with pytest.raises(ValueError, match="not finite in float32"):
        sk.generate(model, tok, ["hi"], vector=vec, alpha=1e39, max_new_tokens=2)
    half = make_tiny("llama", len(tok)).to(torch.float16)
    with pytest.raises(ValueError, match="not finite in float16"):
        with sk.steer(half, vec, alpha=1e5):  # 1e5 > 65504, fine in float32
            pass
    with pytest.raises(ValueError, match="not finite in float16"):
        with sk.steer(half, vec, alpha=1e5, mode="clamp"):  # the clamp target itself
            pass
    assert hooks.active_count() == 0


def test_bake_refuses_an_overflowing_bias_and_writes_nothing(work, tmp_path, capsys):
    _, base, _ = work
    vec = sk.SteeringVector({1: torch.ones(32)})
    with pytest.raises(ValueError, match="not finite in float32"):
        sk.bake(base, vec, 1e39, tmp_path / "baked")
    path = vec.save(tmp_path / "v.safetensors")
    code, err = _main(["bake", base, "-v", path, "--alpha", "1e39", "-o", tmp_path / "baked"], capsys)
    assert code == 2 and "not finite" in _one_error_line(err)
    assert not (tmp_path / "baked").exists()


def test_layer_specs_are_parsed_once_and_reversed_or_empty_ranges_fail(work):
    from steerkit.arch import layer_list, parse_layer_values, parse_layers

    assert parse_layers("1,3-4", 6) == [1, 3, 4] and parse_layer_values("0-1:0.5,3:2", 6) == {0: 0.5, 1: 0.5, 3: 2.0}
    for spec in ("5-3", "", "1,,2", "3-", "1,1"):
        with pytest.raises(ValueError):
            parse_layers(spec, 6)
    for spec in ("5-3:0", "1:nan", "1", "0-1:1,1:2"):
        with pytest.raises(ValueError):
            parse_layer_values(spec, 6)
    with pytest.raises(ValueError, match="is empty"):
        layer_list([], 6)
    _, base, tv = work
    for scales in ("2-1:0", {99: 1.0}):
        with pytest.raises(ValueError):
            sk.merge(base, [(tv, 1.0)], base.parent / "x", alpha_by_layer=scales)
    with pytest.raises(ValueError, match="is empty"):
        with sk.steer(make_tiny("llama", 64), sk.SteeringVector({1: torch.ones(32)}), layers=[]):
            pass


def test_cli_layer_specs_fail_before_the_model_loads(tmp_path, vec_file, work, capsys, no_model_load):
    _, base, tv = work
    code, err = _main(["generate", "-v", vec_file, "-p", "hi", "--layers", "5-3"], capsys)
    assert code == 2 and "runs backwards" in _one_error_line(err)
    code, err = _main(["bake", base, "-v", vec_file, "--layers", "2-1", "-o", tmp_path / "baked"], capsys)
    assert code == 2 and "runs backwards" in _one_error_line(err)
    args = ["merge", base, "--add", f"{tv}:1", "-o", tmp_path / "merged", "--alpha-by-layer", "2-1:0"]
    code, err = _main(args, capsys)
    assert code == 2 and "runs backwards" in _one_error_line(err)
    assert not (tmp_path / "baked").exists() and not (tmp_path / "merged").exists()


def test_vector_files_must_hold_1d_float_layers(tmp_path, capsys):
    cases = {
        "matrix": ({"layers.3": torch.ones(4, 8)}, {}, "1-D floating-point"),
        "ints": ({"layers.3": torch.ones(8, dtype=torch.int64)}, {}, "1-D floating-point"),
        "badkey": ({"layers.x": torch.ones(8)}, {}, "'layers.x' is not named"),
        "model": ({"layers.3": torch.ones(8)}, {"model": json.dumps("llama")}, "metadata 'model'"),
    }
    for name, (tensors, meta, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            sk.SteeringVector.load(path)
        code, err = _main(["export-gguf", path, "-o", tmp_path / f"{name}.gguf"], capsys)
        line = _one_error_line(err)
        assert code == 2 and str(path) in line and message in line


def test_a_gguf_whose_layer_count_disagrees_is_refused(tmp_path):
    import gguf

    path = tmp_path / "liar.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 5)
    writer.add_tensor("direction.1", torch.ones(8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"liar\.gguf: controlvector.layer_count is 5 but the file holds 1"):
        sk.SteeringVector.from_gguf(path)


def test_diff_refuses_nan_deltas_and_writes_nothing(tmp_path, tok, capsys):
    a = _perturbed("llama", len(tok), 1, tmp=tmp_path, name="a")
    model = copy.deepcopy(make_tiny("llama", len(tok)))  # the cached tiny model stays clean
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    b = _save(model, tmp_path / "b")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight: the delta holds NaN"):
        sk.TaskVector.between(a, b).save(tmp_path / "tv")
    code, err = _main(["diff", a, b, "-o", tmp_path / "tv"], capsys)
    assert code == 2 and "NaN" in _one_error_line(err)
    assert not (tmp_path / "tv").exists()


def test_an_sae_with_a_nan_max_norm_is_refused(tmp_path):
    from tests.test_sae import _zero_sae

    sae = _zero_sae()
    sae.cfg.metadata.steerkit = {"max_norm": float("nan")}
    sae.save_model(tmp_path / "sae")
    with pytest.raises(ValueError, match=r"max_norm in .*cfg\.json.*expected a positive number"):
        sk.load_sae(tmp_path / "sae")
    with pytest.raises(ValueError, match="max_norm=nan"):
        with sk.splice(make_tiny("llama", 64), _zero_sae(), 1, max_norm=float("nan")):
            pass


def test_sae_training_and_tuning_stop_on_a_non_finite_loss(tmp_path, tok, default_corpus):
    from tests.test_sae import SMALL, _zero_sae

    model = make_tiny("llama", len(tok))
    with pytest.raises(ValueError, match="training diverged"):
        sk.train_sae(model, tok, default_corpus, 1, out=tmp_path / "sae", **{**SMALL, "lr": 1e30})
    with pytest.raises(ValueError, match="training diverged"):
        sk.sae_tune(model, tok, _zero_sae(), 1, ["some text to tune on"] * 8, lr=1e30, epochs=3, batch_size=2,
                    out=tmp_path / "adapter", progress=False)  # fmt: skip
    assert not (tmp_path / "sae").exists() and not (tmp_path / "adapter").exists()


# --- 5. hooks: context-local, removed on exit ------------------------------------------------------------------


@pytest.fixture
def tiny_and_ids(tok):
    model = make_tiny("llama", len(tok))
    ids = tok(["The cat sat on the mat."], return_tensors="pt")["input_ids"]
    return model, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_steer_held_in_one_thread_leaves_other_threads_alone(tiny_and_ids):
    model, ids = tiny_and_ids
    plain = _logits(model, ids)
    vec = sk.SteeringVector({1: torch.randn(32)})
    entered, release, seen = threading.Event(), threading.Event(), {}

    def hold():
        with sk.steer(model, vec, alpha=4.0):
            seen["steered"] = _logits(model, ids)
            with sk.Recorder(model, [0], stop=True):  # a stopping recorder here must not stop other threads
                entered.set()
                release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(30)
    try:
        other = _logits(model, ids)
    finally:
        release.set()
        thread.join()
    assert torch.equal(other, plain) and not torch.allclose(seen["steered"], plain)
    assert hooks.active_count() == 0


def test_two_threads_keep_their_own_vectors(tiny_and_ids):
    model, ids = tiny_and_ids
    vectors = [sk.SteeringVector({1: torch.randn(32)}), sk.SteeringVector({1: torch.randn(32), 2: torch.randn(32)})]
    expected = []
    for vec in vectors:
        with sk.steer(model, vec, alpha=2.0):
            expected.append(_logits(model, ids))
    barrier, results = threading.Barrier(2), {0: [], 1: []}

    def work(i):
        with sk.steer(model, vectors[i], alpha=2.0):
            barrier.wait(30)
            for _ in range(20):
                results[i].append(_logits(model, ids))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert all(torch.equal(r, expected[i]) for r in results[i])
    assert not torch.allclose(expected[0], expected[1])


def test_asyncio_tasks_keep_their_own_vectors(tiny_and_ids):
    model, ids = tiny_and_ids
    vectors = [sk.SteeringVector({1: torch.randn(32)}), sk.SteeringVector({2: torch.randn(32)})]
    expected = []
    for vec in vectors:
        with sk.steer(model, vec, alpha=2.0):
            expected.append(_logits(model, ids))

    async def task(vec):
        with sk.steer(model, vec, alpha=2.0):
            await asyncio.sleep(0)  # the other task enters its own steer here
            first = _logits(model, ids)
            await asyncio.sleep(0)
            return first, _logits(model, ids)

    async def both():
        return await asyncio.gather(*(task(v) for v in vectors))

    for i, pair in enumerate(asyncio.run(both())):
        assert all(torch.equal(r, expected[i]) for r in pair)


def test_hooks_are_removed_on_exit_and_on_errors(tiny_and_ids):
    model, ids = tiny_and_ids
    plain = _logits(model, ids)
    vec = sk.SteeringVector({0: torch.randn(32), 2: torch.randn(32)})
    with pytest.raises(RuntimeError, match="inside"):
        with sk.steer(model, vec, alpha=1.0), sk.Recorder(model, [1]):
            raise RuntimeError("inside")
    assert hooks.active_count() == 0
    ours = (hooks._dispatch, hooks._track)
    assert not [
        m for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()) if h in ours
    ]
    assert torch.equal(_logits(model, ids), plain)


def test_hook_users_share_the_hook_module():
    """steer, splice, the recorder and SAE training read block and MLP outputs through hooks.py alone (no
    borrowing from each other)."""
    for module in ("steer", "capture", "sae/splice", "sae/train"):
        source = (ROOT / "steerkit" / f"{module}.py").read_text()
        assert "register_forward_hook" not in source and "register_forward_pre_hook" not in source
        assert "from steerkit.hooks import" in source
    assert "from steerkit.steer import" not in (ROOT / "steerkit" / "sae" / "splice.py").read_text()
    assert "import steerkit\n" not in (ROOT / "steerkit" / "weights" / "merge.py").read_text()


# --- 6. the CLI: one error line, exit 2; interrupts exit 130 ------------------------------------------------


def test_cli_input_errors_are_one_line_before_the_model_loads(tmp_path, capsys, no_model_load):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    code, err = _main(["capture", "-t", latin, "-o", tmp_path / "a.safetensors"], capsys)
    assert code == 2 and "latin1.txt is not UTF-8" in _one_error_line(err)
    texts = tmp_path / "t.txt"
    texts.write_text("hello\n")
    existing = tmp_path / "taken.safetensors"
    existing.write_text("mine")
    code, err = _main(["capture", "-t", texts, "-o", existing], capsys)
    assert code == 2 and "already exists" in _one_error_line(err) and existing.read_text() == "mine"
    link = tmp_path / "link.safetensors"
    link.symlink_to(existing)
    code, err = _main(["capture", "-t", texts, "-o", link], capsys)
    assert code == 2 and "a symlink to" in _one_error_line(err)


def test_cli_output_and_checkpoint_errors_are_one_line(work, tmp_path, capsys):
    _, base, tv = work
    a_file = tmp_path / "merged"
    a_file.write_text("mine")
    code, err = _main(["merge", base, "--add", f"{tv}:1", "-o", a_file, "--force"], capsys)
    assert code == 2 and "is a file; the output is a directory" in _one_error_line(err)
    assert a_file.read_text() == "mine"
    (base / "model.safetensors.index.json").write_text("{broken")
    code, err = _main(["diff", base, base], capsys)
    assert code == 2 and "is not a valid index" in _one_error_line(err)


def test_an_interrupt_prints_one_line_and_exits_130(vec_file, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sk.SteeringVector, "to_gguf", interrupted)
    code, err = _main(["export-gguf", vec_file, "-o", tmp_path / "v.gguf"], capsys)
    assert code == 130 and err.strip().splitlines() == ["interrupted; partial output removed"]


def test_clean_command_removes_a_killed_runs_temporary(tmp_path, capsys):
    dead = 2**22 + 12345
    (tmp_path / f".out.steerkit-tmp-{dead}-abcd1234").mkdir()
    cli.main(["clean", str(tmp_path)])
    assert "removed" in capsys.readouterr().out and list(tmp_path.iterdir()) == []


# --- 7. memory: streaming writer, chunked TIES -----------------------------------------------------------------


def test_the_writer_puts_each_tensor_on_disk_when_it_is_added(tmp_path):
    tensors = {"a": torch.randn(100), "b": torch.randn(10, 10).to(torch.bfloat16), "c": torch.arange(7)}
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    writer = CheckpointWriter(tmp_path / "out", specs, max_shard_size=1 << 30)
    with writer:
        shard = writer.tmp / "model.safetensors"
        size = shard.stat().st_size
        writer.add("b", tensors["b"])  # any order
        _, start, nbytes = writer._places["b"]
        with open(shard, "rb") as handle:
            handle.seek(start)
            assert handle.read(nbytes) == tensors["b"].view(torch.uint8).numpy().tobytes()
        assert shard.stat().st_size == size  # laid out up front: nothing is held back in memory
        with pytest.raises(ValueError, match="planned"):
            writer.add("a", torch.randn(99))
        writer.add("a", tensors["a"])
        writer.add("c", tensors["c"])
    reader = CheckpointReader(tmp_path / "out")
    assert all(torch.equal(reader[name], t) for name, t in tensors.items())
    with pytest.raises(ValueError, match="never written"):
        with CheckpointWriter(tmp_path / "partial", specs) as partial:
            partial.add("a", tensors["a"])
    assert not (tmp_path / "partial").exists()


def test_magnitude_kth_is_exact():
    from steerkit.weights.merge import magnitude_kth

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 17, generator=generator)
    x[::3] = 0.0  # ties at zero
    x[1, :5] = 0.25  # ties elsewhere
    flat = x.abs().flatten()
    for k in (1, 7, 1700, 3000, flat.numel()):
        assert magnitude_kth(lambda rows: x[rows], x.shape, k) == float(flat.kthvalue(k).values)


def test_ties_in_row_chunks_equals_the_whole_tensor_computation(monkeypatch):
    """mergekit's TIES written out on whole tensors, against steerkit's chunked one (13 chunks here)."""
    import importlib

    merge_module = importlib.import_module("steerkit.weights.merge")
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(50, 40, generator=generator)
    deltas = [torch.randn(50, 40, generator=generator) for _ in range(3)]
    deltas[1][::2] = 0.0
    alphas, density = [1.0, -0.5, 2.0], 0.3

    keep = int(density * base.numel())  # mergekit: the int(density · n) largest magnitudes of each delta
    trimmed = [torch.where(d.abs() >= d.abs().flatten().topk(keep).values[-1], d, 0.0) for d in deltas]
    weighted = torch.stack([a * t for a, t in zip(alphas, trimmed, strict=True)])
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(weighted) == majority).float()
    divisor = (torch.tensor(alphas).view(-1, 1, 1) * agree).sum(0)
    expected = base + (weighted * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)

    monkeypatch.setattr(merge_module, "CHUNK", 160)  # 4 rows a chunk
    parts = [merge_module.Part((lambda rows, d=d: d[rows]), a, density) for d, a in zip(deltas, alphas, strict=True)]
    assert torch.equal(merge_module.combine(base, parts, "ties"), expected)


@pytest.mark.slow
def test_embedded_model_generation_is_unsteered_while_another_thread_steers(smollm):
    model, tok = smollm
    vec = sk.SteeringVector({8: torch.randn(576, generator=torch.Generator().manual_seed(0)) * 20})
    plain = sk.generate(model, tok, ["Describe your morning."], max_new_tokens=6)[0]["unsteered"]
    entered, release, seen = threading.Event(), threading.Event(), {}

    def hold():
        with sk.steer(model, vec, alpha=1.0):
            seen["steered"] = sk.generate(model, tok, ["Describe your morning."], max_new_tokens=6)[0]["unsteered"]
            entered.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(60)
    try:
        other = sk.generate(model, tok, ["Describe your morning."], max_new_tokens=6)[0]["unsteered"]
    finally:
        release.set()
        thread.join()
    assert other == plain and seen["steered"] != plain
