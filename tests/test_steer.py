import math

import pytest
import torch

import steerkit as sk
from steerkit.batching import pad_batch
from tests.conftest import TEXTS, TINY, make_tiny

D = TINY["hidden"]


def _vector(layers=(1,), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return sk.SteeringVector({layer: scale * torch.randn(D, generator=g) for layer in layers})


def _batch(tok, texts, side):
    ids = tok(texts)["input_ids"]
    input_ids, mask, _ = pad_batch(ids, tok.pad_token_id, side)
    return input_ids, mask


def _record(model, layer, input_ids, mask, **kwargs):
    with torch.no_grad(), sk.Recorder(model, [layer]) as rec:
        model(input_ids=input_ids, attention_mask=mask, **kwargs)
    return rec[layer]


@pytest.mark.parametrize("side", ["left", "right"])
def test_add_on_every_row_and_never_on_padding(tiny, tok, side):
    vec = _vector()
    input_ids, mask = _batch(tok, TEXTS, side)
    plain = _record(tiny, 1, input_ids, mask)
    with sk.steer(tiny, vec, alpha=2.0):
        steered = _record(tiny, 1, input_ids, mask)
    delta = steered - plain
    real = mask.bool()
    torch.testing.assert_close(delta[real], (2.0 * vec[1]).expand(int(real.sum()), D), rtol=1e-4, atol=1e-4)
    assert delta[~real].abs().max() == 0  # padding untouched


def test_hooks_removed_and_weights_untouched(tiny_llama, tok):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_llama.modules())
    input_ids, mask = _batch(tok, TEXTS, "right")
    with pytest.raises(RuntimeError, match="inside"):
        with sk.steer(tiny_llama, _vector(layers=(0, 2)), alpha=3.0):
            tiny_llama(input_ids=input_ids, attention_mask=mask)
            raise RuntimeError("inside")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_llama.modules()) == n_hooks
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_project_out_clamp_preserve_norm(tiny_llama, tok):
    vec = _vector()
    unit = vec[1] / vec[1].norm()
    input_ids, mask = _batch(tok, TEXTS, "right")
    real = mask.bool()
    plain = _record(tiny_llama, 1, input_ids, mask)
    with sk.steer(tiny_llama, vec, mode="project_out"):
        out = _record(tiny_llama, 1, input_ids, mask)
    assert (out[real] @ unit).abs().max() < 1e-4
    with sk.steer(tiny_llama, vec, alpha=-1.5, mode="clamp"):
        out = _record(tiny_llama, 1, input_ids, mask)
    torch.testing.assert_close(out[real] @ unit, torch.full((int(real.sum()),), -1.5), rtol=1e-4, atol=1e-4)
    with sk.steer(tiny_llama, vec, alpha=5.0, preserve_norm=True):
        out = _record(tiny_llama, 1, input_ids, mask)
    torch.testing.assert_close(out[real].norm(dim=-1), plain[real].norm(dim=-1), rtol=1e-4, atol=1e-4)
    assert (out - plain)[real].abs().max() > 1e-2


def test_int_start_counts_real_tokens(tiny_llama, tok):
    vec = _vector()
    input_ids, mask = _batch(tok, TEXTS, "left")
    plain = _record(tiny_llama, 1, input_ids, mask)
    with sk.steer(tiny_llama, vec, alpha=1.0, positions=2):
        out = _record(tiny_llama, 1, input_ids, mask)
    changed = (out - plain).abs().amax(-1) > 0
    real_index = mask.cumsum(-1) - 1
    assert torch.equal(changed, mask.bool() & (real_index >= 2))


def test_several_vectors_and_nesting_equal_the_sum(tiny_llama, tok):
    a, b = _vector(layers=(0, 1), seed=1), _vector(layers=(1, 2), seed=2)
    input_ids, mask = _batch(tok, TEXTS, "right")

    def logits():
        with torch.no_grad():
            return tiny_llama(input_ids=input_ids, attention_mask=mask).logits

    with sk.steer(tiny_llama, a + b * 0.5):
        expected = logits()
    with sk.steer(tiny_llama, [a, b], alpha=[1.0, 0.5]):
        together = logits()
    with sk.steer(tiny_llama, a), sk.steer(tiny_llama, b, alpha=0.5):
        nested = logits()
    torch.testing.assert_close(together, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nested, expected, rtol=1e-4, atol=1e-4)
    with sk.steer(tiny_llama, a, layers=[1]):
        only_one = logits()
    with sk.steer(tiny_llama, a.select([1])):
        torch.testing.assert_close(logits(), only_one)


def _generate(model, tok, prompts, use_cache, **kw):
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0, **kw)


def test_generated_positions_under_kv_cache(tiny_llama, tok):
    vec = _vector(layers=(1,), scale=4.0)
    prompts = TEXTS[:3]
    plain = _generate(tiny_llama, tok, prompts, True)
    with sk.steer(tiny_llama, vec, positions="generated"):
        cached = _generate(tiny_llama, tok, prompts, True)
    with sk.steer(tiny_llama, vec, positions="generated"):
        uncached = _generate(tiny_llama, tok, prompts, False)
    with sk.steer(tiny_llama, vec, positions="all"):
        everywhere = _generate(tiny_llama, tok, prompts, True)
    prompt_len = tok(prompts, return_tensors="pt", padding=True)["input_ids"].shape[1]
    assert torch.equal(cached, uncached)  # absolute positions, not the step's length
    # the first new token comes from prompt positions only: unsteered
    assert torch.equal(cached[:, prompt_len], plain[:, prompt_len])
    assert not torch.equal(cached, plain) and not torch.equal(everywhere, cached)


def test_prompt_positions_only(tiny_llama, tok):
    vec = _vector(layers=(1,), scale=4.0)
    input_ids, mask = _batch(tok, TEXTS[:2], "left")
    with sk.steer(tiny_llama, vec, positions="prompt"):
        out = _record(tiny_llama, 1, input_ids, mask)
    plain = _record(tiny_llama, 1, input_ids, mask)
    assert torch.equal((out - plain).abs().amax(-1) > 0, mask.bool())  # one forward: all of it is prompt


def test_bf16_model(tok):
    model = make_tiny("gemma2", len(tok), seed=3).to(torch.bfloat16)
    input_ids, mask = _batch(tok, TEXTS, "right")
    plain = _record(model, 1, input_ids, mask)
    with sk.steer(model, _vector(), alpha=1.0):
        out = _record(model, 1, input_ids, mask)
    assert out.dtype == torch.bfloat16 and (out - plain).abs().max() > 0.1


def test_bad_input(tiny_llama):
    vec = _vector()
    n_hooks = sum(len(m._forward_hooks) for m in sk.get_blocks(tiny_llama))  # transformers may own some
    for alpha in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="alpha=.*finite"):
            with sk.steer(tiny_llama, vec, alpha=alpha):
                pass
    wide = sk.SteeringVector({1: torch.ones(D * 2)}, {"model": {"name": "other-model"}})
    with pytest.raises(ValueError, match=rf"width {2 * D} \(from other-model\).*hidden size {D}"):
        with sk.steer(tiny_llama, wide):
            pass
    deep = sk.SteeringVector({7: torch.ones(D)})
    with pytest.raises(ValueError, match="layer 7 but the model has only 3 blocks"):
        with sk.steer(tiny_llama, deep):
            pass
    with pytest.raises(ValueError, match="mode="):
        with sk.steer(tiny_llama, vec, mode="multiply"):
            pass
    with pytest.raises(ValueError, match="positions="):
        with sk.steer(tiny_llama, vec, positions="middle"):
            pass
    with pytest.raises(ValueError, match=r"layers \[2\] are not in the vector"):
        with sk.steer(tiny_llama, vec, layers=[2]):
            pass
    with pytest.raises(ValueError, match="one alpha per vector"):
        with sk.steer(tiny_llama, [vec, vec], alpha=[1.0]):
            pass
    assert sum(len(m._forward_hooks) for m in sk.get_blocks(tiny_llama)) == n_hooks


def test_generate_side_by_side(tiny_llama, tok):
    vec = _vector(scale=10.0)
    rows = sk.generate(tiny_llama, tok, ["Hi there", "Tell me"], vector=vec, alpha=1.0, max_new_tokens=5)
    assert [r["prompt"] for r in rows] == ["Hi there", "Tell me"]
    assert all(set(r) == {"prompt", "unsteered", "steered"} for r in rows)
    assert any(r["steered"] != r["unsteered"] for r in rows)
    zero = sk.generate(tiny_llama, tok, ["Hi there"], vector=vec, alpha=0.0, max_new_tokens=5)
    assert zero[0]["steered"] == zero[0]["unsteered"]
    with pytest.raises(ValueError, match="finite"):
        sk.generate(tiny_llama, tok, ["Hi"], vector=vec, alpha=float("nan"))
    with pytest.raises(ValueError, match="prompts is empty"):
        sk.generate(tiny_llama, tok, [], vector=vec)


@pytest.mark.slow
def test_sentiment_vector_changes_the_embedded_models_text(smollm):
    model, tok = smollm
    vec = sk.extract(model, tok, sk.load_pairs("sentiment"), layers=[10])
    prompts = ["Describe your morning.", "How was the movie?"]
    rows = sk.generate(model, tok, prompts, vector=vec, alpha=1.0, max_new_tokens=16)
    assert all(r["steered"] != r["unsteered"] for r in rows)
    same = sk.generate(model, tok, prompts[:1], vector=vec, alpha=0.0, max_new_tokens=16)
    assert same[0]["steered"] == same[0]["unsteered"]
