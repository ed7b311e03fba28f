"""Transcoders: trained on a block's MLP input to predict its output, saved in a layout plain sae-lens loads,
spliced in place of the MLP, and evaluated on the MLP output (FVU) and the loss when spliced."""

import pytest
import torch

import steerkit as sk
from steerkit.sae.splice import is_transcoder
from steerkit.sae.train import mlp_activations
from tests.conftest import make_tiny

SETTINGS = dict(kind="transcoder", arch="batchtopk", d_sae=64, k=8, tokens=16384, batch_size=256, ctx_len=64,
                buffer_tokens=4096, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tok, default_corpus, tmp_path_factory):
    model = make_tiny("llama", len(tok))
    out = tmp_path_factory.mktemp("tc") / "transcoder"
    return model, sk.train_sae(model, tok, default_corpus, 1, out=out, **SETTINGS), out


def test_a_transcoder_saves_as_sae_lens_loads_it_and_predicts_the_mlp_output(trained, tok, default_corpus):
    import sae_lens

    model, transcoder, out = trained
    plain = sae_lens.SAE.load_from_disk(out)  # sae-lens alone reads it
    assert type(plain).__name__ == "JumpReLUTranscoder" and plain.cfg.d_out == 32
    assert is_transcoder(transcoder)
    batch = next(iter(default_corpus.batches(tok, 64, 8, "heldout")))
    rows = mlp_activations(model, batch, [1])[1]
    x, y = rows[:, :32], rows[:, 32:]
    with torch.no_grad():
        recon = plain.decode(plain.encode(x))
    fvu = float((recon - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu < 0.85  # it learned the MLP (predicting the mean output is 1)
    metrics = sk.evaluate_sae(model, tok, transcoder, corpus=default_corpus, tokens=2048, ctx_len=64, progress=False)
    assert abs(metrics["fvu"] - fvu) < 0.15 and metrics["fvu"] == pytest.approx(1 - metrics["explained_variance"])
    assert 5 < metrics["l0"] < 12 and metrics["kl_spliced"] >= 0  # k = 8 a token on average, on new text


def test_splicing_a_transcoder_replaces_the_mlp_output_after_the_first_token(trained, tok):
    model, transcoder, _ = trained
    ids = tok(["The cat sat on the mat and looked at the dog."], return_tensors="pt")["input_ids"]
    mlp = model.model.layers[1].mlp

    def by_hand(_module, args, out):
        new = transcoder.decode(transcoder.encode(args[0]))
        new[:, 0] = out[:, 0]
        return new

    handle = mlp.register_forward_hook(by_hand)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    handle.remove()
    with sk.splice(model, transcoder, max_norm=float("inf")), torch.no_grad():
        spliced = model(input_ids=ids).logits
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert torch.allclose(spliced, expected, atol=1e-5) and not torch.allclose(spliced, plain, atol=1e-3)


def test_a_transcoder_trains_as_batchtopk_only(tok, default_corpus):
    model = make_tiny("llama", len(tok))
    with pytest.raises(ValueError, match="a transcoder trains as batchtopk"):
        sk.train_sae(model, tok, default_corpus, 1, **{**SETTINGS, "arch": "topk"})
    with pytest.raises(ValueError, match="kind='crosscoder'"):
        sk.train_sae(model, tok, default_corpus, 1, **{**SETTINGS, "kind": "crosscoder"})
