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
    config_options,
)
from steerkit.serve.limits import ServeConfig

PANEL = "Serving"


@app.command(rich_help_panel=PANEL)
@config_options(ServeConfig)
def serve(
    vectors: Annotated[
        Path, typer.Option(help="Folder of NAME.safetensors / NAME.gguf vectors (and NAME.condition.safetensors).")
    ],
    config: ServeConfig,
    model: ModelArg = "smollm2-135m-instruct",
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Serve the model with an OpenAI-compatible API where each request names its own steering.

    POST /v1/chat/completions and /v1/completions (stream or not) take an extra field, e.g.
    "steering": [{"vector": "sentiment", "alpha": 0.5, "layers": [8], "positions": "generated"}];
    GET /v1/steering/vectors lists the vectors; requests with different vectors decode in one batch.
    GET /health needs no key; GET /metrics is Prometheus' text format. SIGTERM drains, then exits 0.
    """
    from steerkit.serve import serve as run

    placement = _placement(device, dtype)
    config.checked()
    if not vectors.is_dir():
        raise FileNotFoundError(f"no vector folder at {vectors}")
    run(model, vectors, host, port, device=placement[0], dtype=placement[1], config=config)
