"""The shared file helpers: atomic writes and the line-numbered jsonl reader."""

import pytest

from steerkit._io import atomic_path, iter_jsonl


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_iter_jsonl_parses_skips_blank_lines_and_names_the_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(iter_jsonl(path, lambda row: row["a"], "an 'a'")) == [1, 2]
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: expected an 'a' \(got a JSON list\)"):
        list(iter_jsonl(path, lambda row: row["a"], "an 'a'"))
    path.write_text('{"a": 1}\n{"b": 1}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: expected an 'a'"):
        list(iter_jsonl(path, lambda row: row["a"], "an 'a'"))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: expected"):
        list(iter_jsonl(path, lambda row: row["a"], "an 'a'"))
