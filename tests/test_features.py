"""SAE latents as behaviour: feature vectors, clamping, latents that separate pairs, and per-latent statistics,
each checked against an independent computation on tiny models and the embedded model."""

import pytest
import torch

import steerkit as sk
from steerkit.clamp import clamped
from tests.conftest import make_tiny


def _sae(d_in: int, d_sae: int, layer: int, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post"))
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        sae.W_dec.normal_(0, 1 / d_in**0.5)
        sae.b_enc.fill_(0.1)
    return sae


@pytest.fixture
def tiny_and_sae(tok):
    return make_tiny("llama", len(tok)), _sae(32, 48, 1)


def test_a_feature_vector_is_the_latents_decoder_rows_and_travels_like_a_vector(tiny_and_sae, tok, tmp_path):
    model, sae = tiny_and_sae
    vec = sk.feature_vector(sae, {3: 1.0, 7: -0.5})
    assert vec.layers == [1] and torch.allclose(vec[1], sae.W_dec[3].detach() - 0.5 * sae.W_dec[7].detach())
    assert vec.metadata["latents"] == {"3": 1.0, "7": -0.5} and vec.metadata["method"] == "sae_feature"
    ids = tok(["The cat sat on the mat."], return_tensors="pt")["input_ids"]
    by_hand = sk.SteeringVector({1: sae.W_dec[3].detach().clone()})
    with sk.steer(model, sk.feature_vector(sae, 3), alpha=2.0), torch.no_grad():
        steered = model(input_ids=ids).logits
    with sk.steer(model, by_hand, alpha=2.0), torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.allclose(steered, expected)
    back = sk.SteeringVector.load(vec.save(tmp_path / "f.safetensors"))
    assert back.metadata["latents"] == vec.metadata["latents"] and torch.equal(back[1], vec[1])
    assert torch.allclose(sk.SteeringVector.from_gguf(vec.to_gguf(tmp_path / "f.gguf"))[1], vec[1])
    with pytest.raises(ValueError, match="latents \\[48\\]: expected latent indices in 0..47"):
        sk.feature_vector(sae, [48])


def test_clamping_sets_the_latent_and_keeps_the_reconstruction_error(tiny_and_sae, tok):
    model, sae = tiny_and_sae
    h = torch.randn(2, 5, 32)
    out = clamped(sae, {4: 3.0})(h)
    acts = sae.encode(h)
    expected = h + (3.0 - acts[..., 4:5]) * sae.W_dec[4]
    assert torch.allclose(out, expected, atol=1e-6)
    after = acts.clone()
    after[..., 4] = 3.0
    error_before, error_after = h - sae.decode(acts), out - sae.decode(after)
    assert torch.allclose(error_before, error_after, atol=1e-5)  # the SAE's error stays in the stream
    ids = tok(["The cat sat on the mat."], return_tensors="pt")["input_ids"]
    with sk.splice(model, sae, clamp={4: 3.0}, skip_first=False, max_norm=float("inf")), torch.no_grad():
        spliced = model(input_ids=ids).logits
    with sk.steer(model, sk.feature_vector(sae, 4), alpha=3.0, mode="clamp_feature", sae=sae), torch.no_grad():
        steered = model(input_ids=ids).logits
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert torch.allclose(spliced, steered, atol=1e-5) and not torch.allclose(plain, steered, atol=1e-3)
    with pytest.raises(ValueError, match="needs a one-layer vector from steerkit.features.feature_vector"):
        with sk.steer(model, sk.SteeringVector({1: torch.ones(32)}), alpha=1.0, mode="clamp_feature", sae=sae):
            pass
    with pytest.raises(ValueError, match="clamp"):
        sk.splice(model, sae, clamp={99: 1.0})


def test_top_latents_finds_the_latent_that_reads_the_contrast(smollm):
    """An SAE whose latent 5 reads the sentiment direction (the rest random): it ranks first, held-out."""
    model, tok = smollm
    pairs = sk.load_pairs("sentiment")
    direction = sk.extract(model, tok, pairs, layers=[8])[8]
    sae = _sae(576, 32, 8, seed=1)
    with torch.no_grad():
        sae.W_enc[:, 5] = direction / direction.norm() * 0.5
    ranked = sk.top_latents(model, tok, sae, pairs, n=5)
    assert ranked[0]["latent"] == 5 and ranked[0]["auroc"] > 0.9 and ranked[0]["mean_diff"] > 0
    assert all(r["auroc"] <= ranked[0]["auroc"] for r in ranked)
    random_aurocs = [r["auroc"] for r in sk.top_latents(model, tok, sae, pairs, n=32) if r["latent"] != 5]
    assert sorted(random_aurocs)[len(random_aurocs) // 2] < 0.9  # the median random latent separates far less


def test_latent_stats_match_a_direct_count_and_their_contexts_rerun(tiny_and_sae, tok, default_corpus):
    model, sae = tiny_and_sae
    stats = sk.latent_stats(model, tok, sae, default_corpus, latents=[0, 3, 9], tokens=1024, top=3, window=4,
                            ctx_len=64, batch_size=8, progress=False)  # fmt: skip
    # the same held-out tokens, counted directly
    acts = []
    for batch in default_corpus.batches(tok, 64, 8, "heldout"):
        if sum(a.shape[0] for a in acts) >= 1024:
            break
        with sk.Recorder(model, [1]) as rec, torch.no_grad():
            model(input_ids=batch)
        acts.append(sae.encode(rec[1][:, 1:].reshape(-1, 32)).detach()[:, [0, 3, 9]])
    acts = torch.cat(acts)
    assert stats.tokens == acts.shape[0]
    assert torch.allclose(stats.frequency, (acts > 0).float().mean(0), atol=1e-6)
    assert torch.allclose(stats.max_activation, acts.max(0).values, atol=1e-5)
    assert stats.histogram.sum(1).tolist() == (acts > 0).sum(0).tolist()  # every firing lands in a bin
    for column, latent in enumerate([0, 3, 9]):
        contexts = stats.contexts[latent]
        assert contexts and abs(contexts[0]["activation"] - float(acts[:, column].max())) < 1e-5
        for c in contexts:  # the re-run window carries the streamed value at its peak
            assert abs(c["acts"][c["peak"]] - c["activation"]) < 1e-4 and len(c["tokens"]) == len(c["acts"])
    unembed = model.get_output_embeddings().weight.detach()
    best = (sae.W_dec[3].detach() @ unembed.T).topk(3).indices
    assert [t for t, _ in stats.logit_lens[3]["top"][:3]] == [tok.decode([int(i)]) for i in best]
