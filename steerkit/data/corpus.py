"""Text corpora for SAE training: local files, Hugging Face datasets, and an embedded offline default.

A ``Corpus`` yields documents of a split (``"train"`` or ``"heldout"``: a document is held out when a
hash of its text falls in the last 5%, so the split is the same whatever the order or the source) and
packs them into token sequences of one length, documents separated by the tokenizer's EOS token.

The embedded default is English prose from the docstrings of Python's standard library and of the
installed packages (plus the language reference in ``pydoc_data``), with code, doctests and tables
removed. It is built once (about a minute) and cached as jsonl under ``$STEERKIT_CACHE/corpus``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steerkit._io import atomic_path, iter_jsonl, read_text
from steerkit.models import cache_root

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 5
DEFAULT_NAME = "default"
_FORMAT = 1  # bump when the cleaning rules change: the cached file is rebuilt


def is_heldout(text: str) -> bool:
    """Whether a document belongs to the held-out split (5% of documents, by a hash of their text)."""
    return zlib.crc32(text.encode("utf-8")) % 100 < HELDOUT_PERCENT


class Corpus:
    """Documents of a text source, split into train / heldout, and packed into token sequences."""

    def __init__(
        self,
        name: str,
        documents: Callable[[], Iterable[str]],
        fingerprint: str | None = None,
        source: Path | None = None,
    ):
        self.name = name
        self._documents = documents
        self.fingerprint = fingerprint
        self.source = source  # the file or folder it reads, if any (an output must never replace it)

    def __repr__(self) -> str:
        return f"Corpus({self.name!r})"

    def documents(self, split: str = "train") -> Iterator[str]:
        """The non-empty documents of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        want = split == "heldout"
        for text in self._documents():
            if isinstance(text, str) and text.strip() and is_heldout(text) == want:
                yield text

    def sequences(
        self, tok, ctx_len: int = 128, split: str = "train", skip: int = 0, shard: tuple[int, int] = (0, 1)
    ) -> Iterator[torch.Tensor]:
        """Packed token sequences ``[ctx_len]`` (int64) of ``split``; ``skip`` drops the first ones (resume).

        ``shard=(rank, world)`` keeps sequences ``rank, rank + world, ...``: disjoint shares for data-parallel
        ranks (``skip`` counts sequences of the whole stream). Raises ValueError if the split holds no text at
        all, so an empty file fails at once.
        """
        rank, size = shard
        if not isinstance(ctx_len, int) or ctx_len < 2:
            raise ValueError(f"ctx_len={ctx_len!r}: expected an int >= 2")
        sep = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
        buffer: list[int] = []
        produced = 0
        any_text = False
        for text in self.documents(split):
            any_text = True
            buffer += tok(text, add_special_tokens=False)["input_ids"]
            if sep is not None:
                buffer.append(sep)
            while len(buffer) >= ctx_len:
                chunk, buffer = buffer[:ctx_len], buffer[ctx_len:]
                if produced >= skip and produced % size == rank:
                    yield torch.tensor(chunk, dtype=torch.long)
                produced += 1
        if not any_text:
            raise ValueError(f"corpus {self.name!r} has no text in split {split!r}")
        if produced == 0:
            raise ValueError(f"corpus {self.name!r} ({split}) holds fewer than {ctx_len} tokens")

    def batches(
        self,
        tok,
        ctx_len: int = 128,
        batch_size: int = 32,
        split: str = "train",
        skip: int = 0,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[torch.Tensor]:
        """Packed sequences stacked ``[batch_size, ctx_len]``; the last batch may be smaller."""
        rows: list[torch.Tensor] = []
        for seq in self.sequences(tok, ctx_len, split, skip, shard):
            rows.append(seq)
            if len(rows) == batch_size:
                yield torch.stack(rows)
                rows = []
        if rows:
            yield torch.stack(rows)

    def count_tokens(self, tok, split: str = "train") -> int:
        """Tokens of ``split`` (documents plus one separator each)."""
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in self.documents(split))


def load_corpus(name_or_path: str | Path = DEFAULT_NAME, text_field: str = "text") -> Corpus:
    """A corpus from ``"default"`` (embedded, offline), a ``.txt`` / ``.jsonl`` file, a directory of such
    files or of a saved/streamable dataset, or a Hugging Face dataset name (streamed; needs the hub).

    ``.txt``: documents are separated by blank lines. ``.jsonl``: one ``{text_field: ...}`` per line.
    """
    if str(name_or_path) == DEFAULT_NAME:
        return _default_corpus()
    path = Path(name_or_path)
    if path.is_file():
        return Corpus(str(path), lambda: _file_documents(path, text_field), _file_hash(path), source=path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if files:
            return Corpus(str(path), lambda: (d for f in files for d in _file_documents(f, text_field)), source=path)
        return Corpus(str(path), lambda: _dataset_documents(str(path), text_field), source=path)
    if path.suffix in (".txt", ".jsonl") or path.is_absolute() or str(name_or_path).startswith("."):
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist")
    return Corpus(str(name_or_path), lambda: _dataset_documents(str(name_or_path), text_field))


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path, lambda row: row[text_field], f"a JSON object with a {text_field!r} string")
    else:
        text = read_text(path, "corpus file")
        yield from (block.strip() for block in re.split(r"\n\s*\n", text) if block.strip())


def _dataset_documents(name: str, text_field: str) -> Iterator[str]:
    """Stream the ``train`` split of a Hugging Face dataset (a hub name, or a local directory)."""
    import datasets

    stream = datasets.load_dataset(name, split="train", streaming=True)
    for row in stream:
        if text_field not in row:
            raise ValueError(f"dataset {name!r} has no {text_field!r} column (columns: {sorted(row)})")
        yield row[text_field]


# --- the embedded default corpus --------------------------------------------------------------------------


def _source_roots() -> list[Path]:
    """Where the docstrings come from: the standard library and this environment's site-packages."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    purelib = Path(sysconfig.get_paths()["purelib"])
    if purelib.is_dir() and purelib != roots[0]:
        roots.append(purelib)
    return roots


_SKIP_DIRS = {
    "test",
    "tests",
    "testing",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "_vendor",
}
_CODE_START = (">>>", "...", "$ ", "In [", "Out[", "..", "+", "|", "=", "-", "{", "}", "[", "#", "@")


def clean_docstring(doc: str) -> str:
    """The prose paragraphs of a docstring: no doctests, literal blocks, tables, lists of names or markup lines."""
    paragraphs = []
    literal = False
    for block in re.split(r"\n\s*\n", doc):
        lines = block.split("\n")
        if literal and lines[0].startswith((" ", "\t")):
            continue  # the indented body of a reST literal block ("::")
        literal = block.rstrip().endswith("::")
        if any(line.lstrip().startswith(_CODE_START) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "").replace("`", "")
        text = text.rstrip(":").strip()
        words = text.split()
        if len(words) < 8 or not text[0].isupper() or text[-1] not in ".!?)":
            continue
        letters = sum(c.isalpha() or c.isspace() for c in text)
        if letters / len(text) < 0.85 or re.search(r"[{}=<>\\]|\w\(|\w\.\w+\(", text):
            continue
        paragraphs.append(text)
    return "\n\n".join(paragraphs)


_TRIPLE_QUOTED = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)


def _docstrings(path: Path) -> Iterator[str]:
    """Triple-quoted strings of a source file, dedented (a regex: 12× faster than ``ast`` and the cleaner
    drops what is not prose anyway)."""
    try:
        source = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return
    for match in _TRIPLE_QUOTED.finditer(source):
        yield inspect.cleandoc(match.group(1) or match.group(2) or "")


def _reference_topics() -> list[str]:
    """The language reference topics shipped with the standard library (``pydoc_data.topics``)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [topics[name] for name in sorted(topics)]


def build_default_documents(roots: list[Path] | None = None, progress: bool = True) -> list[str]:
    """Clean prose documents (one per module, class or function docstring, deduplicated), sorted by source."""
    files = sorted(
        p
        for root in roots or _source_roots()
        for p in root.rglob("*.py")
        if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1])
    )
    seen: set[str] = set()
    documents = []
    files = tqdm(files, desc="reading docstrings", unit="file", disable=not progress)
    for raw in [*_reference_topics(), *(doc for f in files for doc in _docstrings(f))]:
        text = clean_docstring(raw)
        if len(text.split()) >= 20 and text not in seen:
            seen.add(text)
            documents.append(text)
    return documents


def default_corpus_path() -> Path:
    """The cached jsonl of the embedded default corpus (rebuilt when the Python version or rules change)."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-v{_FORMAT}"
    return cache_root() / "corpus" / f"default-{tag}.jsonl"


def _default_corpus() -> Corpus:
    path = default_corpus_path()
    if not path.is_file():
        documents = build_default_documents()
        with atomic_path(path, force=True) as tmp:  # steerkit's own cache file
            with tmp.open("w", encoding="utf-8") as handle:
                for text in documents:
                    handle.write(json.dumps({"text": text}) + "\n")
    return Corpus(DEFAULT_NAME, lambda: _file_documents(path, "text"), _file_hash(path))
