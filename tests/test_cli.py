import json

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from steerkit import cli

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0
    for command in ("models", "capture"):
        assert command in result.output


def test_models_lists_embedded():
    result = runner.invoke(cli.app, ["models"])
    assert result.exit_code == 0, result.output
    assert "smollm2-135m-instruct" in result.output and "installed: yes" in result.output


def test_capture_writes_safetensors(tmp_path, embedded_dir):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "I love this."}\n\n{"text": "I hate this."}\n')
    out = tmp_path / "acts.safetensors"
    result = runner.invoke(cli.app, ["capture", "-t", str(texts), "-o", str(out), "--layers", "3,5-6"])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("activations").shape == (2, 3, 576)
        assert f.metadata()["layers"] == "[3, 5, 6]"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_bad_layer_is_one_clear_line(tmp_path, capsys, embedded_dir):
    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\n")
    out = tmp_path / "acts.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["capture", "-t", str(texts), "-o", str(out), "--layers", "40"])
    assert exit_info.value.code == 2
    assert "layer 40 is out of range: this model has blocks 0..29" in capsys.readouterr().err
    assert not out.exists()


def test_malformed_jsonl_names_the_line(tmp_path):
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"text": "ok"}\n{"txt": "bad"}\n')
    result = runner.invoke(cli.app, ["capture", "-t", str(texts), "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2 and "t.jsonl:2" in result.output


def test_extract_generate_and_gguf_roundtrip(tmp_path, embedded_dir):
    import steerkit as sk

    vec_path = tmp_path / "sent.safetensors"
    result = runner.invoke(cli.app, ["extract", "-p", "sentiment", "-o", str(vec_path), "--layers", "9-11"])
    assert result.exit_code == 0, result.output
    assert "best layers" in result.output
    vec = sk.SteeringVector.load(vec_path)
    assert vec.layers == [9, 10, 11] and vec.metadata["model"]["name"] == "smollm2-135m-instruct"

    gguf_path = tmp_path / "sent.gguf"
    result = runner.invoke(cli.app, ["export-gguf", str(vec_path), "-o", str(gguf_path)])
    assert result.exit_code == 0, result.output
    back = tmp_path / "back.safetensors"
    result = runner.invoke(cli.app, ["import-gguf", str(gguf_path), "-o", str(back)])
    assert result.exit_code == 0, result.output
    assert sk.SteeringVector.load(back).cosine(vec) == {
        9: pytest.approx(1.0),
        10: pytest.approx(1.0),
        11: pytest.approx(1.0),
    }

    result = runner.invoke(
        cli.app,
        [
            "generate",
            "-v",
            str(gguf_path),
            "-p",
            "Describe your morning.",
            "--alpha",
            "1.0",
            "--layers",
            "10",
            "--max-new-tokens",
            "12",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "unsteered:" in result.output and "steered (alpha=1):" in result.output


def test_generate_rejects_nan_alpha(tmp_path, capsys):
    import torch

    import steerkit as sk

    path = sk.SteeringVector({3: torch.ones(576)}).save(tmp_path / "v.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "-v", str(path), "-p", "hi", "--alpha", "nan"])
    assert exit_info.value.code == 2 and "alpha=nan is not a finite number" in capsys.readouterr().err


def test_subcommand_help_explains():
    for command in ("extract", "generate", "export-gguf", "import-gguf", "capture"):
        result = runner.invoke(cli.app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_diff_merge_bake_commands(tmp_path, tok):
    import torch
    from transformers import AutoModelForCausalLM

    import steerkit as sk
    from steerkit.weights import CheckpointReader
    from tests.conftest import make_tiny
    from tests.test_weights import _perturbed, _save

    base = _save(make_tiny("llama", len(tok)), tmp_path / "base")
    a = _perturbed("llama", len(tok), 1, tmp=tmp_path, name="a")
    b = _perturbed("llama", len(tok), 2, tmp=tmp_path, name="b")
    result = runner.invoke(cli.app, ["diff", str(a), str(b), "-o", str(tmp_path / "tv")])
    assert result.exit_code == 0, result.output
    assert "other" in result.output and "wrote" in result.output
    out = tmp_path / "merged"
    args = ["merge", str(base), "--add", f"{tmp_path / 'tv'}:0.5", "-o", str(out), "--alpha-by-layer", "0-1:2"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    name = "model.layers.1.mlp.up_proj.weight"
    expected = CheckpointReader(base)[name] + 1.0 * (CheckpointReader(a)[name] - CheckpointReader(b)[name])
    torch.testing.assert_close(CheckpointReader(out)[name], expected, rtol=1e-6, atol=1e-7)
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 1 and isinstance(result.exception, FileExistsError)
    assert runner.invoke(cli.app, args + ["--force"]).exit_code == 0

    vec_path = sk.SteeringVector({1: torch.ones(32)}).save(tmp_path / "v.safetensors")
    result = runner.invoke(
        cli.app, ["bake", str(base), "-v", str(vec_path), "--alpha", "0.5", "-o", str(tmp_path / "baked")]
    )
    assert result.exit_code == 0, result.output
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "baked")
    torch.testing.assert_close(baked.model.layers[1].mlp.down_proj.bias, torch.full((32,), 0.5))
    result = runner.invoke(cli.app, ["merge", str(base), "--add", "nocolon", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "DIR:ALPHA" in result.output


def test_sweep_command_writes_csv_and_png(tmp_path, embedded_dir):
    import csv

    import torch

    import steerkit as sk

    vec = sk.SteeringVector({10: torch.randn(576)}).save(tmp_path / "v.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me a story.\nWhat is two plus two?\n")
    out = tmp_path / "sweep.csv"
    result = runner.invoke(
        cli.app, ["sweep", "-v", str(vec), "--prompts", str(prompts), "--alphas", "0,5", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["alpha"] for r in rows] == ["0.0", "5.0"] and float(rows[1]["kl"]) > 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    bad = runner.invoke(cli.app, ["sweep", "-v", str(vec), "--task", "algebra", "-o", str(tmp_path / "x.csv")])
    assert isinstance(bad.exception, ValueError) and "valid tasks" in str(bad.exception)


def test_train_and_eval_sae_commands(tmp_path, embedded_dir):
    from sae_lens import SAE

    out = tmp_path / "sae"
    args = ["train-sae", "-o", str(out), "--layer", "3", "--d-sae", "1152", "--k", "8", "--tokens", "2048"]
    result = runner.invoke(cli.app, [*args, "--batch-size", "512"])
    assert result.exit_code == 0, result.output
    assert "layer 3: explained variance" in result.output
    assert SAE.load_from_disk(out).cfg.d_sae == 1152 and (out / "training_curves.png").stat().st_size > 0
    again = runner.invoke(cli.app, [*args, "--batch-size", "512"])
    assert again.exit_code != 0 and "--force" in str(again.exception)
    metrics = tmp_path / "m.json"
    result = runner.invoke(cli.app, ["eval-sae", str(out), "--layer", "3", "--tokens", "512", "-o", str(metrics)])
    assert result.exit_code == 0, result.output
    values = json.loads(metrics.read_text())
    assert {"explained_variance", "ce_loss_recovered", "kl_score", "dead_fraction"} <= values.keys()
    assert metrics.with_suffix(".png").stat().st_size > 0


def test_sae_command_errors_are_one_line(tmp_path, capsys, embedded_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cfg.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval-sae", str(broken), "--layer", "3"])
    assert exit_info.value.code == 2
    assert "sae_weights.safetensors missing" in capsys.readouterr().err
