"""SAE-tuning: LoRA with a frozen SAE spliced in, adapters that move between models, merged checkpoints."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from steerkit.sae.tune import _batch, attach_adapter, sae_tune
from tests.conftest import make_tiny

TEXTS = [
    "Question: what is 3 plus 4? Answer: 7.",
    "Question: what is 10 minus 6? Answer: 4.",
    "Question: what is 2 plus 9? Answer: 11.",
    "Question: what is 8 minus 5? Answer: 3.",
]
QA = [{"prompt": t.split("Answer:")[0] + "Answer:", "answer": t.split("Answer:")[1]} for t in TEXTS]
FAST = dict(lr=3e-3, batch_size=4, progress=False, lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})


def _sae(d=32, d_sae=64, seed=0):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    return TopKSAE(TopKSAEConfig(d_in=d, d_sae=d_sae, k=8))


def _lora_b_norm(model, layer: int) -> float:
    named = model.named_parameters()
    return sum(float(p.detach().norm()) for n, p in named if f"layers.{layer}." in n and "lora_B" in n)


@pytest.fixture
def target(tok):
    return make_tiny("llama", len(tok))


@pytest.mark.parametrize("autocast", [False, True])
def test_kl_tuning_lowers_the_loss_and_leaves_the_target_alone(target, tok, autocast):
    before = {k: v.clone() for k, v in target.state_dict().items()}
    tuned = sae_tune(target, tok, _sae(), 1, TEXTS, epochs=15, autocast=autocast, **FAST)
    assert len(tuned.history) == 15 and tuned.history[-1] < 0.7 * tuned.history[0]
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert not any("lora" in n for n, _ in target.named_parameters())
    assert _lora_b_norm(tuned, 2) > 0
    assert all(p.dtype == torch.float32 for n, p in tuned.named_parameters() if "lora" in n)


def test_grad_through_sae_switch(target, tok):
    both = dict(epochs=2, skip_first=False, **FAST)
    through = sae_tune(target, tok, _sae(), 1, TEXTS, **both)
    resa = sae_tune(target, tok, _sae(), 1, TEXTS, grad_through_sae=False, **both)
    # Resa's released code: the SAE under no_grad replaces every token, so blocks 0 and 1 learn nothing
    assert _lora_b_norm(resa, 0) == 0 and _lora_b_norm(resa, 1) == 0 and _lora_b_norm(resa, 2) > 0
    assert _lora_b_norm(through, 0) > 0 and _lora_b_norm(through, 1) > 0


def test_answer_mask_covers_the_answer_tokens(tok):
    ids, mask, answer = _batch(tok, [(q["prompt"], q["answer"]) for q in QA], max_length=64)
    for row, q in enumerate(QA):
        assert tok.decode(ids[row][answer[row]]) == q["answer"]
        assert mask[row].sum() > answer[row].sum() > 0


def test_ce_tuning_merge_and_checkpoint(target, tok, tmp_path):
    out = tmp_path / "merged"
    merged = sae_tune(target, tok, _sae(), 1, QA, loss="ce", epochs=8, merge=True, out=out, **FAST)
    assert merged.history[-1] < merged.history[0]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, merged(**ids).logits, rtol=1e-5, atol=1e-5)
        assert (merged(**ids).logits - target(**ids).logits).abs().max() > 1e-3
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied embeddings written once


def test_adapter_moves_to_another_model_of_the_family(target, tok, tmp_path):
    tuned = sae_tune(target, tok, _sae(), 1, TEXTS, epochs=4, out=tmp_path / "adapter", **FAST)
    ids = tok(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        same = attach_adapter(target, tmp_path / "adapter")
        torch.testing.assert_close(same(**ids).logits, tuned(**ids).logits, rtol=1e-5, atol=1e-5)
        other = make_tiny("llama", len(tok), seed=1)
        moved = attach_adapter(other, tmp_path / "adapter", merge=True)
        assert (moved(**ids).logits - other(**ids).logits).abs().max() > 1e-4
    assert not any("lora" in n for n, _ in other.named_parameters())


def test_bad_input(target, tok, tmp_path):
    with pytest.raises(ValueError, match="d_in=64 but the model's residual stream has width 32"):
        sae_tune(target, tok, _sae(d=64), 1, TEXTS, **FAST)
    with pytest.raises(ValueError, match="loss='mse'"):
        sae_tune(target, tok, _sae(), 1, TEXTS, loss="mse", **FAST)
    with pytest.raises(ValueError, match=r"data\[0\] is 'Question"):
        sae_tune(target, tok, _sae(), 1, TEXTS, loss="ce", **FAST)
    with pytest.raises(ValueError, match=r"data\[1\] is 5"):
        sae_tune(target, tok, _sae(), 1, [TEXTS[0], 5], **FAST)
    with pytest.raises(ValueError, match="data is empty"):
        sae_tune(target, tok, _sae(), 1, [], **FAST)
    sae_tune(target, tok, _sae(), 1, TEXTS, epochs=1, out=tmp_path / "adapter", **FAST)
    with pytest.raises(ValueError, match="trained for .*'llama'.*but the model is .*'mistral'"):
        attach_adapter(make_tiny("mistral", len(tok)), tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        attach_adapter(target, tmp_path / "nothing")
    with pytest.raises(FileExistsError, match="already exists"):
        sae_tune(target, tok, _sae(), 1, TEXTS, epochs=1, out=tmp_path / "adapter", **FAST)


def test_lora_sft_baseline_without_sae(target, tok):
    plain = sae_tune(target, tok, None, 1, QA, loss="ce", epochs=6, **FAST)
    assert plain.history[-1] < plain.history[0]
    with pytest.raises(ValueError, match="without an SAE the kl loss is zero"):
        sae_tune(target, tok, None, 1, TEXTS, loss="kl", **FAST)


def test_the_resa_preset_tunes_one_example_a_step_with_every_token_spliced(tok):
    from steerkit.sae.tune import TuneConfig

    resa = TuneConfig.resa(lr=1e-3, epochs=1)
    assert (resa.batch_size, resa.grad_through_sae, resa.skip_first, resa.replace_outliers) == (1, False, False, True)
    tuned = sae_tune(make_tiny("llama", len(tok)), tok, _sae(), 1, TEXTS, config=resa, progress=False)
    assert len(tuned.history) == len(TEXTS)  # batch 1, one epoch
    with pytest.raises(ValueError, match="loss='mse'"):
        TuneConfig.resa(loss="mse").checked()
