"""Baking into the families people release: native biases, exact re-expression as Llama, clear refusals."""

import copy
import importlib
import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import steerkit as sk
from steerkit.weights import FAMILIES
from tests.conftest import TINY, make_tiny, tiny_config
from tests.test_weights import _save

bake_module = importlib.import_module("steerkit.weights.bake")
REEXPRESSED = ["qwen2", "mistral", "phi3"]
NATIVE = ["llama", "gpt2", "gpt_neox"]


def _vector(seed=5):
    g = torch.Generator().manual_seed(seed)
    return sk.SteeringVector({0: torch.randn(32, generator=g), 2: torch.randn(32, generator=g)})


def _ids(tok, n_tokens=None):
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat by the door"
    ids = tok([text], return_tensors="pt")["input_ids"]
    return ids if n_tokens is None else ids[:, :n_tokens]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _longrope_phi3(vocab):
    """A tiny Phi-3 with LongRoPE scaling whose original context (8) is shorter than the test prompt."""
    config = tiny_config("phi3", vocab)
    half = TINY["hidden"] // TINY["heads"] // 2
    config.rope_parameters = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.1 * i for i in range(half)],
        "long_factor": [2.0 + 0.5 * i for i in range(half)],
        "original_max_position_embeddings": 8,
        "partial_rotary_factor": 1.0,
    }
    config.original_max_position_embeddings = 8
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.fixture(params=REEXPRESSED + ["phi3-longrope"])
def family_model(request, tok):
    if request.param == "phi3-longrope":
        return "phi3", _longrope_phi3(len(tok))
    return request.param, make_tiny(request.param, len(tok))


def test_reexpressed_as_llama_reproduces_the_original_then_equals_hook_steering(family_model, tok, tmp_path):
    model_type, model = family_model
    base = _save(model, tmp_path / "base")
    ids = _ids(tok)
    assert ids.shape[1] > 8  # past the LongRoPE variant's original context: its long factors are used
    plain = _logits(model, ids)
    zero = sk.bake(base, _vector(), 0.0, tmp_path / "zero")
    rebuilt = AutoModelForCausalLM.from_pretrained(zero, attn_implementation="eager").eval()
    assert type(rebuilt).__name__ == "LlamaForCausalLM" and rebuilt.config.mlp_bias
    torch.testing.assert_close(_logits(rebuilt, ids), plain, rtol=1e-5, atol=1e-5)

    vec = _vector()
    out = sk.bake(base, vec, 1.5, tmp_path / "baked")
    baked = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with sk.steer(model, vec, alpha=1.5):
        expected = _logits(model, ids)
    torch.testing.assert_close(_logits(baked, ids), expected, rtol=1e-4, atol=1e-4)
    assert (expected - plain).abs().max() > 1e-3
    card = (out / "README.md").read_text()
    assert f"re-expressed as LlamaForCausalLM (was {model_type}" in card and "checked before writing" in card
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["steerkit_bake"]["alpha"] == 1.5


@pytest.mark.parametrize("model_type", NATIVE)
def test_native_families_keep_their_architecture(tok, tmp_path, model_type):
    model = make_tiny(model_type, len(tok))
    out = sk.bake(_save(model, tmp_path / "base"), _vector(), 1.0, tmp_path / "baked", family="native")
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    baked = AutoModelForCausalLM.from_pretrained(out).eval()
    with sk.steer(model, _vector(), alpha=1.0):
        expected = _logits(model, _ids(tok))
    torch.testing.assert_close(_logits(baked, _ids(tok)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["qwen3", "gemma", "gemma2", "gemma3_text"])
def test_the_rest_is_refused_naming_both_alternatives(tok, tmp_path, model_type):
    base = _save(make_tiny(model_type, len(tok)), tmp_path / "base")
    with pytest.raises(ValueError) as info:
        sk.bake(base, _vector(), 1.0, tmp_path / "out")
    message = str(info.value)
    assert "export-gguf" in message and "steerkit.steer" in message and FAMILIES[model_type].why in message
    assert not (tmp_path / "out").exists()


def test_family_switch(tok, tmp_path):
    qwen = _save(make_tiny("qwen2", len(tok)), tmp_path / "qwen")
    with pytest.raises(ValueError, match="family='auto' or 'llama'"):
        sk.bake(qwen, _vector(), 1.0, tmp_path / "out", family="native")
    gpt2 = _save(make_tiny("gpt2", len(tok)), tmp_path / "gpt2")
    with pytest.raises(ValueError, match="cannot be re-expressed as Llama"):
        sk.bake(gpt2, _vector(), 1.0, tmp_path / "out", family="llama")
    with pytest.raises(ValueError, match="family='fast'"):
        sk.bake(gpt2, _vector(), 1.0, tmp_path / "out", family="fast")
    assert not (tmp_path / "out").exists()


def test_sliding_windows_and_partial_rotary_are_refused(tok, tmp_path):
    cases = {
        "mistral": dict(sliding_window=16),  # context 128
        "qwen2": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
        "phi3": dict(sliding_window=16),
    }
    for model_type, overrides in cases.items():
        config = tiny_config(model_type, len(tok))
        for key, value in overrides.items():
            setattr(config, key, value)
        if model_type == "qwen2":
            config.layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
        model = AutoModelForCausalLM.from_config(config)
        base = _save(model, tmp_path / model_type)
        with pytest.raises(ValueError, match="sliding window of 16 tokens, shorter than its context of 128"):
            sk.bake(base, _vector(), 1.0, tmp_path / "out")
    config = tiny_config("phi3", len(tok))
    config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 0.5}
    base = _save(AutoModelForCausalLM.from_config(config), tmp_path / "partial")
    with pytest.raises(ValueError, match="rotates only part of each head"):
        sk.bake(base, _vector(), 1.0, tmp_path / "out")
    wide = tiny_config("mistral", len(tok))
    wide.sliding_window = 4096  # longer than the context: no effect, so re-expressed
    sk.bake(_save(AutoModelForCausalLM.from_config(wide), tmp_path / "wide"), _vector(), 1.0, tmp_path / "ok")
    assert not (tmp_path / "out").exists() and (tmp_path / "ok").is_dir()


def test_the_check_before_writing_catches_a_wrong_re_expression(tok, tmp_path, monkeypatch):
    """The gate can fail: swap k and v in Phi-3's split and nothing may be written."""
    base = _save(make_tiny("phi3", len(tok)), tmp_path / "base")
    real = bake_module._Tensors.rows

    def swapped(self, reader, name, parts):
        keys = list(parts)
        if len(keys) == 3:
            parts = {keys[0]: parts[keys[0]], keys[1]: parts[keys[2]], keys[2]: parts[keys[1]]}
        return real(self, reader, name, parts)

    monkeypatch.setattr(bake_module._Tensors, "rows", swapped)
    with pytest.raises(ValueError, match="does not reproduce the original.*nothing was written"):
        sk.bake(base, _vector(), 1.0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bf16_checkpoints_stay_bf16_within_rounding(tok, tmp_path):
    """Zero biases change bf16 matmul paths (addmm vs mm), so logits agree to bf16 rounding, not bit for bit."""
    model = copy.deepcopy(make_tiny("qwen2", len(tok))).to(torch.bfloat16)
    base = _save(model, tmp_path / "base", dtype=torch.bfloat16)
    out = sk.bake(base, _vector(), 0.0, tmp_path / "zero")
    rebuilt = AutoModelForCausalLM.from_pretrained(out).eval()
    assert rebuilt.dtype == torch.bfloat16 and rebuilt.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    got, expected = _logits(rebuilt, _ids(tok)).float(), _logits(model, _ids(tok)).float()
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_cli_bake_reexpresses_and_names_the_family_option(tok, tmp_path):
    from typer.testing import CliRunner

    from steerkit import cli

    base = _save(make_tiny("mistral", len(tok)), tmp_path / "base")
    vec = _vector().save(tmp_path / "v.safetensors")
    runner = CliRunner()
    result = runner.invoke(cli.app, ["bake", str(base), "-v", str(vec), "-o", str(tmp_path / "b"), "--layers", "2"])
    assert result.exit_code == 0, result.output
    assert transformers.AutoConfig.from_pretrained(tmp_path / "b").model_type == "llama"
    words = " ".join(runner.invoke(cli.app, ["bake", "--help"]).output.replace("│", " ").split())
    assert "re-expressed exactly as Llama" in words and "--family" in words
