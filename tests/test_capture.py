import pytest
import torch

import steerkit as sk
from steerkit.capture import Recorder, StopForward
from tests.conftest import TEXTS, TINY


def _alone(model, tok, text):
    """Hidden states of one text run alone (no padding) through plain transformers."""
    ids = tok([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def _block_outputs(model, tok, text):
    """Block outputs of one text run alone, read with independent hooks (the last one included)."""
    outs = {}
    blocks = sk.get_blocks(model)
    hooks = [
        b.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, o[0] if isinstance(o, tuple) else o))
        for k, b in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            model(tok([text], return_tensors="pt")["input_ids"])
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_last_token_matches_hidden_states_every_arch(tiny, tok):
    layers = [0, 1, 2]
    acts = sk.capture(tiny, tok, TEXTS, layers, batch_size=3)
    assert acts.shape == (len(TEXTS), 3, TINY["hidden"]) and acts.dtype == torch.float32
    for n, text in enumerate(TEXTS):
        hs = _alone(tiny, tok, text)
        blocks = _block_outputs(tiny, tok, text)
        for j, layer in enumerate(layers):
            torch.testing.assert_close(acts[n, j], blocks[layer][0, -1], rtol=1e-4, atol=1e-5)
            if layer < 2:  # the last hidden_states entry carries the final norm
                torch.testing.assert_close(acts[n, j], hs[layer + 1][0, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_does_not_change_activations(tiny_llama, tok, side, monkeypatch):
    monkeypatch.setattr(tok, "padding_side", side)
    batched = sk.capture(tiny_llama, tok, TEXTS, [0, 2], position="mean", batch_size=4)
    for n, text in enumerate(TEXTS):
        alone = sk.capture(tiny_llama, tok, [text], [0, 2], position="mean")
        torch.testing.assert_close(batched[n], alone[0], rtol=1e-4, atol=1e-5)


def test_positions(tiny_llama, tok):
    layer = 1
    hs = [_alone(tiny_llama, tok, t)[layer + 1][0] for t in TEXTS]
    mean = sk.capture(tiny_llama, tok, TEXTS, [layer], position="mean")[:, 0]
    first = sk.capture(tiny_llama, tok, TEXTS, [layer], position=0)[:, 0]
    multi = [n for n, t in enumerate(TEXTS) if len(hs[n]) >= 2]
    second_last = sk.capture(tiny_llama, tok, [TEXTS[n] for n in multi], [layer], position=-2)[:, 0]
    every, rows = sk.capture(tiny_llama, tok, TEXTS, [layer], position="all")
    for n, h in enumerate(hs):
        torch.testing.assert_close(mean[n], h.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(first[n], h[0], rtol=1e-4, atol=1e-5)
        if n in multi:
            torch.testing.assert_close(second_last[multi.index(n)], h[-2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(every[rows == n, 0], h, rtol=1e-4, atol=1e-5)
    assert rows.tolist() == sorted(rows.tolist())  # texts in input order


def test_int_position_outside_a_text(tiny_llama, tok):
    with pytest.raises(ValueError, match=r"texts\[1\]"):  # "Hello" is one token
        sk.capture(tiny_llama, tok, TEXTS, [0], position=3)


def test_layer_order_and_duplicates_are_kept(tiny_llama, tok):
    acts = sk.capture(tiny_llama, tok, TEXTS[:2], [2, 0, 2])
    ref = sk.capture(tiny_llama, tok, TEXTS[:2], [0, 2])
    torch.testing.assert_close(acts[:, 0], ref[:, 1])
    torch.testing.assert_close(acts[:, 1], ref[:, 0])
    torch.testing.assert_close(acts[:, 2], ref[:, 1])


def test_forward_stops_after_deepest_layer(tiny_llama, tok):
    calls = []
    blocks = sk.get_blocks(tiny_llama)
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(blocks)]
    hooks.append(tiny_llama.lm_head.register_forward_hook(lambda m, i, o: calls.append("lm_head")))
    try:
        sk.capture(tiny_llama, tok, TEXTS, [0], batch_size=len(TEXTS))
        assert calls == [0]
        calls.clear()
        sk.capture(tiny_llama, tok, TEXTS, [2], batch_size=len(TEXTS))
        assert calls == [0, 1, 2]  # the final norm and LM head never run
    finally:
        for h in hooks:
            h.remove()


def _n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_when_forward_raises(tiny_llama, tok):
    before = _n_hooks(tiny_llama)

    def boom(module, inputs, output):
        raise RuntimeError("boom")

    handle = sk.get_blocks(tiny_llama)[0].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sk.capture(tiny_llama, tok, TEXTS, [1, 2])
    finally:
        handle.remove()
    assert _n_hooks(tiny_llama) == before


def test_recorder_records_and_stops(tiny_llama, tok):
    ids = tok(TEXTS[:1], return_tensors="pt")["input_ids"]
    before = _n_hooks(tiny_llama)  # transformers keeps some hooks of its own
    with Recorder(tiny_llama, [1]) as rec:
        out = tiny_llama(ids, output_hidden_states=True)
    torch.testing.assert_close(rec[1], out.hidden_states[2])
    reached = []
    with Recorder(tiny_llama, [0], stop=True) as rec:
        tiny_llama(ids)
        reached.append("after")  # skipped: the forward ended with StopForward
    assert reached == [] and rec[0].shape == (1, ids.shape[1], TINY["hidden"])
    assert _n_hooks(tiny_llama) == before
    with pytest.raises(KeyError, match="nothing recorded"):
        with Recorder(tiny_llama, [0]) as rec:
            pass
        rec[0]
    assert issubclass(StopForward, Exception)


def test_recorder_concatenates_kv_cache_generation(tiny_llama, tok):
    ids = tok(TEXTS[:1], return_tensors="pt")["input_ids"]
    with Recorder(tiny_llama, [2]) as rec, torch.no_grad():
        out = tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert rec[2].shape[1] == out.shape[1] - 1  # every position but the last generated token


def test_activations_are_float32_cpu_for_bf16_model(tok):
    from tests.conftest import make_tiny

    model = make_tiny("qwen2", len(tok), seed=1).to(torch.bfloat16)
    acts = sk.capture(model, tok, TEXTS, [1])
    assert acts.dtype == torch.float32 and acts.device.type == "cpu"


def test_bad_input(tiny_llama, tok):
    with pytest.raises(ValueError, match="empty"):
        sk.capture(tiny_llama, tok, [], [0])
    with pytest.raises(TypeError, match="not one string"):
        sk.capture(tiny_llama, tok, "just a string", [0])
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        sk.capture(tiny_llama, tok, ["fine", ""], [0])
    with pytest.raises(ValueError, match=r"layer 7 is out of range: this model has blocks 0\.\.2"):
        sk.capture(tiny_llama, tok, TEXTS, [0, 7])
    with pytest.raises(ValueError, match="layers is empty"):
        sk.capture(tiny_llama, tok, TEXTS, [])
    with pytest.raises(ValueError, match="position='first'"):
        sk.capture(tiny_llama, tok, TEXTS, [0], position="first")
    with pytest.raises(ValueError, match="batch_size"):
        sk.capture(tiny_llama, tok, TEXTS, [0], batch_size=0)


def test_tokenizer_without_pad_token(tiny_llama, tok):
    import copy

    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    assert no_pad.pad_token is None
    acts = sk.capture(tiny_llama, no_pad, TEXTS, [1], batch_size=4)
    torch.testing.assert_close(acts, sk.capture(tiny_llama, tok, TEXTS, [1], batch_size=1))
    assert no_pad.pad_token is None  # the caller's tokenizer is left as it was


def test_texts_longer_than_context(tiny_llama, tok):
    long_text = " ".join(["word"] * (TINY["ctx"] + 20))
    with pytest.raises(ValueError, match=r"exceed the context of 128 tokens.*truncate=True"):
        sk.capture(tiny_llama, tok, [TEXTS[0], long_text], [0])
    with pytest.warns(UserWarning, match="truncated 1 text"):
        acts = sk.capture(tiny_llama, tok, [TEXTS[0], long_text], [0], truncate=True)
    assert acts.shape == (2, 1, TINY["hidden"])
    with pytest.raises(ValueError, match="exceed the context of 4 tokens"):
        sk.capture(tiny_llama, tok, TEXTS, [0], max_length=4)
