"""mergekit configurations run by steerkit: the same arithmetic as written out here, and clear errors."""

import pytest
import torch
import yaml

import steerkit as sk
from steerkit import cli
from steerkit.weights import CheckpointReader
from steerkit.weights.mergekit import merge_config, read_config
from tests.conftest import make_tiny
from tests.test_weights import _perturbed, _save


@pytest.fixture
def models(tmp_path, tok):
    base = _save(make_tiny("llama", len(tok)), tmp_path / "base")
    a = _perturbed("llama", len(tok), 1, tmp=tmp_path, name="a")
    b = _perturbed("llama", len(tok), 2, tmp=tmp_path, name="b")
    return {
        "base": base,
        "a": a,
        "b": b,
        "readers": {k: CheckpointReader(v) for k, v in (("base", base), ("a", a), ("b", b))},
    }


def _config(models, method, params_a, params_b, shared=None) -> dict:
    config = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["a"]), "parameters": params_a},
            {"model": str(models["b"]), "parameters": params_b},
        ],
        "dtype": "float32",
    }
    if shared:
        config["parameters"] = shared
    return config


NAME = "model.layers.1.mlp.up_proj.weight"


def test_task_arithmetic_and_linear_are_the_arithmetic(models, tmp_path):
    r = models["readers"]
    base, a, b = (r[k][NAME] for k in ("base", "a", "b"))
    out = merge_config(_config(models, "task_arithmetic", {"weight": 0.7}, {"weight": -0.4}, {"lambda": 2.0}),
                       tmp_path / "ta")  # fmt: skip
    expected = base + 2.0 * (0.7 * (a - base) - 0.4 * (b - base))
    torch.testing.assert_close(CheckpointReader(out)[NAME], expected, rtol=1e-6, atol=1e-6)
    linear = {"merge_method": "linear", "models": [{"model": str(models[k]), "parameters": {"weight": w}}
                                                   for k, w in (("a", 3.0), ("b", 1.0))]}  # fmt: skip
    out = merge_config(linear, tmp_path / "linear")
    torch.testing.assert_close(CheckpointReader(out)[NAME], (3 * a + b) / 4, rtol=1e-6, atol=1e-6)


def test_ties_follows_mergekit(models, tmp_path):
    r = models["readers"]
    base = r["base"][NAME]
    deltas = [r[k][NAME] - base for k in ("a", "b")]
    weights, densities = [1.0, 0.5], [0.3, 0.6]
    out = merge_config(_config(models, "ties", {"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}),
                       tmp_path / "ties")  # fmt: skip
    trimmed = []
    for d, density in zip(deltas, densities, strict=True):
        keep = int(density * d.numel())
        trimmed.append(torch.where(d.abs() >= d.abs().flatten().topk(keep).values[-1], d, 0.0))
    weighted = torch.stack([w * t for w, t in zip(weights, trimmed, strict=True)])
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(weighted) == majority).float()
    divisor = (torch.tensor(weights).view(-1, 1, 1) * agree).sum(0)
    expected = base + (weighted * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)
    torch.testing.assert_close(CheckpointReader(out)[NAME], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_keeps_its_density_and_l1_norm(models, tmp_path, method):
    r = models["readers"]
    base = r["base"][NAME]
    delta = r["a"][NAME] - base
    config = _config(models, method, {"weight": 1.0, "density": 0.4}, {"weight": 0.0, "density": 0.4})
    out = merge_config(config, tmp_path / method)
    got = CheckpointReader(out)[NAME] - base
    kept = got != 0
    assert 0.35 < float(kept.float().mean()) < 0.45
    assert float(got.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)  # L1 rescale
    again = merge_config(config, tmp_path / "again")
    assert torch.equal(CheckpointReader(again)[NAME], CheckpointReader(out)[NAME])  # seeded


def test_bad_configs_name_what_is_wrong(models, tmp_path, capsys):
    good = _config(models, "ties", {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5})
    cases = [
        ({**good, "slices": []}, "mergekit features steerkit does not run"),
        ({**good, "colour": "blue"}, "unknown keys"),
        ({**good, "merge_method": "slerp"}, "merge_method 'slerp'"),
        ({**good, "parameters": {"t": 0.5}}, "parameter 't' does not apply to ties"),
        ({**good, "models": [{"model": str(models["a"]), "parameters": {"weight": [0, 1]}}]}, "no gradients"),
        ({**good, "tokenizer_source": "union"}, "tokenizer_source 'union'"),
        ({k: v for k, v in good.items() if k != "base_model"}, "needs base_model"),
        ({**good, "models": [{"model": str(models["a"]), "parameters": {"density": 0.5}}]}, "has no 'weight'"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            merge_config(config, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({**good, "colour": "blue"}))
    with pytest.raises(SystemExit) as info:
        cli.main(["merge", "--config", str(path), "-o", str(tmp_path / "x")])
    assert info.value.code == 2 and "unknown keys ['colour']" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(good))
    assert read_config(path)["merge_method"] == "ties"
    cli.main(["merge", "--config", str(path), "-o", str(tmp_path / "ok")])
    direct = merge_config(good, tmp_path / "direct")
    assert torch.equal(CheckpointReader(tmp_path / "ok")[NAME], CheckpointReader(direct)[NAME])
    card = (tmp_path / "ok" / "README.md").read_text()
    assert "ties" in card and str(tmp_path) not in card
    assert sk.weights.CheckpointReader(tmp_path / "ok").config()["model_type"] == "llama"
