"""Checkpoint I/O, task vectors, merge and bake, on tiny checkpoints written to disk and on the embedded model."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import steerkit as sk
from steerkit.checkpoint import parse_size, specs_of
from steerkit.weights import CheckpointReader, CheckpointWriter
from tests.conftest import make_tiny


def _save(model, path, dtype=torch.float32, shard="200KB"):
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=shard)
    return path


def _perturbed(model_type, vocab, seed, scale=0.01, dtype=torch.float32, tmp=None, name=None):
    """A tiny model 'fine-tuned' from the seed-0 base: every weight nudged with seeded noise."""
    import copy

    model = copy.deepcopy(make_tiny(model_type, vocab))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return _save(model, tmp / name, dtype)


@pytest.fixture
def trio(tmp_path, tok):
    """base, A and B checkpoints of one tiny llama, float32 and sharded."""
    base = _save(make_tiny("llama", len(tok)), tmp_path / "base")
    a = _perturbed("llama", len(tok), 1, tmp=tmp_path, name="a")
    b = _perturbed("llama", len(tok), 2, tmp=tmp_path, name="b")
    return base, a, b


def test_reader_is_lazy_and_complete(trio):
    base, _, _ = trio
    reader = CheckpointReader(base)
    assert (base / "model.safetensors.index.json").is_file() and len(reader.weight_files()) > 1
    model = AutoModelForCausalLM.from_pretrained(base)
    state = model.state_dict()
    assert set(reader) == {k for k in state if k != "lm_head.weight"} | ({"lm_head.weight"} & set(reader))
    for name in reader:
        assert torch.equal(reader[name], state[name])
    assert reader.shape("model.embed_tokens.weight") == tuple(state["model.embed_tokens.weight"].shape)


def test_writer_shards_index_and_atomicity(tmp_path):
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(5)}  # 4000 bytes each
    specs = specs_of(tensors)
    with CheckpointWriter(tmp_path / "out", specs, max_shard_size=9000) as w:
        for k, v in tensors.items():
            w.add(k, v)
        w.add_file("README.md", "card")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 20000
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    reader = CheckpointReader(tmp_path / "out")
    assert reader.metadata() == {"format": "pt"} and torch.equal(reader["t3"], tensors["t3"])
    with pytest.raises(FileExistsError, match="already exists"):
        CheckpointWriter(tmp_path / "out", specs)
    with pytest.raises(RuntimeError, match="halfway"):
        with CheckpointWriter(tmp_path / "fail", specs, max_shard_size=5000) as w:
            w.add("t0", tensors["t0"])
            w.add("t1", tensors["t1"])  # the first shards are on disk now
            raise RuntimeError("halfway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_parse_size():
    assert parse_size("100MB") == 100 << 20 and parse_size("2GB") == 2 << 30 and parse_size(512) == 512
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size("big")


def test_task_vector_between_and_stats(trio, tmp_path):
    base, a, b = trio
    tv = sk.TaskVector.between(a, b)
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(tv.deltas[name], ra[name] - rb[name])
    assert tv.metadata["model_type"] == "llama"
    stats = tv.stats()
    assert set(stats["layers"]) == {0, 1, 2, None}
    s = stats["tensors"][name]
    assert s["norm"] == pytest.approx(float((ra[name] - rb[name]).norm()), rel=1e-5)
    assert s["relative"] == pytest.approx(s["norm"] / float(rb[name].norm()), rel=1e-5)
    out = tv.save(tmp_path / "tv")
    loaded = sk.TaskVector.load(out)
    assert loaded.metadata["a"] == str(a) and torch.equal(loaded.deltas[name], tv.deltas[name])
    assert len(loaded.metadata["a_hash"]) == 16 and loaded.metadata["a_hash"] != loaded.metadata["b_hash"]
    assert loaded.stats()["tensors"][name] == pytest.approx(s)
    only_mlp = sk.TaskVector.between(a, b, include=["*.mlp.*"])
    assert all(".mlp." in n for n in only_mlp.deltas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_direct_computation(tmp_path, tok, dtype):
    base = _save(copy.deepcopy(make_tiny("llama", len(tok))), tmp_path / "base", dtype)
    a = _perturbed("llama", len(tok), 1, dtype=dtype, tmp=tmp_path, name="a")
    b = _perturbed("llama", len(tok), 2, dtype=dtype, tmp=tmp_path, name="b")
    tv = sk.TaskVector.between(a, b)
    out = sk.merge(base, [(tv, 0.7)], tmp_path / "merged", max_shard_size="100KB")
    rb, ra, rbase, rout = (CheckpointReader(p) for p in (b, a, base, out))
    assert set(rout) == set(rbase)  # every tensor, no more
    for name in rbase:
        expected = (rbase[name].float() + 0.7 * (ra[name].float() - rb[name].float())).to(dtype)
        assert rout[name].dtype == dtype
        torch.testing.assert_close(rout[name], expected, rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == dtype and model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert "lm_head.weight" not in rout
    assert "0.7" in (out / "README.md").read_text()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / f).is_file() == (base / f).is_file()


def test_random_like_keeps_per_tensor_norms_not_directions(trio, tok):
    _, a, b = trio
    tv = sk.TaskVector.between(a, b)
    null, again, other = tv.random_like(3), tv.random_like(3), tv.random_like(4)
    assert set(null.deltas) == set(tv.deltas)
    for name, delta in tv.deltas.items():
        r = null.deltas[name]
        assert r.shape == delta.shape and float(r.norm()) == pytest.approx(float(delta.norm()), rel=1e-5)
        if r.numel() > 100:  # a Gaussian direction is nearly orthogonal to the learned one
            assert abs(float(torch.nn.functional.cosine_similarity(r.flatten(), delta.flatten(), 0))) < 0.2
        assert torch.equal(r, again.deltas[name]) and not torch.equal(r, other.deltas[name])  # seeded
    model = make_tiny("llama", len(tok))
    before = copy.deepcopy(model.state_dict())
    null.add_to(model, 1.0)  # a null that applies like the vector it stands in for
    name = "model.layers.0.self_attn.q_proj.weight"
    moved = float((model.state_dict()[name] - before[name]).norm())
    assert moved == pytest.approx(float(tv.deltas[name].norm()), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_to_equals_merge_in_memory(trio, tmp_path, tok, dtype):
    _, a, b = trio
    base = _save(copy.deepcopy(make_tiny("llama", len(tok))), tmp_path / "base_in_dtype", dtype)
    tv = sk.TaskVector.between(a, b)
    merged = AutoModelForCausalLM.from_pretrained(sk.merge(base, [(tv, 0.7)], tmp_path / "merged"), dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    assert tv.add_to(model, 0.7) is model
    for name, tensor in merged.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name  # the same arithmetic, tied tensors once
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="alpha=inf"):
        tv.add_to(model, float("inf"))
    with pytest.raises(ValueError, match="has no tensor"):
        tv.add_to(torch.nn.Linear(2, 2))


def test_zero_alpha_is_bit_identical_and_plus_minus_returns(trio, tmp_path):
    base, a, b = trio
    tv = sk.TaskVector.between(a, b)
    zero = sk.merge(base, [(tv, 0.0)], tmp_path / "zero")
    back = sk.merge(base, [(tv, 1.0), (tv, -1.0)], tmp_path / "back")
    plus = sk.merge(base, [(tv, 1.0)], tmp_path / "plus")
    minus = sk.merge(plus, [(tv, -1.0)], tmp_path / "minus")
    rbase = CheckpointReader(base)
    for name in rbase:
        assert torch.equal(CheckpointReader(zero)[name], rbase[name])
        torch.testing.assert_close(CheckpointReader(back)[name], rbase[name], rtol=0, atol=1e-7)
        torch.testing.assert_close(CheckpointReader(minus)[name], rbase[name], rtol=1e-6, atol=1e-7)


def test_ties_dare_and_alpha_by_layer(trio, tmp_path):
    base, a, b = trio
    tv = sk.TaskVector.between(a, b)
    name = "model.layers.1.self_attn.q_proj.weight"
    rbase, delta = CheckpointReader(base), tv.deltas[name]
    ties = CheckpointReader(sk.merge(base, [(tv, 1.0)], tmp_path / "ties", method="ties", density=0.2))
    changed = (ties[name] != rbase[name]).float().mean()
    assert 0.15 < float(changed) < 0.25  # trimmed to the top 20% by magnitude
    kept = ties[name] != rbase[name]
    assert delta[kept].abs().min() >= delta[~kept].abs().max()
    dare = CheckpointReader(sk.merge(base, [(tv, 1.0)], tmp_path / "dare", method="dare", density=0.5))
    diff = dare[name] - rbase[name]
    nz = diff != 0
    assert 0.4 < float(nz.float().mean()) < 0.6
    factor = delta.abs().sum() / delta[nz].abs().sum()  # mergekit's DARE: rescaled to the delta's L1 norm
    assert 1.8 < float(factor) < 2.2
    torch.testing.assert_close(diff[nz], factor * delta[nz], rtol=1e-4, atol=1e-6)
    scaled = CheckpointReader(sk.merge(base, [(tv, 1.0)], tmp_path / "scaled", alpha_by_layer={1: 0.5}))
    torch.testing.assert_close(scaled[name], rbase[name] + 0.5 * delta, rtol=1e-6, atol=1e-7)
    other = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(scaled[other], rbase[other] + tv.deltas[other], rtol=1e-6, atol=1e-7)


def test_merge_bad_input(trio, tmp_path, tok):
    base, a, b = trio
    tv = sk.TaskVector.between(a, b)
    with pytest.raises(ValueError, match="is an input of this command"):
        sk.merge(base, [(tv, 1.0)], base, force=True)
    gpt2 = _save(make_tiny("gpt2", len(tok)), tmp_path / "gpt2")
    with pytest.raises(ValueError, match="a llama task vector cannot merge into a gpt2 model"):
        sk.merge(gpt2, [(tv, 1.0)], tmp_path / "x")
    broken = sk.TaskVector({**tv.deltas, "model.layers.9.extra.weight": torch.zeros(3)}, {"model_type": "llama"})
    with pytest.raises(ValueError, match="missing from the base"):
        sk.merge(base, [(broken, 1.0)], tmp_path / "x")
    name = "model.layers.0.mlp.up_proj.weight"
    wrong = sk.TaskVector({name: torch.zeros(3, 3)}, {"model_type": "llama"})
    with pytest.raises(ValueError, match="another base"):
        sk.merge(base, [(wrong, 1.0)], tmp_path / "x")
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            sk.merge(base, [(tv, alpha)], tmp_path / "x")
    with pytest.raises(ValueError, match="method="):
        sk.merge(base, [(tv, 1.0)], tmp_path / "x", method="slerp")
    assert not (tmp_path / "x").exists()


def test_failure_halfway_leaves_nothing(trio, tmp_path, monkeypatch):
    import importlib

    merge_module = importlib.import_module("steerkit.weights.merge")  # the module, not the re-exported function

    base, a, b = trio
    tv = sk.TaskVector.between(a, b)
    calls = {"n": 0}
    real = merge_module.combine

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_module, "combine", flaky)
    with pytest.raises(OSError, match="simulated"):
        sk.merge(base, [(tv, 1.0)], tmp_path / "out", max_shard_size="50KB")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    nan = sk.TaskVector({"model.norm.weight": torch.full((32,), float("nan"))}, {"model_type": "llama"})
    monkeypatch.setattr(merge_module, "combine", real)
    with pytest.raises(ValueError, match="NaN or inf"):
        sk.merge(base, [(nan, 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupted_and_mismatched_checkpoints(trio, tmp_path, tok):
    base, a, b = trio
    shard = sorted(a.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or not a safetensors"):
        sk.TaskVector.between(a, b)
    grown_model = make_tiny("llama", len(tok) + 8)
    grown = _save(grown_model, tmp_path / "grown")
    with pytest.raises(ValueError, match=r"shape \(49160, 32\) in A vs \(49152, 32\) in B.*common_rows"):
        sk.TaskVector.between(grown, b)
    tv = sk.TaskVector.between(grown, b, common_rows=True)
    assert tv.deltas["model.embed_tokens.weight"].shape == (49152, 32)
    gpt2 = _save(make_tiny("gpt2", len(tok)), tmp_path / "gpt2")
    with pytest.raises(ValueError, match="different tensors"):
        sk.TaskVector.between(gpt2, b)
    with pytest.raises(ValueError, match="not a task vector"):
        sk.TaskVector.load(base)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_bake_equals_hook_steering(tmp_path, tok, model_type):
    model = make_tiny(model_type, len(tok))
    base = _save(model, tmp_path / "base")
    g = torch.Generator().manual_seed(5)
    vec = sk.SteeringVector({0: torch.randn(32, generator=g), 2: torch.randn(32, generator=g)})
    out = sk.bake(base, vec, 1.5, tmp_path / "baked")
    baked = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok(["The quick brown fox jumps"], return_tensors="pt")["input_ids"]
    with torch.no_grad(), sk.steer(model, vec, alpha=1.5):
        expected = model(ids).logits
    with torch.no_grad():
        got = baked(ids).logits
        plain = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3
    config = json.loads((out / "config.json").read_text())
    assert config["steerkit_bake"]["layers"] == [0, 2] and config["steerkit_bake"]["alpha"] == 1.5


@pytest.mark.parametrize("model_type", ["gemma", "gemma2"])
def test_bake_refuses_architectures_without_the_bias(tmp_path, tok, model_type):
    base = _save(make_tiny(model_type, len(tok)), tmp_path / "base")
    with pytest.raises(ValueError, match="export-gguf"):
        sk.bake(base, sk.SteeringVector({1: torch.ones(32)}), 1.0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bake_rejects_vector_of_another_model(trio, tmp_path):
    base, _, _ = trio
    with pytest.raises(ValueError, match="hidden size 32"):
        sk.bake(base, sk.SteeringVector({1: torch.ones(576)}), 1.0, tmp_path / "out")
    with pytest.raises(ValueError, match="finite"):
        sk.bake(base, sk.SteeringVector({1: torch.ones(32)}), float("nan"), tmp_path / "out")


@pytest.mark.slow
def test_bake_on_the_embedded_model(smollm, tmp_path):
    model, tok = smollm
    vec = sk.extract(model, tok, sk.load_pairs("sentiment"), layers=[6, 10])
    out = sk.bake("smollm2-135m-instruct", vec, 1.0, tmp_path / "baked", max_shard_size="200MB")
    baked = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no steerkit involved
    ids = tok(["Describe your morning in one sentence."], return_tensors="pt")
    with torch.no_grad(), sk.steer(model, vec, alpha=1.0):
        expected = model(**ids).logits
    with torch.no_grad():
        got = baked(**ids).logits
    assert float((got - expected).abs().max()) < 1e-4
    assert baked.lm_head.weight is baked.model.embed_tokens.weight
    assert len(list(out.glob("model-*-of-*.safetensors"))) == 3
