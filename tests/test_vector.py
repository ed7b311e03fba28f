import math

import gguf
import numpy as np
import pytest
import torch

import steerkit as sk


def _vec(layers=(1, 2, 3), d=8, seed=0, **meta):
    g = torch.Generator().manual_seed(seed)
    return sk.SteeringVector({layer: torch.randn(d, generator=g) for layer in layers}, meta or None)


def test_indexing_and_layers():
    v = _vec()
    assert v.layers == [1, 2, 3] and len(v) == 3 and 2 in v and 5 not in v and v.d_model == 8
    assert v[2].dtype == torch.float32 and v[2].shape == (8,)
    with pytest.raises(KeyError, match=r"layer 5 is not in this vector \(layers \[1, 2, 3\]\)"):
        v[5]


def test_arithmetic():
    a, b = _vec(seed=0), _vec(layers=(2, 3, 4), seed=1)
    s = a + b
    assert s.layers == [1, 2, 3, 4]
    torch.testing.assert_close(s[1], a[1])
    torch.testing.assert_close(s[2], a[2] + b[2])
    torch.testing.assert_close(s[4], b[4])
    d = a - b
    torch.testing.assert_close(d[3], a[3] - b[3])
    torch.testing.assert_close(d[4], -b[4])
    torch.testing.assert_close((2 * a)[1], a[1] * 2)
    torch.testing.assert_close((a * 0.5)[2], a[2] / 2)
    torch.testing.assert_close((a / 4)[3], a[3] * 0.25)
    torch.testing.assert_close((-a)[1], -a[1])
    with pytest.raises(ValueError, match="not finite"):
        a * float("nan")
    with pytest.raises(ValueError, match="width"):
        a + _vec(d=4)


def test_normalized_cosine_select():
    a = _vec()
    n = a.normalized()
    assert all(abs(float(n[layer].norm()) - 1) < 1e-6 for layer in n.layers)
    cos = a.cosine(n)
    assert all(abs(c - 1) < 1e-6 for c in cos.values())
    assert a.cosine(-a)[2] == pytest.approx(-1, abs=1e-6)
    assert a.select([3, 1]).layers == [1, 3]
    with pytest.raises(KeyError):
        a.select([9])


def test_best_layers_reads_separation():
    v = _vec(layers=(1, 2, 3, 4), separation={"1": 0.6, "2": 0.99, "3": 0.7, "4": 0.95})
    assert v.best_layers(2) == [2, 4]
    with pytest.raises(ValueError, match="no separation"):
        _vec().best_layers(1)


def test_nan_and_empty_rejected():
    with pytest.raises(ValueError, match="layer 2 contains NaN"):
        sk.SteeringVector({1: torch.zeros(4), 2: torch.tensor([0.0, math.nan, 0, 0])})
    with pytest.raises(ValueError, match="at least one layer"):
        sk.SteeringVector({})
    with pytest.raises(ValueError, match="different widths"):
        sk.SteeringVector({1: torch.zeros(4), 2: torch.zeros(5)})


def test_check_model_names_both_sides():
    v = _vec(model={"name": "tiny-a", "hidden_size": 8})
    with pytest.raises(ValueError, match=r"vector width 8 \(from tiny-a\).*hidden size 16"):
        v.check_model(16, 30)
    with pytest.raises(ValueError, match=r"layer 3 but the model has only 2 blocks"):
        v.check_model(8, 2)
    v.check_model(8, 4)


def test_save_load_roundtrip(tmp_path):
    v = _vec(method="mean_diff", model={"model_type": "llama", "hidden_size": 8}, separation={"1": 0.9})
    path = v.save(tmp_path / "v.safetensors")
    w = sk.SteeringVector.load(path)
    assert w.layers == v.layers and w.metadata["method"] == "mean_diff"
    assert w.metadata["model"]["model_type"] == "llama" and w.separation == {1: 0.9}
    for layer in v.layers:
        assert torch.equal(w[layer], v[layer])
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["layers.1", "layers.2", "layers.3"]
        assert f.metadata()["format_version"] == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_load_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        sk.SteeringVector.load(bad)


def _write_control_vector(path, directions, arch="controlvector", dtype=np.float32, hint="llama"):
    """A control vector written with gguf directly, to the layout llama.cpp and repeng use."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, vec in directions.items():
        writer.add_tensor(f"direction.{layer}", np.asarray(vec, dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_written_to_llama_cpp_layout(tmp_path):
    v = _vec(layers=(1, 5, 9), model={"model_type": "llama"})
    path = v.to_gguf(tmp_path / "v.gguf")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 3
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.5", "direction.9"]
    for layer in (1, 5, 9):
        t = tensors[f"direction.{layer}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.n_elements == 8
        np.testing.assert_array_equal(np.asarray(t.data).flatten(), v[layer].numpy())


def test_gguf_read_from_external_file(tmp_path):
    dirs = {layer: np.arange(6, dtype=np.float32) * layer for layer in (2, 3, 7)}
    _write_control_vector(tmp_path / "ext.gguf", dirs, hint="mistral")
    v = sk.SteeringVector.from_gguf(tmp_path / "ext.gguf")
    assert v.layers == [2, 3, 7] and v.metadata["model_hint"] == "mistral"
    np.testing.assert_array_equal(v[7].numpy(), dirs[7])


def test_gguf_roundtrip_and_layer0(tmp_path):
    v = _vec(layers=(0, 1, 2))
    with pytest.raises(ValueError, match="layer 0 cannot be exported"):
        v.to_gguf(tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    v.to_gguf(tmp_path / "x.gguf", skip_layer0=True)
    w = sk.SteeringVector.from_gguf(tmp_path / "x.gguf")
    assert w.layers == [1, 2] and torch.equal(w[2], v[2])


def test_gguf_that_is_not_a_control_vector(tmp_path):
    _write_control_vector(tmp_path / "model.gguf", {1: np.ones(4)}, arch="llama")
    with pytest.raises(ValueError, match=r"architecture 'llama', not a control vector"):
        sk.SteeringVector.from_gguf(tmp_path / "model.gguf")
    _write_control_vector(tmp_path / "f16.gguf", {1: np.ones(4)}, dtype=np.float16)
    with pytest.raises(ValueError, match="expected F32"):
        sk.SteeringVector.from_gguf(tmp_path / "f16.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        sk.SteeringVector.from_gguf(tmp_path / "junk.gguf")
