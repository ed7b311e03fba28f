"""``steerkit`` commands in weight space: diff (task vectors), merge and bake."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steerkit.cli._common import (
    ALPHA_HELP,
    ForceOpt,
    LayersOpt,
    VectorOpt,
    _layers,
    _listed,
    _load_vector,
    _model_inputs,
    _output,
    _parse_alpha,
    app,
)
from steerkit.weights.bake import MODES
from steerkit.weights.merge import METHODS

PANEL = "Weights"


@app.command(rich_help_panel=PANEL)
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


@app.command(rich_help_panel=PANEL)
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
    method: Annotated[str, typer.Option(help=_listed(METHODS))] = "task_arithmetic",
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


@app.command(rich_help_panel=PANEL)
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

    if family not in MODES:
        raise typer.BadParameter(f"{family!r}: expected one of {list(MODES)}", param_hint="--family")
    from steerkit._checks import finite

    vec = _load_vector(vector)
    a = finite(alpha)
    _output(output, force, [*_model_inputs(base), vector], directory=True)
    chosen = _layers(layers, base) if layers else None
    sk.bake(base, vec, a, output, layers=chosen, max_shard_size=max_shard_size, force=force, family=family)
    typer.echo(f"wrote {output}")
