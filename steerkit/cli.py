"""The ``steerkit`` command line: one thin subcommand per capability; the logic lives in the library.

Every command checks what it can before a model loads (input files, layer specs, vector files, the output
path) and ends an expected failure with one ``error:`` line and exit code 2; an interrupt exits 130.
Outputs follow the library's rules: an existing output is replaced only with ``--force``, never an input.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

VectorOpt = Annotated[
    Path, typer.Option("--vector", "-v", help="A steerkit vector (.safetensors) or a control-vector .gguf.")
]
LayersOpt = Annotated[
    str | None, typer.Option(help="Only these of the vector's layers (0-based blocks), e.g. '10' or '8-12'.")
]
ModelArg = Annotated[
    str, typer.Option("--model", "-m", help="Embedded model name (see `steerkit models`), checkpoint dir or hub id.")
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        help="Replace an existing output (never an input of the command, the working directory or home); "
        "the old output is kept until the new one is complete."
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        help="Where the model runs: cuda (default when a GPU is visible; under torchrun each rank's own GPU), "
        "cpu, cuda:N, mps, or auto (accelerate's device_map: every GPU, then the CPU)."
    ),
]
DtypeOpt = Annotated[
    str | None, typer.Option(help="float32, bfloat16 or float16 (default: the checkpoint's own dtype).")
]
LAYER_SPEC = "'all', '12', '4,8,12' or '4-25' (inclusive, 0-based blocks)"
METHOD_NAMES = "task_arithmetic, ties (TIES), dare_ties, dare_linear (dare)"
ALPHA_HELP = (
    "Steering strength α: h += α·v at each steered layer. Typical: 0.25 to 2 for an extracted mean-difference "
    "vector on one early-middle layer (vector norms grow with depth); negative steers the other way."
)


def _version(value: bool) -> None:
    if value:
        import importlib.metadata

        typer.echo(f"steerkit {importlib.metadata.version('steerkit')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only results and errors: no progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Say what steerkit does, step by step.")] = False,
) -> None:
    """steerkit: read behaviours out of language models (activations, directions) and write them back in.

    Layers are 0-based decoder blocks: layer i is the residual stream after block i (TransformerLens'
    blocks.i.hook_resid_post, llama.cpp's direction.i).
    """
    import logging

    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logger = logging.getLogger("steerkit")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"


def _parse_position(value: str) -> str | int:
    """A token position from the command line: a name such as 'last', or an int index such as -1."""
    return int(value) if value.lstrip("-").isdigit() else value


def _parse_alpha(value: str) -> float:
    from steerkit._checks import finite

    try:
        return finite(float(value))
    except ValueError:
        raise typer.BadParameter(f"alpha {value!r} is not a finite number", param_hint="--alpha") from None


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _model_inputs(model: str) -> list[Path]:
    """The model's checkpoint folder, when it is one on disk (an output must never replace it)."""
    from steerkit.models import EMBEDDED

    path = Path(model).expanduser()
    return [path] if model not in EMBEDDED and path.exists() else []


def _depth(model: str) -> int:
    """The model's number of blocks, read from its config without loading weights."""
    from steerkit.arch import config_depth
    from steerkit.models import load_config

    depth = config_depth(load_config(model))
    if depth is None:
        raise ValueError(f"cannot read the number of layers from {model}'s config")
    return depth


def _layers(spec: str, model: str) -> list[int]:
    from steerkit.arch import parse_layers

    return parse_layers(spec, _depth(model))


def _sae_layer(sae, layer: int | None, model: str) -> int:
    """The block an SAE goes into (given, or read from its hook name), checked against the model's depth."""
    from steerkit.sae.io import sae_layer

    return _layers(str(sae_layer(sae, layer)), model)[0]


def _output(path: Path, force: bool, inputs=(), directory: bool = False) -> Path:
    from steerkit._io import check_output

    return check_output(path, force=force, inputs=inputs, directory=directory)


def _placement(device: str | None, dtype: str | None) -> tuple:
    """The device and dtype to load with, checked before anything loads."""
    from steerkit.distributed import local_device
    from steerkit.models import check_device, check_dtype

    if device == "auto" and os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("--device auto spreads one model over every GPU; under torchrun each rank takes its own")
    return check_device(device or local_device()), check_dtype(dtype)


def _load(model: str, placement: tuple):
    import steerkit as sk

    device, dtype = placement
    return sk.load_model(model, dtype=dtype, device=device)


def is_main() -> bool:
    from steerkit.distributed import is_main as main_rank

    return main_rank()


def _load_vector(path: Path):
    """A vector file, or a Hub repo id holding one (the Hub cache serves it offline once cached)."""
    import steerkit as sk
    from steerkit.hub import is_repo_id

    if not path.is_file() and not is_repo_id(path):
        raise FileNotFoundError(f"vector file {path} does not exist (nor is it a Hub repo id org/name)")
    return sk.SteeringVector.load(path)


@app.command()
def models() -> None:
    """List the embedded offline models: whether each is installed and cached, and their sizes."""
    from steerkit.models import model_info

    for row in model_info():
        typer.echo(f"{row['name']}: {row['description']}")
        if row["installed"]:
            typer.echo(f"  installed: yes (GGUF {_human(row['gguf_bytes'])})")
        else:
            typer.echo(f"  installed: no  -> {row['install']}")
        cached = f"yes ({_human(row['cache_bytes'])})" if row["cached"] else "no (converted on first load)"
        typer.echo(f"  cached:    {cached} at {row['cache_dir']}")


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """The JSON objects of a .jsonl file, one per non-empty line, each with the ``required`` string fields."""
    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file")
    from steerkit._io import iter_jsonl

    def parse(row: dict) -> dict:
        if not all(isinstance(row.get(key), str) for key in required):
            raise TypeError(f"missing or non-string field among {list(required)}")
        return row

    try:
        return list(iter_jsonl(path, parse, f"a JSON object with {list(required)} string fields"))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def read_texts(path: Path) -> list[str]:
    """Texts from a file: one per line (.txt), or the ``text`` field of each line (.jsonl)."""
    from steerkit._io import read_text

    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint="--texts")
    if path.suffix == ".jsonl":
        texts = [row["text"] for row in read_jsonl(path, required=("text",))]
    else:
        texts = [line for line in read_text(path, "texts file").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return texts


@app.command()
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


@app.command()
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
    method: Annotated[
        str, typer.Option(help="mean_diff (default), pca_diff, pca_center, probe or mean_positive.")
    ] = "mean_diff",
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
    if method not in sk.METHODS:
        raise typer.BadParameter(f"{method!r}: expected one of {list(sk.METHODS)}", param_hint="--method")
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


@app.command()
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


@app.command()
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


@app.command("export-gguf")
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


@app.command("import-gguf")
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


@app.command()
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


@app.command()
def diff(
    a: Annotated[str, typer.Argument(help="Checkpoint A (e.g. the RL-trained model).")],
    b: Annotated[str, typer.Argument(help="Checkpoint B of the same base (e.g. the SFT model).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Task-vector directory to write.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Glob of tensor names to leave out; repeatable.")] = None,
    common_rows: Annotated[
        bool, typer.Option(help="For tensors of different row counts, take the shared rows.")
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Compute the task vector A - B tensor by tensor (float32), print its size by layer, optionally save it."""
    import steerkit as sk

    if output is not None:
        _output(output, force, [a, b], directory=True)
    tv = sk.TaskVector.between(a, b, exclude=exclude, common_rows=common_rows)
    stats = tv.stats()
    typer.echo(f"{'layer':>6} {'|delta|':>10} {'|delta|/|B|':>12}")
    for layer in sorted(stats["layers"], key=lambda k: (k is not None, k if k is not None else -1)):
        row = stats["layers"][layer]
        typer.echo(f"{'other' if layer is None else layer:>6} {row['norm']:>10.4f} {row['relative']:>12.2e}")
    if output is not None:
        tv.save(output, force=force)
        typer.echo(f"wrote {output} ({len(tv.deltas)} tensors)")


@app.command()
def merge(
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to write.")],
    base: Annotated[
        str | None, typer.Argument(help="Base checkpoint: a folder, an embedded model name or a Hub repo id.")
    ] = None,
    add: Annotated[
        list[str] | None,
        typer.Option("--add", help="VECTOR:ALPHA, a task-vector folder or Hub repo and its weight; repeatable."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="A mergekit YAML (task_arithmetic, ties, dare_ties, dare_linear, linear) instead of BASE/--add."
        ),
    ] = None,
    method: Annotated[str, typer.Option(help=f"One of {METHOD_NAMES}.")] = "task_arithmetic",
    alpha_by_layer: Annotated[
        str | None, typer.Option(help="Per-layer multipliers of every alpha, e.g. '0-9:0.5,10-29:1' (0-based blocks).")
    ] = None,
    density: Annotated[float, typer.Option(help="Kept fraction for ties and dare.")] = 0.5,
    max_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 2GB or 100MB.")] = "5GB",
    force: ForceOpt = False,
) -> None:
    """Merge task vectors into a base: out = base + sum(alpha * vector), written as a plain HF checkpoint.

    Or run a mergekit config with --config (mergekit 0.1.5's semantics; unsupported keys are errors).
    Computed in float32 tensor by tensor and written in the base's dtype; tied embeddings stay tied; config,
    tokenizer and generation config are carried over; nothing is left behind if it fails.
    """
    import steerkit as sk

    if config is not None:
        from steerkit.weights.mergekit import merge_config, read_config

        if base or add:
            raise typer.BadParameter("pass either --config or BASE with --add, not both")
        parsed = read_config(config)
        sources = [parsed.get("base_model"), *(entry["model"] for entry in parsed["models"])]
        _output(output, force, [config, *(p for s in sources if s for p in _model_inputs(s))], directory=True)
        merge_config(parsed, output, max_shard_size=max_shard_size, force=force, progress=True)
        typer.echo(f"wrote {output}")
        return
    if not base or not add:
        raise typer.BadParameter("pass BASE and at least one --add VECTOR:ALPHA (or --config merge.yaml)")
    vectors = []
    for item in add:
        path, sep, alpha = item.rpartition(":")
        if not sep or not path:
            raise typer.BadParameter(f"--add {item!r}: expected DIR:ALPHA, e.g. vec_dir:1.0")
        vectors.append((path, _parse_alpha(alpha)))
    _output(output, force, [*_model_inputs(base), *(path for path, _ in vectors)], directory=True)
    sk.merge(
        base,
        vectors,
        output,
        method=method,
        alpha_by_layer=alpha_by_layer,
        density=density,
        max_shard_size=max_shard_size,
        force=force,
        progress=True,
    )
    typer.echo(f"wrote {output}")


@app.command()
def bake(
    base: Annotated[str, typer.Argument(help="Base checkpoint directory (or embedded model name).")],
    vector: VectorOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to write.")],
    alpha: Annotated[float, typer.Option(help=ALPHA_HELP)] = 1.0,
    layers: LayersOpt = None,
    family: Annotated[
        str,
        typer.Option(
            help="auto: natively where the model has an MLP output bias, else re-expressed exactly as Llama "
            "(Qwen2, Mistral, Phi-3); native: never re-express; llama: re-express as Llama."
        ),
    ] = "auto",
    max_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 2GB or 100MB.")] = "5GB",
    force: ForceOpt = False,
) -> None:
    """Bake a steering vector into weights: a checkpoint that any engine serves steered, without steerkit.

    The vector becomes the bias of each steered block's MLP output projection. Llama (mlp_bias), GPT-2 and
    GPT-NeoX carry it natively; Qwen2, Mistral and Phi-3 are re-expressed exactly as Llama (checked before
    writing); Qwen3, Gemma and others get an error: use export-gguf or hook steering there.
    """
    import steerkit as sk
    from steerkit.weights.bake import MODES

    if family not in MODES:
        raise typer.BadParameter(f"{family!r}: expected one of {list(MODES)}", param_hint="--family")
    from steerkit._checks import finite

    vec = _load_vector(vector)
    a = finite(alpha)
    _output(output, force, [*_model_inputs(base), vector], directory=True)
    chosen = _layers(layers, base) if layers else None
    sk.bake(base, vec, a, output, layers=chosen, max_shard_size=max_shard_size, force=force, family=family)
    typer.echo(f"wrote {output}")


CorpusOpt = Annotated[
    str,
    typer.Option(help="'default' (embedded offline prose), a .txt / .jsonl file or folder, or a dataset name."),
]


@app.command("train-sae")
def train_sae(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write (sae-lens format).")],
    layer: Annotated[str, typer.Option(help="Block whose output the SAE reads (0-based); several, e.g. '6,13'.")],
    model: ModelArg = "smollm2-135m-instruct",
    corpus: CorpusOpt = "default",
    arch: Annotated[str, typer.Option(help="topk, batchtopk, jumprelu or standard (ReLU + L1).")] = "topk",
    d_sae: Annotated[int | None, typer.Option(help="Latents (default 8 x the model's width).")] = None,
    k: Annotated[float, typer.Option(help="Active latents per token (TopK's k, JumpReLU's target L0).")] = 32,
    tokens: Annotated[int, typer.Option(help="Training tokens.")] = 2_000_000,
    ctx_len: Annotated[int, typer.Option(help="Tokens per packed sequence.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Activations per SAE step.")] = 1024,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 2e-4*sqrt(16384/d_sae)).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Save a checkpoint every N tokens.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUTPUT.ckpt.")] = False,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Train a sparse autoencoder on a block's output, writing a directory sae-lens loads.

    Activations come from steerkit's own capture on the transformers model (no TransformerLens). Also
    writes training_log.json and training_curves.png (explained variance, L0, dead fraction over tokens).
    """
    import steerkit as sk
    from steerkit import plots
    from steerkit.sae.train import ARCHS

    placement = _placement(device, dtype)
    if arch not in ARCHS:
        raise typer.BadParameter(f"{arch!r}: expected one of {list(ARCHS)}", param_hint="--arch")
    layers = _layers(layer, model)
    text = sk.load_corpus(corpus)
    _output(output, force, [*([text.source] if text.source else []), *_model_inputs(model)], directory=True)
    mdl, tok = _load(model, placement)
    result = sk.train_sae(
        mdl, tok, text, layers if len(layers) > 1 else layers[0], arch=arch, d_sae=d_sae, k=k, tokens=tokens,
        ctx_len=ctx_len, batch_size=batch_size, lr=lr, out=output, checkpoint_every=checkpoint_every,
        resume=resume, force=force,
    )  # fmt: skip
    saes = result if isinstance(result, dict) else {layers[0]: result}
    for value, sae in saes.items():
        folder = output if len(saes) == 1 else output / f"layer_{value}"
        if is_main():
            curves = folder / "training_curves.png"
            plots.close(plots.sae_training(sae.training_log, f"{arch} SAE, layer {value}", path=curves))
        last = sae.training_log[-1]
        typer.echo(
            f"layer {value}: explained variance {last['explained_variance']:.3f}, L0 {last['l0']:.1f}, "
            f"dead {last['dead_fraction']:.1%} -> {folder}"
        )


@app.command("eval-sae")
def eval_sae(
    sae: Annotated[Path, typer.Argument(help="An SAE directory (sae-lens format) or a Hub repo id holding one.")],
    layer: Annotated[
        int | None, typer.Option(help="The block it reads (0-based; default: from the SAE's hook name).")
    ] = None,
    model: ModelArg = "smollm2-135m-instruct",
    corpus: CorpusOpt = "default",
    tokens: Annotated[int, typer.Option(help="Held-out tokens to evaluate on.")] = 32_768,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSON file for the metrics.")] = None,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Evaluate an SAE on held-out text: explained variance, MSE, L0, dead / dense latents, CE loss recovered
    and KL score when spliced in (against zero-ablating the block). Draws the latent-frequency histogram
    beside the JSON."""
    import steerkit as sk
    from steerkit import plots
    from steerkit._io import write_text

    placement = _placement(device, dtype)
    loaded = sk.load_sae(sae)
    layer = _sae_layer(loaded, layer, model)
    text = sk.load_corpus(corpus)
    inputs = [sae, *([text.source] if text.source else []), *_model_inputs(model)]
    if output is not None:
        for path in (output, output.with_suffix(".png")):
            _output(path, force, inputs)
    mdl, tok = _load(model, placement)
    metrics = sk.evaluate_sae(mdl, tok, loaded, layer, text, tokens=tokens)
    frequency = metrics.pop("latent_frequency")
    for key, value in metrics.items():
        typer.echo(f"{key:>20}: {value:.4g}")
    if output is not None:
        write_text(json.dumps(metrics, indent=1), output, force=force, inputs=inputs)
        figure = output.with_suffix(".png")
        plots.close(plots.latent_frequency(frequency, f"{sae.name}, layer {layer}", path=figure, force=force))
        typer.echo(f"wrote {output} and {figure}")


@app.command("sae-tune")
def sae_tune(
    sae: Annotated[Path, typer.Argument(help="The frozen SAE (sae-lens folder or Hub repo) of a source model.")],
    data: Annotated[
        Path, typer.Option(help="A .jsonl of {'prompt', 'answer'} (or {'text'} for the kl loss), one per line.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Adapter directory (or checkpoint with --merge).")],
    layer: Annotated[
        int | None, typer.Option(help="The block to splice it into (0-based; default: from the SAE's hook name).")
    ] = None,
    model: ModelArg = "smollm2-135m-instruct",
    loss: Annotated[str, typer.Option(help="kl (Resa: match the untouched target, no labels) or ce (answers).")] = "kl",
    grad_through_sae: Annotated[
        bool, typer.Option(help="Let gradients flow through the frozen SAE (--no-...: Resa's released code).")
    ] = True,
    epochs: Annotated[int, typer.Option()] = 2,
    lr: Annotated[float, typer.Option()] = 1e-4,
    batch_size: Annotated[int, typer.Option()] = 8,
    rank: Annotated[int, typer.Option(help="LoRA rank (alpha = 4 x rank, as Resa's 32 / 128).")] = 32,
    merge: Annotated[bool, typer.Option(help="Merge the LoRA and write a full checkpoint instead.")] = False,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """SAE-tuning: LoRA-tune the model with a frozen SAE spliced in at LAYER, then drop the SAE.

    Writes a LoRA adapter that attach-adapter puts onto another model of the same family, or with
    --merge a checkpoint any engine serves.
    """
    import steerkit as sk

    placement = _placement(device, dtype)
    rows = read_jsonl(data)
    examples = [row["text"] if set(row) == {"text"} else row for row in rows]
    loaded = sk.load_sae(sae)
    layer = _sae_layer(loaded, layer, model)
    _output(output, force, [sae, data, *_model_inputs(model)], directory=True)
    mdl, tok = _load(model, placement)
    tuned = sk.sae_tune(
        mdl, tok, loaded, layer, examples, lora={"r": rank, "lora_alpha": 4 * rank}, loss=loss,
        grad_through_sae=grad_through_sae, epochs=epochs, lr=lr, batch_size=batch_size, out=output, merge=merge,
        force=force,
    )  # fmt: skip
    first, last = tuned.history[0], tuned.history[-1]
    typer.echo(f"loss {first:.4f} -> {last:.4f} over {len(tuned.history)} steps; wrote {output}")


@app.command("attach-adapter")
def attach_adapter(
    adapter: Annotated[Path, typer.Argument(help="An adapter written by sae-tune.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to write.")],
    model: ModelArg = "smollm2-135m-instruct",
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Put an SAE-tuning adapter onto another model of the same family and write the merged checkpoint."""
    import steerkit as sk
    from steerkit.sae.tune import save_checkpoint

    placement = _placement(device, dtype)
    if not adapter.is_dir():
        raise FileNotFoundError(f"no adapter directory at {adapter}")
    inputs = [adapter, *_model_inputs(model)]
    _output(output, force, inputs, directory=True)
    mdl, tok = _load(model, placement)
    save_checkpoint(sk.attach_adapter(mdl, adapter, merge=True), tok, output, force=force, inputs=inputs)
    typer.echo(f"wrote {output}")


@app.command()
def push(
    path: Annotated[
        Path,
        typer.Argument(help="A vector file, or a folder steerkit wrote: SAE, task vector, LoRA adapter or checkpoint."),
    ],
    repo_id: Annotated[str, typer.Argument(help="The Hub repo to create or update, organisation/name.")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
) -> None:
    """Upload to the Hugging Face Hub with a model card (YAML metadata linking the base model); a vector also
    travels as a llama.cpp .gguf. Needs a token (huggingface-cli login or HF_TOKEN)."""
    from steerkit.hub import push_to_hub

    if not path.exists():
        raise FileNotFoundError(f"nothing to push at {path}")
    typer.echo(f"pushed {path} to {repo_id}: {push_to_hub(path, repo_id, private=private)}")


@app.command()
def serve(
    vectors: Annotated[
        Path, typer.Option(help="Folder of NAME.safetensors / NAME.gguf vectors (and NAME.condition.safetensors).")
    ],
    model: ModelArg = "smollm2-135m-instruct",
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together.", min=1)] = 16,
    max_queue: Annotated[int, typer.Option(help="Requests waiting beyond the batch before 429.", min=1)] = 64,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Serve the model with an OpenAI-compatible API where each request names its own steering.

    POST /v1/chat/completions and /v1/completions (stream or not) take an extra field, e.g.
    "steering": [{"vector": "sentiment", "alpha": 0.5, "layers": [8], "positions": "generated"}];
    GET /v1/steering/vectors lists the vectors; requests with different vectors decode in one batch.
    """
    from steerkit.serve import serve as run

    placement = _placement(device, dtype)
    if not vectors.is_dir():
        raise FileNotFoundError(f"no vector folder at {vectors}")
    run(model, vectors, host, port, device=placement[0], dtype=placement[1], max_batch=max_batch, max_queue=max_queue)


@app.command()
def clean(
    folder: Annotated[Path, typer.Argument(help="The folder an interrupted steerkit command was writing into.")],
) -> None:
    """Remove the temporary files an interrupted (killed) steerkit command left in FOLDER.

    Temporaries are named .NAME.steerkit-tmp-PID-XXXX; an old output set aside for --force
    (.NAME.steerkit-old-...) is put back when its replacement never arrived. Running commands' files stay.
    """
    from steerkit._io import clean as clean_folder

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    done = clean_folder(folder)
    for path, action in done:
        typer.echo(f"{action} {path}")
    if not done:
        typer.echo(f"no stale steerkit temporaries in {folder}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.secho(f"warning: {message}", fg="yellow", err=True)


def _fail(message: str, code: int) -> None:
    typer.secho(message, fg="red", err=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: an expected failure is one ``error:`` line and exit code 2; an interrupt exits 130."""
    import warnings

    from steerkit._io import Terminated

    warnings.showwarning = _show_warning
    os.environ.setdefault("MPLBACKEND", "Agg")  # the command line writes figures to files, never to a window
    if os.environ.get("WORLD_SIZE", "1") != "1" and not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  under torchrun rank 0 alone prints results
    try:
        code = app(args=argv, prog_name="steerkit", standalone_mode=False)
    except typer.TyperException as err:  # usage errors, bad parameters (typer's own click)
        if type(err).__name__ == "NoArgsIsHelpError":  # typer has printed the help already
            raise SystemExit(0) from None
        _fail(f"error: {err.format_message()}", getattr(err, "exit_code", 2))
    except typer.Abort:
        _fail("interrupted", 130)
    except Terminated as err:
        _fail(f"terminated (signal {err.signum}); partial output removed", err.code)
    except (ValueError, OSError, KeyError) as err:
        detail = err.args[0] if isinstance(err, KeyError) and err.args else err
        _fail(f"error: {detail}", 2)
    if code == 130:
        _fail("interrupted; partial output removed", 130)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
