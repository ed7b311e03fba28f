"""Pushing to the Hugging Face Hub: vectors, task vectors, SAEs, adapters and checkpoints, each with a model card.

``push_folder`` uploads a folder steerkit wrote; ``push_to_hub`` takes a SteeringVector, TaskVector, sae-lens SAE
or such a folder. This module sits above the types it uploads and gives two of them their ``push_to_hub``
method; reading from the Hub (repo ids wherever a path is taken) is ``steerkit._hub``.
"""

from __future__ import annotations

import os
from pathlib import Path

from steerkit._hub import REPO_ID, card, is_repo_id, local, name_of
from steerkit.vector import SteeringVector
from steerkit.weights.taskvec import TaskVector

__all__ = ["is_repo_id", "local", "push_folder", "push_to_hub"]


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    card_text: str | None = None,
    private: bool = False,
    token: str | None = None,
    message: str = "Upload with steerkit",
) -> str:
    """Create ``repo_id`` if needed, upload ``folder`` (and ``card_text`` as its README.md); returns the URL."""
    from huggingface_hub import HfApi

    if not REPO_ID.match(repo_id) or "@" in repo_id:
        raise ValueError(f"repo_id={repo_id!r}: expected 'organisation/name'")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    if card_text is not None:
        api.upload_file(path_or_fileobj=card_text.encode(), path_in_repo="README.md", repo_id=repo_id,
                        commit_message=message)  # fmt: skip
    return str(getattr(info, "commit_url", info))


def vector_card(vector) -> str:
    """The card of a pushed steering vector: the model it was extracted from, how, and how well it separates."""
    meta = vector.metadata
    model = (meta.get("model") or {}).get("name")
    lines = [f"extracted from `{name_of(model)}` with `{meta.get('method', 'unknown')}`, layers {vector.layers}"]
    if vector.separation:
        best = vector.best_layers(1)[0]
        lines.append(f"best held-out separation: layer {best}, AUROC {vector.separation[best]:.3f}")
    lines.append("`vector.safetensors`: `steerkit.SteeringVector.from_pretrained(repo)`; `vector.gguf` (if present): "
                 "`llama-cli --control-vector vector.gguf`")  # fmt: skip
    return card("Steering vector", lines, base_model=model, tags=("steering-vector", str(meta.get("method"))))


def _folder_card(path: Path) -> tuple[str, str | None]:
    """(kind, card) for a folder steerkit wrote; card is None when the folder has its own README.md."""
    import json

    def read(name: str) -> dict:
        return json.loads((path / name).read_text())

    if (path / "cfg.json").is_file() and (path / "sae_weights.safetensors").is_file():
        cfg = read("cfg.json")
        meta = cfg.get("metadata") or {}
        lines = [f"{cfg.get('architecture')} SAE, d_in {cfg.get('d_in')}, d_sae {cfg.get('d_sae')}, "
                 f"hook `{meta.get('hook_name')}` of `{name_of(meta.get('model_name'))}`",
                 "sae-lens layout: `sae_lens.SAE.from_pretrained` or `steerkit.load_sae(repo)`"]  # fmt: skip
        text = card("Sparse autoencoder", lines, base_model=meta.get("model_name"), tags=("sae", "sae-lens"))
        kind = "sae"
    elif (path / "task_vector.json").is_file():
        meta = read("task_vector.json")
        a, b = name_of(meta.get("a")), name_of(meta.get("b"))
        use = "`steerkit.TaskVector.from_pretrained(repo)`; `steerkit merge BASE --add repo:1.0 -o out`"
        lines = [f"task vector `{a}` − `{b}` ({meta.get('model_type')})", use]
        text = card("Task vector", lines, base_model=meta.get("b"), tags=("task-vector",))
        kind = "task vector"
    elif (path / "adapter_config.json").is_file():
        base = read("adapter_config.json").get("base_model_name_or_path")
        lines = [f"LoRA adapter for `{name_of(base)}`", "`steerkit.attach_adapter(model, repo)` or peft"]
        text = card("LoRA adapter", lines, base_model=base, relation="adapter", tags=("lora", "sae-tuning"))
        kind = "adapter"
    elif (path / "config.json").is_file():
        text, kind = None, "checkpoint"
    else:
        raise ValueError(f"{path} is not a folder steerkit writes (SAE, task vector, adapter or checkpoint)")
    return kind, None if (path / "README.md").is_file() else text


def push_to_hub(item, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Push a steerkit artifact with a model card: a SteeringVector, TaskVector or sae-lens SAE, or a path steerkit
    wrote (vector file, SAE folder, task-vector folder, LoRA adapter, checkpoint). Returns the commit URL."""
    import tempfile

    if isinstance(item, str | os.PathLike) and Path(item).is_file():
        item = SteeringVector.load(item)
    with tempfile.TemporaryDirectory(prefix="steerkit-push-") as tmp:
        folder = Path(tmp) / "upload"
        if isinstance(item, SteeringVector):
            folder.mkdir()
            item.save(folder / "vector.safetensors")
            if any(layer > 0 for layer in item.layers):
                item.to_gguf(folder / "vector.gguf", skip_layer0=True)
            return push_folder(folder, repo_id, vector_card(item), private, token)
        if isinstance(item, TaskVector):
            item.save(folder)
        elif hasattr(item, "save_model") and hasattr(item, "cfg"):  # a sae_lens SAE
            item.save_model(folder)
        else:
            folder = Path(item)
            if not folder.is_dir():
                raise FileNotFoundError(f"nothing to push at {folder}")
        _, text = _folder_card(folder)
        return push_folder(folder, repo_id, text, private, token)


def _push_method(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload with a model card (``steerkit.push_to_hub``); returns the commit URL. A SteeringVector goes up as
    ``vector.safetensors`` (+ ``vector.gguf`` for llama.cpp), a TaskVector as its folder."""
    return push_to_hub(self, repo_id, private=private, token=token)


SteeringVector.push_to_hub = _push_method  # (given here, above the data types, so that they import no Hub code)
TaskVector.push_to_hub = _push_method
