"""SAEs: training with sae-lens classes on transformers models, evaluation, splicing, files."""

import copy
import json

import pytest
import torch

from steerkit.batching import pad_batch, pad_id
from steerkit.capture import Recorder
from steerkit.data.corpus import Corpus, load_corpus
from steerkit.sae import evaluate_sae, load_sae, splice, train_sae
from steerkit.sae.splice import reconstruct
from steerkit.sae.train import block_activations
from tests.conftest import TEXTS

D = 32  # tiny models' width
SMALL = dict(d_sae=64, k=4, tokens=4096, ctx_len=32, batch_size=256, model_batch=8, buffer_tokens=1024, progress=False)


def _topk_sae(W_enc, b_enc, W_dec, b_dec, k):
    """An inference TopK SAE with the given weights (no decoder-norm rescaling)."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=W_enc.shape[0], d_sae=W_enc.shape[1], k=k, rescale_acts_by_decoder_norm=False))
    with torch.no_grad():
        for name, value in dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec).items():
            getattr(sae, name).copy_(value)
    return sae


def _exact_sae(d=D):
    """Reconstructs every input exactly: latents relu(x) and relu(-x), k = d picks exactly the non-zero ones."""
    eye = torch.eye(d)
    return _topk_sae(torch.cat([eye, -eye], 1), torch.zeros(2 * d), torch.cat([eye, -eye], 0), torch.zeros(d), d)


def _zero_sae(d=D):
    return _topk_sae(torch.zeros(d, 2 * d), torch.zeros(2 * d), torch.zeros(2 * d, d), torch.zeros(d), 4)


def _ids(tok, texts=TEXTS):
    """A left-padded batch with real-token position ids."""
    input_ids, mask, positions = pad_batch(tok(texts)["input_ids"], pad_id(tok), "left")
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}


@pytest.fixture(scope="module")
def trained(tiny_llama_module, tok, default_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "topk"
    return train_sae(tiny_llama_module, tok, default_corpus, 1, out=out, **{**SMALL, "tokens": 16384}), out


@pytest.fixture(scope="module")
def tiny_llama_module(tok):
    from tests.conftest import make_tiny

    return make_tiny("llama", len(tok))


def test_train_writes_a_sae_lens_directory(trained, tiny_llama_module, tok, default_corpus):
    from sae_lens import SAE

    sae, out = trained
    assert isinstance(sae, SAE) and sae.cfg.d_in == D and sae.cfg.d_sae == 64 and sae.cfg.architecture() == "topk"
    again = SAE.load_from_disk(out)
    assert torch.equal(again.W_enc, sae.W_enc) and again.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert json.loads((out / "training_log.json").read_text()) == sae.training_log
    assert sae.training_log[-1]["tokens"] == 16384 and not (out.parent / "topk.ckpt").exists()
    # the training scale is folded into the weights: on raw activations the saved SAE explains what it did in training
    batch = next(default_corpus.batches(tok, 32, 16, "heldout"))
    x = block_activations(tiny_llama_module, batch, [1])[1]
    with torch.no_grad():
        ev = 1 - (reconstruct(sae, x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev > 0.4 and abs(float(ev) - sae.training_log[-1]["explained_variance"]) < 0.15
    first, last = sae.training_log[0], sae.training_log[-1]
    assert last["mse"] < first["mse"] and last["l0"] == pytest.approx(4.0)


SAVED_AS = [("batchtopk", "jumprelu"), ("jumprelu", "jumprelu"), ("standard", "standard")]


@pytest.mark.parametrize("arch,saved_as", SAVED_AS)
def test_other_architectures(arch, saved_as, tiny_llama_module, tok, default_corpus, tmp_path):
    sae = train_sae(
        tiny_llama_module, tok, default_corpus, 2, arch=arch, out=tmp_path / arch, **{**SMALL, "tokens": 16384}
    )
    assert sae.cfg.architecture() == saved_as
    assert load_sae(tmp_path / arch).cfg.d_sae == 64
    first, last = sae.training_log[0], sae.training_log[-1]
    assert last["explained_variance"] > 0.05 and 0 < last["l0"] < 64, last
    if arch == "standard":  # the L1 penalty is doing its work
        assert last["l0"] < first["l0"]
    if arch == "batchtopk":  # saved as JumpReLU, its global threshold keeps about k = 4 a token on new text
        l0 = evaluate_sae(tiny_llama_module, tok, sae, corpus=default_corpus, tokens=1024, ctx_len=32, progress=False)
        assert 2.5 < l0["l0"] < 6.5, l0["l0"]


def test_several_layers_in_one_pass(tiny_llama_module, tok, default_corpus, tmp_path):
    calls = []
    handle = tiny_llama_module.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        one = train_sae(tiny_llama_module, tok, default_corpus, 1, **SMALL)
        n_single = len(calls)
        calls.clear()
        both = train_sae(tiny_llama_module, tok, default_corpus, [0, 2], out=tmp_path / "multi", **SMALL)
    finally:
        handle.remove()
    assert len(calls) == n_single  # two SAEs, the same number of model forwards as one
    assert set(both) == {0, 2} and one.cfg.d_in == D
    assert load_sae(tmp_path / "multi" / "layer_2").cfg.metadata.hook_name == "blocks.2.hook_resid_post"


class _Failing(Corpus):
    """The default corpus until ``after`` sequences have been read, then an error (a crash mid-run)."""

    def __init__(self, base, after):
        super().__init__("failing", base._documents, base.fingerprint)
        self.after = after

    def sequences(self, tok, ctx_len=128, split="train", skip=0, shard=(0, 1)):
        for n, seq in enumerate(super().sequences(tok, ctx_len, split, skip, shard)):
            if skip + n >= self.after:
                raise RuntimeError("simulated crash")
            yield seq


def test_checkpoint_and_resume(tiny_llama_module, tok, default_corpus, tmp_path):
    out = tmp_path / "run"
    settings = {**SMALL, "tokens": 8192, "checkpoint_every": 2048}
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sae(tiny_llama_module, tok, _Failing(default_corpus, after=200), 1, out=out, **settings)
    ckpt = tmp_path / "run.ckpt"
    assert not out.exists() and (ckpt / "state.json").is_file()
    saved = json.loads((ckpt / "state.json").read_text())
    assert 0 < saved["step"] * 256 < 8192
    with pytest.raises(ValueError, match="other settings"):
        train_sae(tiny_llama_module, tok, default_corpus, 1, out=out, resume=True, **{**settings, "k": 8})
    sae = train_sae(tiny_llama_module, tok, default_corpus, 1, out=out, resume=True, **settings)
    tokens = [h["tokens"] for h in sae.training_log]
    assert tokens == sorted(tokens) and tokens[-1] == 8192 and not ckpt.exists() and out.is_dir()
    assert sae.cfg.metadata.steerkit["tokens"] == 8192


def test_training_bad_input(tiny_llama_module, tok, default_corpus, tmp_path):
    model = tiny_llama_module
    with pytest.raises(ValueError, match="blocks 0..2"):
        train_sae(model, tok, default_corpus, 3, **SMALL)
    with pytest.raises(ValueError, match="arch='gated'"):
        train_sae(model, tok, default_corpus, 1, arch="gated", **SMALL)
    with pytest.raises(ValueError, match="less than one batch"):
        train_sae(model, tok, default_corpus, 1, **{**SMALL, "tokens": 100})
    with pytest.raises(ValueError, match="k=0"):
        train_sae(model, tok, default_corpus, 1, **{**SMALL, "k": 0})
    with pytest.raises(TypeError, match="Corpus"):
        train_sae(model, tok, ["some text"], 1, **SMALL)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_sae(model, tok, default_corpus, 1, out=tmp_path / "x", resume=True, **SMALL)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    from steerkit.data.corpus import load_corpus

    with pytest.raises(ValueError, match="no text"):
        train_sae(model, tok, load_corpus(empty), 1, out=tmp_path / "e", **SMALL)
    assert not (tmp_path / "e").exists()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite activations at layer 1"):
        train_sae(broken, tok, default_corpus, 1, **SMALL)


def test_splice_replaces_real_tokens_after_the_first(tiny_llama_module, tok):
    model, sae = tiny_llama_module, _zero_sae()
    batch = _ids(tok)
    with torch.no_grad(), Recorder(model, [1]) as clean:
        plain = model(**batch).logits
    with torch.no_grad(), splice(model, sae, 1), Recorder(model, [1]) as rec:
        model(**batch)
    mask = batch["attention_mask"].bool()
    first = mask & (mask.long().cumsum(-1) == 1)
    replaced = mask & ~first
    assert torch.all(rec[1][replaced] == 0)  # the zero SAE's reconstruction
    assert torch.equal(rec[1][~replaced], clean[1][~replaced])  # padding and first tokens untouched
    with torch.no_grad(), splice(model, sae, 1, skip_first=False), Recorder(model, [1]) as rec:
        model(**batch)
    assert torch.all(rec[1][mask] == 0)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)  # hooks gone


def test_exact_sae_and_error_term_leave_logits_unchanged(tiny_llama_module, tok, trained):
    model = tiny_llama_module
    batch = _ids(tok)
    with torch.no_grad():
        plain = model(**batch).logits
        with splice(model, _exact_sae(), 1):
            torch.testing.assert_close(model(**batch).logits, plain, rtol=1e-4, atol=1e-4)
    sae = trained[0]
    with splice(model, sae, 1, error_term=True):
        logits = model(**batch).logits
        torch.testing.assert_close(logits, plain, rtol=1e-4, atol=1e-4)
        logits.sum().backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    sae.zero_grad(set_to_none=True)


def test_grad_through_sae_switch(tiny_llama_module, tok, trained):
    model, sae = copy.deepcopy(tiny_llama_module), trained[0]
    batch = _ids(tok)
    below = model.model.layers[0].mlp.down_proj.weight
    above = model.model.layers[2].mlp.down_proj.weight
    for through in (True, False):
        model.zero_grad(set_to_none=True)
        with splice(model, sae, 1, grad_through_sae=through):
            model(**batch).logits.float().logsumexp(-1).sum().backward()
        assert above.grad is not None and above.grad.abs().sum() > 0
        first_token_path = below.grad is not None and below.grad.abs().sum() > 0  # the unspliced first tokens
        assert first_token_path
        if through:
            with_grad = below.grad.clone()
        else:
            assert below.grad.abs().sum() < with_grad.abs().sum()  # only the first-token path is left
    sae.zero_grad(set_to_none=True)


def test_evaluate_known_saes(tiny_llama_module, tok, default_corpus):
    kwargs = dict(tokens=512, ctx_len=32, batch_size=8, progress=False)
    exact = evaluate_sae(tiny_llama_module, tok, _exact_sae(), 1, default_corpus, **kwargs)
    assert exact["explained_variance"] == pytest.approx(1.0, abs=1e-5) and exact["mse"] < 1e-9
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["kl_score"] == pytest.approx(1.0, abs=1e-4)
    assert exact["ce_loss_zero"] > exact["ce_loss_clean"] and exact["tokens"] >= 512
    assert exact["l0"] == pytest.approx(32.0) and exact["dead_fraction"] == 0.0 and exact["dense_fraction"] > 0.9
    zero = evaluate_sae(tiny_llama_module, tok, _zero_sae(), 1, default_corpus, **kwargs)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["l0"] == 0 and zero["dead_fraction"] == 1.0 and zero["explained_variance"] < 0.05
    assert zero["latent_frequency"].shape == (64,) and zero["ce_loss_clean"] == pytest.approx(exact["ce_loss_clean"])


def test_evaluate_on_separate_texts(tiny_llama_module, tok, trained):
    """Each text is its own row: padding is never scored, so batching cannot change a metric."""
    texts = ["Two plus three is five.", "The cat sat on the mat and looked out at the rain.", "Hi there, you"]
    kwargs = dict(progress=False, texts=texts)
    batched = evaluate_sae(tiny_llama_module, tok, trained[1], 1, batch_size=3, **kwargs)
    single = evaluate_sae(tiny_llama_module, tok, trained[1], 1, batch_size=1, **kwargs)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert batched["tokens"] == single["tokens"] == sum(n - 1 for n in lengths)
    for key in ("explained_variance", "ce_loss_clean", "ce_loss_spliced", "kl_spliced", "l0"):
        assert batched[key] == pytest.approx(single[key], rel=1e-4), key
    ids = torch.tensor([tok(texts[1], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = tiny_llama_module(input_ids=ids).logits[0, 1:-1]
    own = torch.nn.functional.cross_entropy(logits.float(), ids[0, 2:])
    alone = evaluate_sae(tiny_llama_module, tok, _exact_sae(), 1, texts=texts[1:2], progress=False)
    assert alone["ce_loss_clean"] == pytest.approx(float(own), rel=1e-5) and alone["kl_score"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="corpus or texts"):
        evaluate_sae(tiny_llama_module, tok, trained[1], 1, corpus=load_corpus("default"), texts=texts)
    with pytest.raises(ValueError, match="at least 3 tokens; bad at \\[1\\]"):
        evaluate_sae(tiny_llama_module, tok, trained[1], 1, texts=["a longer text here", "a"], progress=False)


def test_evaluate_trained_sae(tiny_llama_module, tok, default_corpus, trained):
    sae_dir = trained[1]
    metrics = evaluate_sae(tiny_llama_module, tok, sae_dir, 1, default_corpus, tokens=512, batch_size=8, progress=False)
    assert 0.4 < metrics["explained_variance"] <= 1 and metrics["l0"] == pytest.approx(4.0)
    assert metrics["ce_loss_recovered"] > 0 and metrics["kl_score"] > 0 and 0 <= metrics["dead_fraction"] < 1


def test_sae_bad_input(tiny_llama_module, smollm, trained, tmp_path):
    sae, out = trained
    with pytest.raises(ValueError, match="d_in=32 but the model's residual stream has width 576"):
        with splice(smollm[0], sae, 3):
            pass
    with pytest.raises(ValueError, match="blocks 0..2"):
        with splice(tiny_llama_module, sae, 5):
            pass
    with pytest.raises(FileNotFoundError, match="no SAE directory"):
        load_sae(tmp_path / "nothing")
    import shutil

    for damage in ("json", "weights", "missing"):
        broken = tmp_path / damage
        shutil.copytree(out, broken)
        if damage == "json":
            (broken / "cfg.json").write_text("{not json")
            match = "not valid JSON"
        elif damage == "weights":
            (broken / "sae_weights.safetensors").write_bytes(b"\x00" * 20)
            match = "cannot load the SAE"
        else:
            (broken / "sae_weights.safetensors").unlink()
            match = "sae_weights.safetensors missing"
        with pytest.raises(ValueError, match=match):
            load_sae(broken)


def test_every_token_trains_on_the_first_position_and_records_no_outlier_norm(tiny_llama_module, tok,
                                                                                default_corpus, tmp_path):  # fmt: skip
    from steerkit.sae.io import recorded_max_norm

    batch = next(default_corpus.batches(tok, 32, 4, "train"))
    every = block_activations(tiny_llama_module, batch, [1], first=0)[1]
    dropped = block_activations(tiny_llama_module, batch, [1])[1]
    assert every.shape[0] == batch.numel() and dropped.shape[0] == batch.shape[0] * (batch.shape[1] - 1)
    assert torch.equal(every.reshape(4, 32, D)[:, 1:].reshape(-1, D), dropped)
    default = train_sae(tiny_llama_module, tok, default_corpus, 1, out=tmp_path / "default", **SMALL)
    sae = train_sae(tiny_llama_module, tok, default_corpus, 1, out=tmp_path / "every", every_token=True, **SMALL)
    info, before = sae.cfg.metadata.steerkit, default.cfg.metadata.steerkit
    assert before["first_position"] == "excluded" and recorded_max_norm(default) > 0
    assert info["first_position"] == "included" and info["outlier_fraction"] == 0
    assert recorded_max_norm(load_sae(tmp_path / "every")) is None  # a splice replaces every token
