"""Atomic writes: build the output under a temporary sibling name, rename it into place only on success."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on failure remove it.

    Works for a file or a directory the caller creates at the yielded path. With ``overwrite=False``
    an existing ``path`` is a FileExistsError before anything is written.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite/--force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write contiguous ``tensors`` to a safetensors file atomically; metadata values must be strings."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def iter_jsonl(path: str | os.PathLike, parse: Callable[[dict], T], expected: str) -> Iterator[T]:
    """``parse(row)`` for the JSON object on each non-empty line of a .jsonl file, read lazily.

    A line that is not a JSON object, or that ``parse`` rejects (KeyError, TypeError, ValueError), is a
    ValueError naming ``file:line`` and ``expected``.
    """
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise TypeError(f"got a JSON {type(row).__name__}")
                value = parse(row)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
                raise ValueError(f"{path}:{number}: expected {expected} ({err})") from None
            yield value
