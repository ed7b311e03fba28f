"""``steerkit`` commands on sparse autoencoders: train-sae, eval-sae, sae-tune and attach-adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from steerkit.cli._common import (
    CorpusOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    ModelArg,
    _layers,
    _load,
    _model_inputs,
    _output,
    _parse_alpha,
    _placement,
    _sae_layer,
    app,
    config_options,
    is_main,
    read_jsonl,
)
from steerkit.sae.train import ARCHS, TrainConfig
from steerkit.sae.tune import TuneConfig

PANEL = "Sparse autoencoders"


@app.command("train-sae", rich_help_panel=PANEL)
@config_options(TrainConfig)
def train_sae(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write (sae-lens format).")],
    layer: Annotated[str, typer.Option(help="Block whose output the SAE reads (0-based); several, e.g. '6,13'.")],
    config: TrainConfig,
    model: ModelArg = "smollm2-135m-instruct",
    corpus: CorpusOpt = "default",
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Train a sparse autoencoder on a block's output, writing a directory sae-lens loads.

    Activations come from steerkit's own capture on the transformers model (no TransformerLens). Also
    writes training_log.json and training_curves.png (explained variance, L0, dead fraction over tokens).
    The training options are the fields of steerkit.sae.TrainConfig.
    """
    import steerkit as sk
    from steerkit import plots

    placement = _placement(device, dtype)
    if config.arch not in ARCHS:
        raise typer.BadParameter(f"{config.arch!r}: expected one of {list(ARCHS)}", param_hint="--arch")
    layers = _layers(layer, model)
    text = sk.load_corpus(corpus)
    _output(output, force, [*([text.source] if text.source else []), *_model_inputs(model)], directory=True)
    mdl, tok = _load(model, placement)
    result = sk.train_sae(mdl, tok, text, layers if len(layers) > 1 else layers[0], out=output, config=config,
                          force=force)  # fmt: skip
    saes = result if isinstance(result, dict) else {layers[0]: result}
    for value, sae in saes.items():
        folder = output if len(saes) == 1 else output / f"layer_{value}"
        if is_main():
            curves = folder / "training_curves.png"
            plots.close(plots.sae_training(sae.training_log, f"{config.arch} SAE, layer {value}", path=curves))
        last = sae.training_log[-1]
        typer.echo(
            f"layer {value}: explained variance {last['explained_variance']:.3f}, L0 {last['l0']:.1f}, "
            f"dead {last['dead_fraction']:.1%} -> {folder}"
        )


@app.command("eval-sae", rich_help_panel=PANEL)
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


@app.command("sae-tune", rich_help_panel=PANEL)
@config_options(TuneConfig)
def sae_tune(
    sae: Annotated[Path, typer.Argument(help="The frozen SAE (sae-lens folder or Hub repo) of a source model.")],
    data: Annotated[
        Path, typer.Option(help="A .jsonl of {'prompt', 'answer'} (or {'text'} for the kl loss), one per line.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Adapter directory (or checkpoint with --merge).")],
    config: TuneConfig,
    layer: Annotated[
        int | None, typer.Option(help="The block to splice it into (0-based; default: from the SAE's hook name).")
    ] = None,
    model: ModelArg = "smollm2-135m-instruct",
    merge: Annotated[bool, typer.Option(help="Merge the LoRA and write a full checkpoint instead.")] = False,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """SAE-tuning: LoRA-tune the model with a frozen SAE spliced in at LAYER, then drop the SAE.

    Writes a LoRA adapter that attach-adapter puts onto another model of the same family, or with
    --merge a checkpoint any engine serves. The training options are the fields of steerkit.sae.TuneConfig.
    """
    import steerkit as sk

    placement = _placement(device, dtype)
    config.checked()
    rows = read_jsonl(data)
    examples = [row["text"] if set(row) == {"text"} else row for row in rows]
    loaded = sk.load_sae(sae)
    layer = _sae_layer(loaded, layer, model)
    _output(output, force, [sae, data, *_model_inputs(model)], directory=True)
    mdl, tok = _load(model, placement)
    tuned = sk.sae_tune(mdl, tok, loaded, layer, examples, out=output, merge=merge, force=force, config=config)
    first, last = tuned.history[0], tuned.history[-1]
    typer.echo(f"loss {first:.4f} -> {last:.4f} over {len(tuned.history)} steps; wrote {output}")


@app.command("attach-adapter", rich_help_panel=PANEL)
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


def _latent_weights(spec: str) -> dict[int, float]:
    """``"123,456"`` or ``"123:2,456:-0.5"`` as ``{latent: weight}``."""
    weights = {}
    for item in spec.split(","):
        latent, _, weight = item.strip().partition(":")
        if not latent.isdigit():
            raise typer.BadParameter(
                f"{item!r}: expected LATENT or LATENT:WEIGHT, e.g. 123 or 123:2", param_hint="--latents"
            )
        weights[int(latent)] = _parse_alpha(weight) if weight else 1.0
    return weights


@app.command("feature-vector", rich_help_panel=PANEL)
def feature_vector(
    sae: Annotated[Path, typer.Argument(help="An SAE directory (sae-lens format) or a Hub repo id holding one.")],
    latents: Annotated[str, typer.Option(help="Latents, e.g. '123' or '123,456' or '123:2,456:-0.5' (weights).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Vector file to write (.safetensors).")],
    layer: Annotated[int | None, typer.Option(help="Its block (default: from the SAE's hook name).")] = None,
    force: ForceOpt = False,
) -> None:
    """A steering vector from SAE latents: their decoder rows, so alpha is added latent activation. It goes
    wherever a vector goes (generate, serve, bake, export-gguf, push)."""
    import steerkit as sk

    weights = _latent_weights(latents)
    _output(output, force, [sae])
    vec = sk.feature_vector(sk.load_sae(sae), weights, layer, source=str(sae))
    vec.save(output, force=force, inputs=[sae])
    typer.echo(
        f"wrote {output} (latents {sorted(weights)} at layer {vec.layers[0]}, norm {vec.norms()[vec.layers[0]]:.3g})"
    )


@app.command(rich_help_panel=PANEL)
def dashboard(
    sae: Annotated[Path, typer.Argument(help="An SAE directory (sae-lens format) or a Hub repo id holding one.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the site to (open index.html).")],
    model: ModelArg = "smollm2-135m-instruct",
    corpus: CorpusOpt = "default",
    latents: Annotated[str, typer.Option(help="Latents to show, e.g. '0-199' or '5,17,300'.")] = "0-199",
    tokens: Annotated[int, typer.Option(help="Held-out tokens to read.", min=1)] = 32_768,
    pairs: Annotated[
        str | None, typer.Option(help="A pair set (bundled name or .jsonl) for a separation column.")
    ] = None,
    top: Annotated[int, typer.Option(help="Top contexts per latent.", min=1)] = 8,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """A static, offline HTML dashboard of SAE latents: an index sortable by frequency, largest activation and
    separation on a pair set, and a page per latent (top contexts shaded by activation, histogram, logit lens,
    how to steer with it)."""
    import steerkit as sk
    from steerkit.arch import parse_layers
    from steerkit.dashboard import write

    placement = _placement(device, dtype)
    loaded = sk.load_sae(sae)
    chosen = parse_layers(latents, loaded.cfg.d_sae)
    text = sk.load_corpus(corpus)
    _output(output, force, [sae, *([text.source] if text.source else []), *_model_inputs(model)], directory=True)
    mdl, tok = _load(model, placement)
    stats = sk.latent_stats(mdl, tok, loaded, text, latents=chosen, tokens=tokens, top=top)
    separation = None
    if pairs is not None:
        ranked = sk.top_latents(mdl, tok, loaded, pairs, n=loaded.cfg.d_sae)
        separation = {r["latent"]: r["auroc"] for r in ranked if r["latent"] in set(chosen)}
    write(stats, output, str(sae), separation, pairs, title=f"{sae.name}: latents", force=force)
    typer.echo(f"wrote {output}/index.html ({len(chosen)} latents, {stats.tokens} tokens)")
