import pytest
import torch

import steerkit as sk
from steerkit.extract import auroc, direction, split_pairs
from tests.conftest import TINY


def _planted(n=40, d=16, seed=0):
    """Paired activations that differ along one known unit direction u, with noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    base = torch.randn(n, d, generator=g) * 3
    pos = base + 2.0 * u + 0.3 * torch.randn(n, d, generator=g)
    neg = base - 2.0 * u + 0.3 * torch.randn(n, d, generator=g)
    return pos, neg, u


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff", "pca_center", "probe"])
def test_methods_recover_the_planted_direction(method):
    pos, neg, u = _planted()
    vec, _ = direction(pos, neg, method)
    assert _cos(vec, u) > (0.85 if method == "probe" else 0.9)  # oriented: positives project higher
    assert float(vec.norm()) == pytest.approx(float((pos - neg).mean(0).norm()), rel=1e-4)


def test_orientation_follows_the_pairs_not_the_svd_sign():
    pos, neg, u = _planted(seed=3)
    for method in ("pca_diff", "pca_center", "probe"):
        forward, _ = direction(pos, neg, method)
        backward, _ = direction(neg, pos, method)
        assert _cos(forward, u) > 0.85 and _cos(backward, u) < -0.85


def test_mean_diff_and_mean_positive_are_means():
    pos, neg, _ = _planted()
    torch.testing.assert_close(direction(pos, neg, "mean_diff")[0], (pos - neg).mean(0))
    torch.testing.assert_close(direction(pos, neg, "mean_positive")[0], pos.mean(0))


def test_pca_diff_is_uncentred():
    # every difference is the same vector: a centred PCA would see nothing; the uncentred one finds it
    u = torch.tensor([1.0, 2.0, -2.0, 0.0])
    neg = torch.randn(10, 4)
    vec, explained = direction(neg + u, neg, "pca_diff")
    assert _cos(vec, u) == pytest.approx(1, abs=1e-5) and explained == pytest.approx(1, abs=1e-6)


def test_auroc_hand_values():
    assert auroc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.875)
    assert auroc(torch.tensor([1.0]), torch.tensor([2.0])) == 0.0
    assert auroc(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0, 3.0])) == 1.0


def test_split_pairs():
    pairs = [sk.Pair(f"p{i}", f"n{i}") for i in range(10)]
    train, test = split_pairs(pairs)
    assert [p.positive for p in test] == ["p4", "p9"] and len(train) == 8
    marked = [sk.Pair("a", "b", "test"), sk.Pair("c", "d")]
    assert split_pairs(marked) == ([marked[1]], [marked[0]])
    with pytest.raises(ValueError, match="no training pairs"):
        split_pairs([sk.Pair("a", "b", "test")])


def test_extract_on_tiny_model_matches_capture(tiny_llama, tok):
    pairs = [sk.Pair(f"I love item {i}, it is great", f"I hate item {i}, it is awful") for i in range(10)]
    vec = sk.extract(tiny_llama, tok, pairs, layers=[0, 2])
    train, test = split_pairs(pairs)
    pos = sk.capture(tiny_llama, tok, [p.positive for p in train], [0, 2])
    neg = sk.capture(tiny_llama, tok, [p.negative for p in train], [0, 2])
    torch.testing.assert_close(vec[2], (pos - neg)[:, 1].mean(0), rtol=1e-4, atol=1e-5)
    assert vec.layers == [0, 2] and set(vec.separation) == {0, 2}
    assert all(0 <= s <= 1 for s in vec.separation.values())
    meta = vec.metadata
    assert meta["method"] == "mean_diff" and meta["n_train"] == 8 and meta["n_test"] == 2
    assert meta["model"]["hidden_size"] == TINY["hidden"] and meta["model"]["num_hidden_layers"] == 3


def test_extract_all_methods_and_default_layers(tiny_llama, tok):
    pairs = [sk.Pair(f"good {i} day", f"bad {i} day") for i in range(6)]
    for method in sk.METHODS:
        vec = sk.extract(tiny_llama, tok, pairs, method=method)
        assert vec.layers == [0, 1, 2] and vec.metadata["method"] == method
        if method.startswith("pca"):
            assert set(vec.metadata["explained_variance"]) == {0, 1, 2}


def test_extract_bad_input(tiny_llama, tok):
    with pytest.raises(ValueError, match="method='svd'"):
        sk.extract(tiny_llama, tok, [sk.Pair("a", "b")], method="svd")
    with pytest.raises(ValueError, match="empty"):
        sk.extract(tiny_llama, tok, [], layers=[0])
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        sk.extract(tiny_llama, tok, [sk.Pair("a", "b")], layers=[9])


@pytest.mark.slow
def test_sentiment_separates_on_the_embedded_model(smollm):
    model, tok = smollm
    vec = sk.extract(model, tok, sk.load_pairs("sentiment"), layers=[6, 10, 14])
    assert min(vec.separation.values()) >= 0.9
    assert vec.metadata["model"]["name"] == "smollm2-135m-instruct"
