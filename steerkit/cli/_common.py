"""What every ``steerkit`` command shares: the typer app, the common options, the checks made before a model
loads, and ``main`` (an expected failure is one ``error:`` line and exit code 2; an interrupt exits 130)."""

from __future__ import annotations

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
    from steerkit._hub import is_repo_id

    if not path.is_file() and not is_repo_id(path):
        raise FileNotFoundError(f"vector file {path} does not exist (nor is it a Hub repo id org/name)")
    return sk.SteeringVector.load(path)


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


CorpusOpt = Annotated[
    str,
    typer.Option(help="'default' (embedded offline prose), a .txt / .jsonl file or folder, or a dataset name."),
]


def _listed(registry: dict) -> str:
    """An option's help read from a registry of name -> entry with an ``about``."""
    return "One of: " + "; ".join(f"{name} ({entry.about})" for name, entry in registry.items()) + "."


def config_options(cls):
    """A decorator: the command also takes every field of the dataclass ``cls`` as an option (type, default and
    help from the field) and receives them as one ``config=cls(...)``, so the library's config is the one list of
    a long job's options."""
    import dataclasses
    import functools
    import inspect
    import typing

    hints = typing.get_type_hints(cls)
    extra = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                          annotation=Annotated[hints[f.name], typer.Option(help=f.metadata["help"],
                                                                            envvar=f.metadata.get("envvar"))])
        for f in dataclasses.fields(cls)
    ]  # fmt: skip

    def wrap(command):
        resolved = typing.get_type_hints(command, include_extras=True)  # (this package defers annotations)
        own = [p.replace(annotation=resolved[p.name]) for p in inspect.signature(command).parameters.values()
               if p.name != "config"]  # fmt: skip

        @functools.wraps(command)
        def with_config(**values):
            config = cls(**{f.name: values.pop(f.name) for f in dataclasses.fields(cls)})
            return command(config=config, **values)

        with_config.__signature__ = inspect.Signature([*own, *extra])
        with_config.__annotations__ = {}  # typer reads the signature's (resolved) annotations
        return with_config

    return wrap


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
