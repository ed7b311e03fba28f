"""``steerkit`` commands on activations and steering vectors: capture, extract, generate, condition, sweep,
export-gguf and import-gguf."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from steerkit.cli._common import (
    ALPHA_HELP,
    LAYER_SPEC,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    ModelArg,
    VectorOpt,
    _layers,
    _listed,
    _load,
    _load_vector,
    _model_inputs,
    _output,
    _parse_position,
    _placement,
    app,
    is_main,
    read_texts,
)
from steerkit.extract import METHODS

PANEL = "Activations and steering vectors"


@app.command(rich_help_panel=PANEL)
def capture(
    texts: Annotated[
        Path, typer.Option("--texts", "-t", help="A .txt file (one text per line) or .jsonl ({'text': ...}).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Safetensors file to write.")],
    model: ModelArg = "smollm2-135m-instruct",
    layers: Annotated[str, typer.Option(help=LAYER_SPEC + ".")] = "all",
    position: Annotated[str, typer.Option(help="'last', 'mean', 'all' or a token index such as -1.")] = "last",
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 16,
    truncate: Annotated[bool, typer.Option(help="Cut texts longer than the context instead of failing.")] = False,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Capture residual-stream activations (block outputs) for each text and write them to a safetensors file.

    The file holds `activations`, float32 [N, len(layers), d_model], and metadata naming the model, layers
    and position. With --position all it holds [T, len(layers), d_model] and `rows`, the text of each token.
    """
    import steerkit as sk
    from steerkit._io import save_safetensors

    placement = _placement(device, dtype)
    items = read_texts(texts)
    inputs = [texts, *_model_inputs(model)]
    _output(output, force, inputs)
    layer_list = _layers(layers, model)
    pos = _parse_position(position)
    mdl, tok = _load(model, placement)
    result = sk.capture(
        mdl, tok, items, layer_list, position=pos, batch_size=batch_size, truncate=truncate, progress=True
    )
    tensors = {"activations": result[0], "rows": result[1]} if pos == "all" else {"activations": result}
    meta = {"model": model, "layers": json.dumps(layer_list), "position": str(pos), "n_texts": str(len(items))}
    if is_main():  # under torchrun every rank holds the gathered result; one writes it
        save_safetensors(tensors, output, meta, force=force, inputs=inputs)
    shape = tuple(tensors["activations"].shape)
    typer.echo(f"wrote {output}: activations {shape}, layers {layers}, position {pos}")


@app.command(rich_help_panel=PANEL)
def extract(
    pairs: Annotated[
        str,
        typer.Option(
            "--pairs",
            "-p",
            help="Bundled set (sentiment, concise, reasoning, truthful) or a .jsonl of {positive, negative}.",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Vector file to write (.safetensors).")],
    model: ModelArg = "smollm2-135m-instruct",
    layers: Annotated[str, typer.Option(help=LAYER_SPEC + ".")] = "all",
    method: Annotated[str, typer.Option(help=_listed(METHODS))] = "mean_diff",
    position: Annotated[str, typer.Option(help="Token read from each text: 'last', 'mean' or an index.")] = "last",
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 16,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Extract a steering vector (one direction per layer) from contrastive pairs and save it.

    Prints the held-out separation (AUROC of the projection on the test split) and norm per layer; the best
    layers are where steering is most likely to work. Use the file with `steerkit generate` or `export-gguf`.
    """
    import steerkit as sk

    placement = _placement(device, dtype)
    if method not in METHODS:
        raise typer.BadParameter(f"{method!r}: expected one of {list(METHODS)}", param_hint="--method")
    items = sk.load_pairs(pairs)
    inputs = ([Path(pairs)] if Path(pairs).is_file() else []) + _model_inputs(model)
    _output(output, force, inputs)
    layer_list = _layers(layers, model)
    pos = _parse_position(position)
    mdl, tok = _load(model, placement)
    vec = sk.extract(mdl, tok, items, layer_list, method=method, position=pos, batch_size=batch_size, progress=True)
    if is_main():  # under torchrun every rank computed the same vector; one writes it
        vec.save(output, force=force, inputs=inputs)
    typer.echo(f"{'layer':>5} {'AUROC':>6} {'norm':>8}")
    for layer in vec.layers:
        auc = vec.separation.get(layer)
        typer.echo(f"{layer:>5} {auc if auc is None else f'{auc:.3f}':>6} {vec[layer].norm():>8.2f}")
    if vec.separation:
        typer.echo(f"best layers: {vec.best_layers(3)}")
    typer.echo(f"wrote {output} ({method}, {len(items)} pairs, layers {layers})")


@app.command(rich_help_panel=PANEL)
def generate(
    vector: VectorOpt,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt; repeat for several.")],
    model: ModelArg = "smollm2-135m-instruct",
    alpha: Annotated[float, typer.Option(help=ALPHA_HELP)] = 1.0,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Which of the vector's layers to steer (0-based blocks), e.g. '8' or '8-12'; 'all' for every one. "
            "Default: the layer with the best held-out separation."
        ),
    ] = None,
    positions: Annotated[str, typer.Option(help="'all', 'prompt', 'generated' or a start index.")] = "all",
    mode: Annotated[str, typer.Option(help="add, project_out or clamp.")] = "add",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 48,
    chat: Annotated[bool, typer.Option(help="Wrap prompts in the model's chat template.")] = True,
    system: Annotated[str | None, typer.Option(help="A system turn before each prompt (chat models).")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy; above 0 samples.", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass when sampling.", min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling (both runs start from it).")] = None,
    condition: Annotated[
        Path | None, typer.Option(help="A .condition.safetensors file (steerkit condition): steer only where it fires.")
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Generate with and without steering and print the completions side by side (greedy unless --temperature)."""
    import steerkit as sk
    from steerkit._checks import finite

    placement = _placement(device, dtype)
    vec = _load_vector(vector)
    cond = _load_condition(condition) if condition is not None else None
    a = finite(alpha)
    if layers == "all":
        layer_list = vec.layers
    elif layers:
        layer_list = _layers(layers, model)
    else:
        layer_list = vec.default_layers()
        if len(vec.layers) > 1:
            best = layer_list[0]
            typer.echo(
                f"steering layer {best} only: the vector's best held-out separation (AUROC "
                f"{vec.separation[best]:.3f}) of its {len(vec.layers)} layers; pass --layers to choose, "
                "--layers all for every one"
            )
    pos = _parse_position(positions)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    mdl, tok = _load(model, placement)
    rows = sk.generate(
        mdl,
        tok,
        prompt,
        vector=vec,
        alpha=a,
        max_new_tokens=max_new_tokens,
        layers=layer_list,
        positions=pos,
        mode=mode,
        chat=chat,
        system=system,
        seed=seed,
        condition=cond,
        **sampling,
    )
    for row in rows:
        typer.secho(f"\n>>> {row['prompt']}", bold=True)
        typer.echo(f"  unsteered: {row['unsteered'].strip()}")
        typer.echo(f"  steered (alpha={a:g}): {row['steered'].strip()}")


def _load_condition(path: Path):
    from steerkit.condition import Condition

    if not path.is_file():
        raise FileNotFoundError(f"condition file {path} does not exist")
    return Condition.load(path)


@app.command(rich_help_panel=PANEL)
def condition(
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts", "-s", help="Bundled condition set (cooking) or a .jsonl of {text, label 0/1, split}."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Condition file to write (.condition.safetensors).")],
    model: ModelArg = "smollm2-135m-instruct",
    layers: Annotated[str, typer.Option(help=LAYER_SPEC + " searched for the condition.")] = "2-12",
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Find a CAST condition: directions from the train split, the block, threshold and comparison with the best
    F1 on the val split; prints the test split's F1. Use it with `generate --condition` or `serve`."""
    import torch

    from steerkit import condition as cast

    placement = _placement(device, dtype)
    if not output.name.endswith(".condition.safetensors"):
        raise typer.BadParameter(f"{output}: expected a name ending in .condition.safetensors", param_hint="-o")
    split = {name: cast.condition_prompts(prompts, name) for name in ("train", "val", "test")}
    for name in ("train", "val"):
        if not all(split[name]):
            raise ValueError(f"{prompts}: the {name} split needs prompts with label 1 and with label 0")
    inputs = ([Path(prompts)] if Path(prompts).is_file() else []) + _model_inputs(model)
    _output(output, force, inputs)
    layer_list = _layers(layers, model)
    mdl, tok = _load(model, placement)
    found = cast.find_condition(mdl, tok, cast.extract_condition(mdl, tok, *split["train"], layers=layer_list),
                                *split["val"])  # fmt: skip
    if is_main():
        found.save(output, force=force)
    typer.echo(f"block {found.layer}, {found.comparator} than {found.threshold:.4f}: val F1 {found.f1:.3f}")
    if all(split["test"]):
        pos, neg = split["test"]
        truth = torch.tensor([True] * len(pos) + [False] * len(neg))
        test_f1 = cast.f1(found.predict(mdl, tok, [*pos, *neg]), truth)
        typer.echo(f"test F1 {test_f1:.3f} ({len(truth)} held-out prompts)")
    typer.echo(f"wrote {output}")


@app.command("export-gguf", rich_help_panel=PANEL)
def export_gguf(
    vector: Annotated[Path, typer.Argument(help="A steerkit vector (.safetensors).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="llama.cpp control-vector file to write (.gguf).")],
    model_hint: Annotated[str | None, typer.Option(help="controlvector.model_hint (default: the model type).")] = None,
    skip_layer0: Annotated[
        bool, typer.Option(help="Drop layer 0, which llama.cpp cannot steer, instead of failing.")
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Write a vector as a llama.cpp control vector (direction.{i}, float32), e.g. for llama-cli --control-vector."""
    vec = _load_vector(vector)
    vec.to_gguf(output, model_hint=model_hint, skip_layer0=skip_layer0, force=force, inputs=[vector])
    typer.echo(f"wrote {output}: layers {[layer for layer in vec.layers if layer or not skip_layer0]}")


@app.command("import-gguf", rich_help_panel=PANEL)
def import_gguf(
    gguf_file: Annotated[Path, typer.Argument(help="A llama.cpp or repeng control-vector .gguf.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="steerkit vector file to write (.safetensors).")],
    force: ForceOpt = False,
) -> None:
    """Read a llama.cpp / repeng control-vector GGUF and save it as a steerkit vector."""
    import steerkit as sk

    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    vec = sk.SteeringVector.from_gguf(gguf_file)
    vec.save(output, force=force, inputs=[gguf_file])
    typer.echo(f"wrote {output}: layers {vec.layers}, d_model {vec.d_model}")


@app.command(rich_help_panel=PANEL)
def sweep(
    vector: VectorOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV file to write; a PNG of the same name is drawn.")],
    task: Annotated[
        str | None, typer.Option(help="arithmetic, deduction or induction (adds accuracy and answer mass).")
    ] = None,
    prompts: Annotated[Path | None, typer.Option(help="Instead of a task: a .txt of prompts (one per line).")] = None,
    model: ModelArg = "smollm2-135m-instruct",
    alphas: Annotated[str, typer.Option(help="Comma-separated alphas, e.g. '-2,-1,0,1,2'.")] = "-2,-1,0,1,2",
    layers: Annotated[str | None, typer.Option(help="Layers to steer, each alone (default: the vector's).")] = None,
    together: Annotated[bool, typer.Option(help="Steer all listed layers at once instead of one at a time.")] = False,
    n: Annotated[int, typer.Option(help="Task items.")] = 48,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Sweep alpha (and layer) and measure the first generated token, writing a CSV and a figure.

    Metrics (Hojer et al.): KL to the unsteered distribution and entropy; with a task also accuracy over
    the answer options and probability mass on the correct vs the incorrect answers.
    """
    import steerkit as sk
    from steerkit import plots
    from steerkit.evals import TASKS, write_csv

    placement = _placement(device, dtype)
    if (task is None) == (prompts is None):
        raise typer.BadParameter("pass exactly one of --task and --prompts")
    if task is not None and task not in TASKS and not task.endswith(".jsonl"):
        raise ValueError(f"no task {task!r}: valid tasks are {sorted(TASKS)} or a .jsonl file")
    try:
        alpha_list = [float(a) for a in alphas.split(",")]
    except ValueError:
        raise typer.BadParameter(f"cannot read alphas {alphas!r}: expected numbers separated by commas") from None
    vec = _load_vector(vector)
    source = task if task is not None else read_texts(prompts)
    inputs = [vector, *([prompts] if prompts else []), *_model_inputs(model)]
    figure = output.with_suffix(".png")
    for path in (output, figure):
        _output(path, force, inputs)
    layer_list = _layers(layers, model) if layers else None
    mdl, tok = _load(model, placement)
    rows = sk.sweep(mdl, tok, vec, source, alphas=alpha_list, layers=layer_list, together=together, n=n)
    write_csv(rows, output, force=force)
    plots.close(plots.sweep_metrics(rows, title=f"{vector.name} on {task or prompts.name}", path=figure, force=force))
    for row in rows:
        typer.echo("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    typer.echo(f"wrote {output} and {figure}")
