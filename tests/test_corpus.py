"""Corpora: local files, dataset directories, the embedded default, splits and packing."""

import json

import pytest

from steerkit.data import corpus as corpus_mod
from steerkit.data.corpus import Corpus, clean_docstring, is_heldout, load_corpus

DOCS = [f"Document number {i} talks about the weather, the sea and the mountains of region {i}." for i in range(60)]


def _txt(tmp_path, docs=DOCS):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def test_txt_documents_and_splits(tmp_path):
    corpus = load_corpus(_txt(tmp_path))
    train, held = list(corpus.documents("train")), list(corpus.documents("heldout"))
    assert sorted(train + held) == sorted(DOCS)
    assert held == [d for d in DOCS if is_heldout(d)] and 0 < len(held) < len(DOCS) // 4
    with pytest.raises(ValueError, match="split='test'"):
        list(corpus.documents("test"))


def test_packing_separators_and_skip(tmp_path, tok):
    corpus = load_corpus(_txt(tmp_path))
    seqs = list(corpus.sequences(tok, ctx_len=16))
    assert all(s.shape == (16,) for s in seqs)
    flat = [t for s in seqs for t in s.tolist()]
    expected = []
    for doc in corpus.documents("train"):
        expected += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert flat == expected[: len(flat)] and len(expected) - len(flat) < 16
    assert [s.tolist() for s in corpus.sequences(tok, ctx_len=16, skip=3)] == [s.tolist() for s in seqs[3:]]
    batches = list(corpus.batches(tok, ctx_len=16, batch_size=4))
    assert batches[0].shape == (4, 16) and sum(b.shape[0] for b in batches) == len(seqs)


def test_jsonl_and_errors(tmp_path, tok):
    good = tmp_path / "c.jsonl"
    good.write_text("\n".join(json.dumps({"body": d}) for d in DOCS[:5]) + "\n")
    assert list(load_corpus(good, text_field="body").documents("train")) == [d for d in DOCS[:5] if not is_heldout(d)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\nnot json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(load_corpus(bad).documents())
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        next(load_corpus(empty).sequences(tok))
    short = _txt(tmp_path, ["Just a few words here."] * 3)
    with pytest.raises(ValueError, match="fewer than 128 tokens"):
        next(load_corpus(short).sequences(tok))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="ctx_len"):
        next(load_corpus(_txt(tmp_path)).sequences(tok, ctx_len=1))


def test_dataset_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(pa.table({"text": DOCS[:20], "n": list(range(20))}), folder / "train.parquet")
    docs = list(load_corpus(folder).documents("train")) + list(load_corpus(folder).documents("heldout"))
    assert sorted(docs) == sorted(DOCS[:20])
    with pytest.raises(ValueError, match="no 'body' column"):
        list(load_corpus(folder, text_field="body").documents())


def test_clean_docstring_keeps_prose_only():
    doc = """Return the frobnicated value of the input, rounded to the nearest integer.

    >>> frob(3)
    4

    Example::

        x = frob(2)
        print(x)

    Parameters
    ----------
    x : int

    The result is always positive, and it never exceeds twice the value of the argument given.
    """
    import inspect

    text = clean_docstring(inspect.cleandoc(doc))
    assert text.split("\n\n") == [
        "Return the frobnicated value of the input, rounded to the nearest integer.",
        "The result is always positive, and it never exceeds twice the value of the argument given.",
    ]


def test_build_default_documents_from_a_folder(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "tests").mkdir(parents=True)
    prose = (
        "This module explains how the little library reads its many files, keeps them in a sensible order, "
        "and writes them back again."
    )
    (pkg / "a.py").write_text(f'"""{prose}"""\n\ndef f():\n    """{prose}"""\n')
    (pkg / "tests" / "t.py").write_text('"""A test module that should never be read into the corpus at all, ever."""')
    docs = corpus_mod.build_default_documents(roots=[pkg], progress=False)
    assert prose in docs and all("test module" not in d for d in docs)
    assert docs.count(prose) == 1  # deduplicated


def test_default_corpus_is_large_enough(default_corpus, tok):
    assert isinstance(default_corpus, Corpus) and default_corpus.fingerprint
    assert corpus_mod.default_corpus_path().is_file()
    assert default_corpus.count_tokens(tok, "train") >= 2_000_000
    assert default_corpus.count_tokens(tok, "heldout") >= 50_000
