"""capture on TransformerLens and nnsight models agrees with transformers on the embedded model."""

import pytest
import torch

import steerkit as sk
from steerkit.backends import hf_model, kind
from tests.conftest import TEXTS

LAYERS = [0, 6, 14, 29]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def reference(smollm):
    model, tok = smollm
    return sk.capture(model, tok, TEXTS, LAYERS, position="all")


@pytest.fixture(scope="module")
def bridge(embedded_dir):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(embedded_dir), device="cpu")


@pytest.fixture(scope="module")
def nn_model(embedded_dir):
    import warnings

    from nnsight import LanguageModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LanguageModel(str(embedded_dir), dispatch=True)


def test_kinds(smollm, bridge, nn_model):
    assert kind(smollm[0]) == "hf" and kind(bridge) == "tlens" and kind(nn_model) == "nnsight"
    assert hf_model(nn_model) is nn_model._module


def test_transformer_bridge_matches(bridge, smollm, reference):
    acts, rows = sk.capture(bridge, smollm[1], TEXTS, LAYERS, position="all")
    assert torch.equal(rows, reference[1])
    assert _rel(acts, reference[0]) < 1e-4


def test_nnsight_matches(nn_model, smollm, reference):
    acts, rows = sk.capture(nn_model, smollm[1], TEXTS, LAYERS, position="all")
    assert torch.equal(rows, reference[1])
    assert _rel(acts, reference[0]) < 1e-4


def test_backends_default_to_their_own_tokenizer(bridge, nn_model):
    # TransformerLens prepends BOS; the result still has one row per text
    assert sk.capture(bridge, None, TEXTS, [3]).shape == (len(TEXTS), 1, 576)
    assert sk.capture(nn_model, None, TEXTS, [3]).shape == (len(TEXTS), 1, 576)


def test_backend_layer_errors(bridge, nn_model):
    for model in (bridge, nn_model):
        with pytest.raises(ValueError, match=r"blocks 0\.\.29"):
            sk.capture(model, None, TEXTS, [30])


def test_hooked_transformer(tok):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, d_head=8, n_heads=4, n_ctx=64, d_vocab=len(tok), act_fn="gelu", normalization_type="LN"
    )
    model = HookedTransformer(cfg).eval()
    acts = sk.capture(model, tok, TEXTS, [0, 2], position="mean", batch_size=4)
    for n, text in enumerate(TEXTS):
        ids = tok([text], return_tensors="pt")["input_ids"]
        _, cache = model.run_with_cache(ids)
        for j, layer in enumerate([0, 2]):
            ref = cache[f"blocks.{layer}.hook_resid_post"][0].mean(0)
            torch.testing.assert_close(acts[n, j], ref, rtol=1e-4, atol=1e-5)


def _steering_vector():
    g = torch.Generator().manual_seed(0)
    return sk.SteeringVector({6: 20 * torch.randn(576, generator=g), 12: 10 * torch.randn(576, generator=g)})


def test_steer_agrees_across_backends(smollm, bridge, nn_model):
    model, tok = smollm
    ids = tok(["The weather today is"], return_tensors="pt")["input_ids"]
    vec = _steering_vector()
    with torch.no_grad():
        plain = model(ids).logits[0, -1]
        with sk.steer(model, vec, alpha=1.0):
            hf = model(ids).logits[0, -1]
        with sk.steer(bridge, vec, alpha=1.0):
            tl = bridge(ids)[0, -1]
        with sk.steer(nn_model, vec, alpha=1.0):
            with nn_model.trace(ids):
                nn_logits = nn_model.lm_head.output.save()
    assert _rel(hf, plain) > 1e-2  # the vector does something
    assert _rel(tl, hf) < 1e-3 and _rel(nn_logits[0, -1], hf) < 1e-3
    with torch.no_grad():  # and nothing is left behind
        assert _rel(bridge(ids)[0, -1], plain) < 1e-3


def test_steer_hooked_transformer(tok):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, d_head=8, n_heads=4, n_ctx=64, d_vocab=len(tok), act_fn="gelu", normalization_type="LN"
    )
    model = HookedTransformer(cfg).eval()
    vec = sk.SteeringVector({1: torch.randn(32)})
    ids = tok(TEXTS[:1], return_tensors="pt")["input_ids"]
    _, plain = model.run_with_cache(ids)
    with sk.steer(model, vec, alpha=2.0):
        _, steered = model.run_with_cache(ids)
    delta = steered["blocks.1.hook_resid_post"] - plain["blocks.1.hook_resid_post"]
    torch.testing.assert_close(delta[0], (2.0 * vec[1]).expand_as(delta[0]), rtol=1e-4, atol=1e-4)


def test_splice_agrees_across_backends(smollm, bridge, nn_model):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    model, tok = smollm
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=576, d_sae=1152, k=64))  # random weights: any SAE must splice the same
    ids = tok(["The weather today is", "A second, longer prompt about the sea"], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**ids).logits
        with sk.splice(model, sae, 9):
            hf = model(**ids).logits
        with sk.splice(bridge, sae, 9):
            tl = bridge(ids["input_ids"], attention_mask=ids["attention_mask"])
        with sk.splice(nn_model, sae, 9):
            with nn_model.trace(ids):
                nn_logits = nn_model.lm_head.output.save()
    assert _rel(hf, plain) > 1e-2
    assert _rel(tl, hf) < 1e-3 and _rel(nn_logits, hf) < 1e-3
    with torch.no_grad():
        assert _rel(bridge(ids["input_ids"], attention_mask=ids["attention_mask"]), plain) < 1e-3
