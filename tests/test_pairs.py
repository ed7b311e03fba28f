import json

import pytest

import steerkit as sk
from steerkit.data import pairs_hash


@pytest.mark.parametrize("name", ["sentiment", "concise", "reasoning", "truthful"])
def test_bundled_sets(name):
    pairs = sk.load_pairs(name)
    assert len(pairs) >= 64
    test = sk.load_pairs(name, split="test")
    train = sk.load_pairs(name, split="train")
    assert len(test) >= 12 and len(train) + len(test) == len(pairs)
    assert not {(p.positive, p.negative) for p in test} & {(p.positive, p.negative) for p in train}
    assert all(p.positive != p.negative for p in pairs)


def test_bundled_names():
    assert {"sentiment", "concise", "reasoning", "truthful"} <= set(sk.bundled_sets())


def test_user_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"positive": f"good {i}", "negative": f"bad {i}"} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = sk.load_pairs(path)
    assert [p.positive for p in pairs] == ["good 0", "good 1", "good 2"]
    assert all(p.split == "train" for p in pairs)


@pytest.mark.parametrize(
    "line, why",
    [
        ("{not json", "JSON"),
        ('{"positive": "only one side"}', "negative"),
        ('{"positive": "a", "negative": ""}', "negative"),
        ('{"positive": "a", "negative": "b", "split": "dev"}', "split"),
        ('["a", "b"]', "JSON object"),
    ],
)
def test_malformed_line_is_named(tmp_path, line, why):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"positive": "a", "negative": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2") as err:
        sk.load_pairs(path)
    assert why in str(err.value)


def test_empty_and_one_sided(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        sk.load_pairs(path)
    same = tmp_path / "same.jsonl"
    same.write_text('{"positive": "x", "negative": "x"}\n')
    with pytest.raises(ValueError, match="nothing to contrast"):
        sk.load_pairs(same)
    with pytest.raises(FileNotFoundError, match="bundled sets are"):
        sk.load_pairs("no-such-set")
    with pytest.raises(ValueError, match="split="):
        sk.load_pairs("sentiment", split="dev")


def test_pairs_hash_changes_with_content():
    a = [sk.Pair("x", "y")]
    assert pairs_hash(a) == pairs_hash([sk.Pair("x", "y")])
    assert pairs_hash(a) != pairs_hash([sk.Pair("x", "z")])


def test_persona_pairs_use_chat_template(tok):
    pairs = sk.persona_pairs(
        tok,
        ["a joyful person", "an optimist"],
        ["a miserable person", "a pessimist"],
        ["Today I", "The weather is", "My job"],
    )
    assert len(pairs) == 6
    first = pairs[0]
    assert "<|im_start|>user" in first.positive and "a joyful person" in first.positive
    assert first.positive.endswith("<|im_start|>assistant\nToday I")
    assert "a miserable person" in first.negative and first.negative.endswith("Today I")
    assert [p.split for p in pairs].count("test") == 1
    with pytest.raises(ValueError, match="equal length"):
        sk.persona_pairs(tok, ["a"], [], ["x"])
