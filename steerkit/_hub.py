"""The Hugging Face Hub as a source of files, and the model cards written beside what steerkit writes.

``local("org/name")`` (or ``"org/name@revision"``) gives the snapshot folder through the Hub cache, so a repo
works offline once cached; an existing local path is returned as it is. ``card`` writes a model card through
``huggingface_hub.ModelCard`` with YAML metadata (``base_model``, ``base_model_relation``, ``library_name:
steerkit``, tags) and never an absolute local path. Pushing is ``steerkit.hub``, above the types it uploads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
RELATIONS = ("adapter", "merge", "quantized", "finetune")


def is_repo_id(source) -> bool:
    """``org/name`` or ``org/name@revision`` that is not an existing local path."""
    text = str(source)
    return bool(REPO_ID.match(text)) and not Path(text).expanduser().exists()


def local(source: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """A local folder (or file) for a path or a Hub repo id; repos resolve through the Hub cache.

    With ``HF_HUB_OFFLINE=1`` only the cache is read. A repo that cannot be found is a FileNotFoundError
    saying both readings of ``source``.
    """
    if not is_repo_id(source):
        return Path(source).expanduser()
    from huggingface_hub import snapshot_download

    repo, _, revision = str(source).partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=allow_patterns))
    except Exception as err:  # offline and not cached, no such repo, gated, network errors
        raise FileNotFoundError(
            f"{source!r} is neither a local path nor a Hub repo steerkit could read ({type(err).__name__}: {err}); "
            "offline (HF_HUB_OFFLINE=1) a repo must already be in the Hub cache"
        ) from None


def name_of(source) -> str:
    """How a source is named in a card: its repo id, or only the folder or file name of a local path."""
    if source is None:
        return "unknown"
    text = str(source)
    return text if is_repo_id(text) or REPO_ID.match(text) else Path(text).name


def hub_id(source) -> str | None:
    """The Hub repo a source stands for, if any: a repo id, or an embedded model's origin."""
    from steerkit.models import EMBEDDED

    text = str(source) if source is not None else ""
    if text in EMBEDDED:
        return EMBEDDED[text].hub_id
    return text.partition("@")[0] if REPO_ID.match(text) and not Path(text).exists() else None


def card(
    title: str,
    lines: list[str],
    base_model=None,
    relation: str | None = None,
    tags: tuple[str, ...] = (),
    extra: dict | None = None,
) -> str:
    """A model card (YAML metadata + markdown) for something steerkit wrote or pushes."""
    import datetime
    import importlib.metadata

    from huggingface_hub import ModelCard, ModelCardData

    if relation is not None and relation not in RELATIONS:
        raise ValueError(f"relation={relation!r}: expected one of {RELATIONS}")
    base = hub_id(base_model)
    data = ModelCardData(
        library_name="steerkit",
        tags=["steerkit", *tags],
        base_model=base,
        base_model_relation=relation if base else None,
        **(extra or {}),
    )
    try:
        version = importlib.metadata.version("steerkit")
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed)"
    body = "\n".join(f"- {line}" for line in lines)
    stamp = datetime.date.today().isoformat()
    text = f"---\n{data.to_yaml()}\n---\n\n# {title}\n\nWritten by steerkit {version} on {stamp}.\n\n{body}\n"
    return str(ModelCard(text))
