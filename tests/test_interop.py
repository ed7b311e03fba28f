"""Neighbours' objects: steering-vectors (the real package), repeng (through the GGUF file repeng itself wrote),
pairs as tuples, and the ``vec.apply`` habit."""

import json
from pathlib import Path

import pytest
import steering_vectors
import torch

import steerkit as sk
from tests.conftest import make_tiny

DATA = Path(__file__).resolve().parent / "data"
PAIRS = [
    ("I love this wonderful day.", "I hate this awful day."),
    ("What a delightful surprise!", "What a dreadful surprise!"),
    ("The food was fantastic.", "The food was terrible."),
    ("She smiled with joy.", "She frowned in misery."),
]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_steering_vectors_vector_steers_the_same_through_steerkit(tok):
    model = make_tiny("llama", len(tok))
    theirs = steering_vectors.train_steering_vector(model, tok, PAIRS, layers=[0, 2], show_progress=False)
    ids = tok(["Tell me about your day."], return_tensors="pt")["input_ids"]
    with theirs.apply(model, multiplier=2.0):
        expected = _logits(model, ids)
    with sk.steer(model, theirs, alpha=2.0):  # their object, directly
        direct = _logits(model, ids)
    ours = sk.SteeringVector.from_steering_vectors(theirs)
    with ours.apply(model, 2.0):  # their habit, our vector
        applied = _logits(model, ids)
    assert ours.layers == [0, 2]
    torch.testing.assert_close(direct, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(applied, expected, rtol=1e-5, atol=1e-5)
    assert (expected - _logits(model, ids)).abs().max() > 1e-3  # it does steer
    theirs.layer_type = "mlp"
    with pytest.raises(ValueError, match="decoder-block outputs"):
        sk.SteeringVector.from_steering_vectors(theirs)


def test_a_repeng_control_vector_reads_as_repeng_wrote_it(tmp_path):
    """tests/data/repeng_sentiment.gguf was written by repeng 0.4.0 itself (scripts/make_repeng_fixture.py)."""
    vec = sk.SteeringVector.load(DATA / "repeng_sentiment.gguf")
    expected = json.loads((DATA / "repeng_sentiment.json").read_text())
    assert vec.layers == sorted(int(k) for k in expected["layers"]) and vec.metadata["model_hint"] == "llama"
    for layer, numbers in expected["layers"].items():
        assert vec[int(layer)][:4].tolist() == pytest.approx(numbers["first"], abs=1e-7)
        assert float(vec[int(layer)].sum()) == pytest.approx(numbers["sum"], abs=1e-4)
    vec.to_gguf(tmp_path / "again.gguf")
    assert all(torch.equal(sk.SteeringVector.load(tmp_path / "again.gguf")[i], vec[i]) for i in vec.layers)


def test_repeng_objects_convert_by_their_fields():
    """repeng cannot import beside NumPy 2; its ControlVector is a dataclass of (model_type, directions)."""
    import numpy as np

    class ControlVector:  # the fields of repeng.ControlVector
        __module__ = "repeng.extract"

        def __init__(self, model_type, directions):
            self.model_type, self.directions = model_type, directions

    cv = ControlVector("llama", {3: np.arange(32, dtype=np.float32)})
    vec = sk.vector.as_vector(cv)
    assert vec.layers == [3] and vec.metadata["method"] == "repeng" and torch.equal(vec[3], torch.arange(32.0))
    with pytest.raises(TypeError, match="not a steering vector"):
        sk.vector.as_vector({"3": [1.0]})


def test_pairs_as_tuples_and_bake_takes_neighbours(tok, tmp_path):
    model = make_tiny("llama", len(tok))
    from_tuples = sk.extract(model, tok, PAIRS * 2, layers=[1])
    from_pairs = sk.extract(model, tok, [sk.Pair(p, n) for p, n in PAIRS * 2], layers=[1])
    assert torch.equal(from_tuples[1], from_pairs[1])
    with pytest.raises(TypeError, match="expected a steerkit.Pair or a"):
        sk.extract(model, tok, ["just one text"], layers=[1])
    theirs = steering_vectors.train_steering_vector(model, tok, PAIRS, layers=[1], show_progress=False)
    model.save_pretrained(tmp_path / "base")
    out = sk.bake(tmp_path / "base", theirs, 1.0, tmp_path / "baked")
    assert (out / "config.json").is_file()
