"""The second embedded model, Gemma 3 270M base (``make gemma`` installs its packages; ``make test-gemma`` runs
this group, which .ci/run calls): capture, extraction, steering, an SAE and a feature vector on a real model of a
second family, and bake's refusal of Gemma's sandwich norms."""

import importlib.util

import pytest
import torch

import steerkit as sk
from steerkit.models import EMBEDDED

pytestmark = [
    pytest.mark.gemma,
    pytest.mark.skipif(
        importlib.util.find_spec(EMBEDDED["gemma3-270m"].package) is None,
        reason="Gemma 3 270M is not installed: `make gemma` installs it",
    ),  # fmt: skip
]


@pytest.fixture(scope="module")
def gemma():
    return sk.load_model("gemma3-270m")


def test_gemma_loads_dequantized_and_answers(gemma):
    model, tok = gemma
    assert model.config.model_type == "gemma3_text" and sk.num_layers(model) == 18 and sk.hidden_size(model) == 640
    assert next(model.parameters()).dtype == torch.float32
    row = sk.generate(model, tok, ["The capital of France is"], max_new_tokens=8, chat=False)[0]
    assert "France" in row["unsteered"] or "Paris" in row["unsteered"]


def test_capture_matches_hidden_states_and_extraction_separates(gemma):
    model, tok = gemma
    texts = ["I love this.", "I hate this.", "The weather is mild today."]
    acts = sk.capture(model, tok, texts, layers=[4, 9], position="last")
    batch = tok(texts[:1], return_tensors="pt")
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
    assert torch.allclose(acts[0, 0], states[5][0, -1], rtol=1e-4, atol=1e-4)  # layer i = hidden_states[i + 1]
    vec = sk.extract(model, tok, sk.load_pairs("sentiment"), layers=[4, 6, 9])
    assert max(vec.separation.values()) > 0.9


def test_steering_gemma_moves_sentiment_and_its_random_control_does_not(gemma):
    """The sentiment vector raises the next-token log-probability of " wonderful"; a random direction of the same
    norm does not (on Gemma it lowers it: a random push of that size disrupts the model), and steering changes
    the greedy text."""
    from steerkit.evals import next_token_logprobs

    model, tok = gemma
    vec = sk.extract(model, tok, sk.load_pairs("sentiment"), layers=[6])
    g = torch.Generator().manual_seed(0)
    random = sk.SteeringVector({6: torch.randn(640, generator=g) * vec[6].norm() / 640**0.5})
    prompts = ["I think that my day was", "Honestly, the movie felt"]
    good = tok(" wonderful", add_special_tokens=False)["input_ids"][0]
    base = next_token_logprobs(model, tok, prompts)[:, good]
    shifts = {}
    for name, direction in (("sentiment", vec), ("random", random)):
        with sk.steer(model, direction, alpha=1.0):
            shifts[name] = next_token_logprobs(model, tok, prompts)[:, good] - base
    assert shifts["sentiment"].mean() > 0.3 and shifts["sentiment"].mean() > shifts["random"].mean() + 0.5, shifts
    with sk.steer(model, vec, alpha=3.0):
        steered = sk.generate(model, tok, prompts, max_new_tokens=12, chat=False)
    assert [r["unsteered"] for r in steered] != [
        r["unsteered"] for r in sk.generate(model, tok, prompts, max_new_tokens=12, chat=False)
    ]


def test_an_sae_and_a_feature_vector_on_gemma(gemma, tmp_path):
    model, tok = gemma
    corpus = sk.load_corpus("default")
    sae = sk.train_sae(model, tok, corpus, 6, d_sae=1280, k=16, tokens=8192, batch_size=512, ctx_len=64,
                       buffer_tokens=4096, out=tmp_path / "sae", progress=False)  # fmt: skip
    metrics = sk.evaluate_sae(model, tok, sae, corpus=corpus, tokens=1024, ctx_len=64, progress=False)
    assert metrics["explained_variance"] > 0 and metrics["l0"] <= 16.5  # (a short run; the bench trains longer)
    latent = int(metrics["latent_frequency"].argmax())
    vec = sk.feature_vector(tmp_path / "sae", latent)
    assert vec.layers == [6] and torch.allclose(vec[6], sae.W_dec[latent].detach().float())
    prompts = ["The weather today is"]
    stream = sk.capture(model, tok, prompts, layers=[6], position="last", progress=False)[0, 0].norm()
    alpha = float(stream / vec[6].norm())  # a push the size of the residual stream at block 6 (Gemma's is large)
    with sk.steer(model, vec, alpha=alpha):
        steered = sk.generate(model, tok, prompts, max_new_tokens=8, chat=False)[0]["unsteered"]
    assert steered != sk.generate(model, tok, prompts, max_new_tokens=8, chat=False)[0]["unsteered"]


def test_bake_refuses_gemma_and_names_gguf_and_hooks(gemma, tmp_path):
    model, _ = gemma
    vec = sk.SteeringVector({6: torch.ones(640)})
    with pytest.raises(ValueError) as err:
        sk.bake("gemma3-270m", vec, 1.0, tmp_path / "baked")
    assert "gemma3" in str(err.value) and "export-gguf" in str(err.value) and "hook" in str(err.value)
    assert not (tmp_path / "baked").exists()
