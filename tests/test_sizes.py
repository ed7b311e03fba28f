"""Sizes declared in files are compared with the file and the model before anything is allocated: a small file
that claims an enormous tensor, array, SAE or model fails at once, with flat memory, naming the file and field."""

import json
import resource
import struct
import time

import numpy as np
import pytest
import torch

import steerkit as sk
from steerkit.checkpoint import CheckpointWriter, specs_of

HUGE = 10**12


def _fails_fast_and_flat(call, match: str) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        call()
    assert time.perf_counter() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 50 * 1024  # KB: no allocation from the claim


def test_a_vector_file_claiming_a_huge_tensor(tmp_path):
    header = json.dumps({"layers.0": {"dtype": "F32", "shape": [HUGE], "data_offsets": [0, 4 * HUGE]}}).encode()
    path = tmp_path / "v.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    assert path.stat().st_size < 200
    _fails_fast_and_flat(lambda: sk.SteeringVector.load(path), "not a readable safetensors file")


def _control_vector(path, tags: bool = False):
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    if tags:
        writer.add_array("general.tags", ["a", "b"])
    writer.add_uint32("controlvector.layer_count", 1)
    writer.add_tensor("direction.1", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return bytearray(path.read_bytes())


@pytest.mark.parametrize("field", ["keys", "tensors", "array", "shape"])
def test_a_control_vector_gguf_claiming_huge_counts(tmp_path, field):
    path = tmp_path / "v.gguf"
    data = _control_vector(path, tags=field == "array")
    if field == "keys":
        data[16:24] = struct.pack("<Q", HUGE)  # after the magic, the version and the tensor count
        match = f"{HUGE} keys: more than the file can hold"
    elif field == "tensors":
        data[8:16] = struct.pack("<Q", HUGE)
        match = f"{HUGE} tensors"
    elif field == "array":
        at = data.find(b"general.tags") + len(b"general.tags") + 8  # value type, element type, then the count
        data[at : at + 8] = struct.pack("<Q", 10**10)
        match = "value of 'general.tags' needs"
    else:
        at = data.find(b"direction.1") + len(b"direction.1") + 4  # the rank, then the first dimension
        data[at : at + 8] = struct.pack("<Q", HUGE)
        match = "tensor 'direction.1' declares 4000000000000 bytes"
    path.write_bytes(bytes(data))
    _fails_fast_and_flat(lambda: sk.SteeringVector.from_gguf(path), match)


def test_an_sae_whose_cfg_claims_a_huge_width(tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    StandardSAE(StandardSAEConfig(d_in=32, d_sae=64)).save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": HUGE}))
    _fails_fast_and_flat(lambda: sk.load_sae(tmp_path / "sae"), r"W_enc has shape \[32, 64\] but cfg.json declares")
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "d_in": -1}))
    _fails_fast_and_flat(lambda: sk.load_sae(tmp_path / "sae"), "d_in=-1: expected a positive int")


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_a_checkpoint_whose_config_claims_more_than_its_tensors(tmp_path, tok, field):
    from tests.conftest import make_tiny

    model = make_tiny("llama", len(tok))
    tensors = {name: t.detach().clone() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    config = {**json.loads(model.config.to_json_string()), field: 10**9}
    out = tmp_path / "ckpt"
    with CheckpointWriter(out, specs_of(tensors)) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.add_file("config.json", json.dumps(config))
    _fails_fast_and_flat(lambda: sk.load_model(out), f"{field} is 1000000000 but the tensors hold")
    vec = sk.SteeringVector({1: torch.ones(32)})
    _fails_fast_and_flat(lambda: sk.bake(out, vec, 1.0, tmp_path / "baked"), f"{field} is 1000000000")
    assert not (tmp_path / "baked").exists()
