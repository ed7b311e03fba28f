"""The Hub: pushes with model cards (only the upload call is mocked), repo ids read through a real Hub cache
populated here in the layout huggingface_hub writes (blobs, refs, symlinked snapshots), offline."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import steerkit as sk
from steerkit.sae.io import sae_layer
from tests.conftest import make_tiny
from tests.test_weights import _perturbed, _save


def populate(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "main") -> Path:
    """Write ``files`` into ``cache`` as huggingface_hub's cache holds a downloaded repo; returns the snapshot."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    snapshot = root / "snapshots" / commit
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    folder = tmp_path / "hub-cache"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    assert constants.HF_HUB_OFFLINE  # the tests never reach the network
    return folder


@pytest.fixture
def uploads(monkeypatch):
    """Capture what would be uploaded: {repo_id: {path: bytes}} (the one thing that cannot run here)."""
    from huggingface_hub import HfApi

    seen: dict[str, dict[str, bytes]] = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        seen.setdefault(repo_id, {})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        seen[repo_id].update(folder_files(Path(folder_path)))
        return f"https://huggingface.co/{repo_id}/commit/1"

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, commit_message=None, **kwargs):
        seen[repo_id][path_in_repo] = path_or_fileobj

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "upload_file", upload_file)
    return seen


def _card(data: bytes, tmp_path: Path) -> ModelCard:
    path = tmp_path / "card.md"
    path.write_bytes(data)
    text = data.decode()
    assert not re.search(r"(?<![\w.])/(tmp|home|root|work)/", text), text  # no absolute local paths
    return ModelCard.load(path)


def test_a_vector_goes_up_with_a_card_and_comes_back_offline(cache, uploads, tmp_path, smollm):
    model, tok = smollm
    vec = sk.extract(model, tok, sk.load_pairs("sentiment")[:20], layers=[6, 8])
    url = vec.push_to_hub("me/sentiment")
    assert "me/sentiment" in url
    files = uploads["me/sentiment"]
    assert set(files) == {"vector.safetensors", "vector.gguf", "README.md"}
    card = _card(files["README.md"], tmp_path)
    assert card.data.library_name == "steerkit" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "steering-vector" in card.data.tags and "best held-out separation" in card.text
    populate(cache, "me/sentiment", files)
    back = sk.SteeringVector.from_pretrained("me/sentiment")
    assert back.layers == [6, 8] and all(torch.equal(back[i], vec[i]) for i in (6, 8))
    assert sk.SteeringVector.load("me/sentiment").layers == [6, 8]
    gguf = sk.SteeringVector.from_pretrained("me/sentiment", filename="vector.gguf")
    assert min(gguf.cosine(vec).values()) > 0.9999


def test_checkpoints_task_vectors_and_merges_by_repo_id(cache, uploads, tmp_path, tok):
    base = _save(make_tiny("llama", len(tok)), tmp_path / "base")
    a = _perturbed("llama", len(tok), 1, tmp=tmp_path, name="a")
    b = _perturbed("llama", len(tok), 2, tmp=tmp_path, name="b")
    for name, folder in (("me/base", base), ("me/a", a), ("me/b", b)):
        populate(cache, name, folder_files(folder))
    tv = sk.TaskVector.between("me/a", "me/b")
    local_tv = sk.TaskVector.between(a, b)
    key = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(tv.deltas[key], local_tv.deltas[key])
    tv.push_to_hub("me/a-minus-b")
    files = uploads["me/a-minus-b"]
    assert "task_vector.json" in files and "README.md" in files
    assert _card(files["README.md"], tmp_path).data.library_name == "steerkit"
    populate(cache, "me/a-minus-b", files)
    out = sk.merge("me/base", [("me/a-minus-b", 0.5)], tmp_path / "merged")
    direct = sk.merge(base, [(local_tv, 0.5)], tmp_path / "merged-local")
    reader, expected = sk.weights.CheckpointReader(out), sk.weights.CheckpointReader(direct)
    assert all(torch.equal(reader[n], expected[n]) for n in expected)
    card = _card((out / "README.md").read_bytes(), tmp_path)
    assert card.data.base_model == "me/base" and card.data.base_model_relation == "merge"
    baked = sk.bake("me/base", sk.SteeringVector({1: torch.ones(32)}), 0.5, tmp_path / "baked")
    card = _card((baked / "README.md").read_bytes(), tmp_path)
    assert card.data.base_model == "me/base" and card.data.base_model_relation == "finetune"
    assert "steerkit" in card.data.tags and "steering-vector" in card.data.tags


def test_sae_and_adapter_round_trip(cache, uploads, tmp_path, tok, default_corpus):
    from tests.test_sae import SMALL

    model = make_tiny("llama", len(tok))
    sae = sk.train_sae(model, tok, default_corpus, 1, **{**SMALL, "tokens": 2048})
    sk.push_to_hub(sae, "me/sae")
    files = uploads["me/sae"]
    assert {"cfg.json", "sae_weights.safetensors", "README.md"} <= set(files)
    assert "sae" in _card(files["README.md"], tmp_path).data.tags
    populate(cache, "me/sae", files)
    back = sk.load_sae("me/sae")
    assert sae_layer(back) == 1 and torch.equal(back.W_dec, sae.W_dec)
    import sae_lens

    assert sae_lens.SAE.load_from_disk(sk.hub.local("me/sae")).cfg.d_sae == sae.cfg.d_sae  # sae-lens reads it
    tuned = sk.sae_tune(model, tok, back, None, ["a few words to tune on"] * 4, epochs=1, batch_size=2,
                        out=tmp_path / "adapter", progress=False)  # fmt: skip
    sk.push_to_hub(tmp_path / "adapter", "me/adapter")
    card = _card(uploads["me/adapter"]["README.md"], tmp_path)  # a tiny model from a config names no base
    assert card.data.library_name == "steerkit" and "lora" in card.data.tags and not card.data.base_model
    populate(cache, "me/adapter", uploads["me/adapter"])
    attached = sk.attach_adapter(model, "me/adapter", merge=True)
    ids = tok(["hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(attached(ids).logits, tuned.merge_and_unload()(ids).logits, atol=1e-5)


def test_a_repo_that_is_not_cached_offline_is_a_clear_error(cache):
    with pytest.raises(FileNotFoundError, match="neither a local path nor a Hub repo.*HF_HUB_OFFLINE"):
        sk.SteeringVector.from_pretrained("nobody/nothing")
    with pytest.raises(FileNotFoundError, match="neither a local path nor a Hub repo"):
        sk.TaskVector.between("nobody/a", "nobody/b")


def test_sae_lens_release_names_load_through_the_hub_cache(cache):
    """gpt2-small-res-jb lives in jbloom/GPT2-Small-SAEs-Reformatted; a tiny SAE in that layout, cached."""
    from tests.test_sae import _zero_sae

    sae = _zero_sae()
    sae.cfg.metadata.hook_name = "blocks.2.hook_resid_pre"
    folder = Path(cache).parent / "release"
    sae.save_model(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    files = {f"blocks.2.hook_resid_pre/{name}": data for name, data in folder_files(folder).items()}
    files["blocks.2.hook_resid_pre/cfg.json"] = json.dumps(cfg).encode()
    populate(cache, "jbloom/GPT2-Small-SAEs-Reformatted", files)
    loaded = sk.load_sae("gpt2-small-res-jb", sae_id="blocks.2.hook_resid_pre")
    assert loaded.cfg.d_sae == sae.cfg.d_sae and sae_layer(loaded) == 1  # resid_pre of block 2 = block 1's output
    with pytest.raises(ValueError, match="cannot load sae-lens release"):
        sk.load_sae("gpt2-small-res-jb", sae_id="blocks.99.hook_resid_pre")


def test_the_layer_comes_from_the_hook_name():
    from tests.test_sae import _zero_sae

    sae = _zero_sae()
    for hook, layer in (("blocks.5.hook_resid_post", 5), ("blocks.5.hook_resid_pre", 4), ("model.layers.7", 7)):
        sae.cfg.metadata.hook_name = hook
        assert sae_layer(sae) == layer
    for hook in ("blocks.0.hook_resid_pre", "blocks.3.hook_mlp_out", None):
        sae.cfg.metadata.hook_name = hook
        with pytest.raises(ValueError, match="pass layer="):
            sae_layer(sae)
    sae.cfg.metadata.hook_name = "blocks.5.hook_resid_pre"
    with pytest.warns(UserWarning, match="output of block 4.*layer=5"):
        assert sae_layer(sae, 5) == 5
    model = make_tiny("llama", 64)
    sae = _zero_sae()
    sae.cfg.metadata.hook_name = "blocks.2.hook_resid_pre"  # splice() without layer= puts it after block 1
    ids = torch.randint(64, (1, 6))
    with torch.no_grad(), sk.splice(model, sae), sk.Recorder(model, [0, 1]) as rec:
        model(ids)
    assert torch.all(rec[1][0, 1:] == 0) and not torch.all(rec[0][0, 1:] == 0)


def test_cli_takes_repo_ids_and_pushes(cache, uploads, tmp_path, tok, capsys):
    from steerkit import cli

    a = _perturbed("llama", len(tok), 1, tmp=tmp_path, name="a")
    b = _perturbed("llama", len(tok), 2, tmp=tmp_path, name="b")
    populate(cache, "me/a", folder_files(a))
    populate(cache, "me/b", folder_files(b))
    cli.main(["diff", "me/a", "me/b", "-o", str(tmp_path / "tv")])
    assert "wrote" in capsys.readouterr().out
    cli.main(["push", str(tmp_path / "tv"), "me/tv"])
    assert "pushed" in capsys.readouterr().out and "task_vector.json" in uploads["me/tv"]
    with pytest.raises(SystemExit) as info:
        cli.main(["push", str(tmp_path / "nothing"), "me/x"])
    assert info.value.code == 2 and "nothing to push" in capsys.readouterr().err
