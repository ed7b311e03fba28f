"""``steerkit serve``: the OpenAI-compatible server with per-request steering."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steerkit.cli._common import (
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    _placement,
    app,
)

PANEL = "Serving"


@app.command(rich_help_panel=PANEL)
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
