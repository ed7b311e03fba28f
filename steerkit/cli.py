"""The ``steerkit`` command line: one thin subcommand per capability; the logic lives in the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="steerkit: read behaviours out of language models (activations, directions) and write them back in.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelArg = Annotated[
    str, typer.Option("--model", "-m", help="Embedded model name (see `steerkit models`), checkpoint dir or hub id.")
]


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


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


def read_texts(path: Path) -> list[str]:
    """Texts from a file: one per line (.txt), or the ``text`` field of each line (.jsonl)."""
    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint="--texts")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise typer.BadParameter(f"{path}:{number}: expected a JSON object with a 'text' field ({err})") from None
    return texts


@app.command()
def capture(
    texts: Annotated[
        Path, typer.Option("--texts", "-t", help="A .txt file (one text per line) or .jsonl ({'text': ...}).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Safetensors file to write.")],
    model: ModelArg = "smollm2-135m-instruct",
    layers: Annotated[str, typer.Option(help="'all', '12', '4,8,12' or '4-25' (inclusive).")] = "all",
    position: Annotated[str, typer.Option(help="'last', 'mean', 'all' or a token index such as -1.")] = "last",
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 16,
    truncate: Annotated[bool, typer.Option(help="Cut texts longer than the context instead of failing.")] = False,
) -> None:
    """Capture residual-stream activations (block outputs) for each text and write them to a safetensors file.

    The file holds `activations`, float32 [N, len(layers), d_model], and metadata naming the model, layers
    and position. With --position all it holds [T, len(layers), d_model] and `rows`, the text of each token.
    """
    import steerkit as sk
    from steerkit._io import save_safetensors
    from steerkit.arch import parse_layers

    items = read_texts(texts)
    mdl, tok = sk.load_model(model)
    layer_list = parse_layers(layers, sk.num_layers(mdl))
    pos = int(position) if position.lstrip("-").isdigit() else position
    result = sk.capture(
        mdl, tok, items, layer_list, position=pos, batch_size=batch_size, truncate=truncate, progress=True
    )
    tensors = {"activations": result[0], "rows": result[1]} if pos == "all" else {"activations": result}
    meta = {"model": model, "layers": json.dumps(layer_list), "position": str(pos), "n_texts": str(len(items))}
    save_safetensors(tensors, output, meta)
    shape = tuple(tensors["activations"].shape)
    typer.echo(f"wrote {output}: activations {shape}, layers {layers}, position {pos}")


def main() -> None:
    """Entry point: bad input ends with one clear line and exit code 2, not a traceback."""
    try:
        app()
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
