"""Serve steering: an OpenAI-compatible server whose requests carry their own vectors, decoded in one batch.

- ``schema.py``: what a request may ask (``Library`` of vectors and conditions loaded by name from one folder,
  ``parse_steering``, ``parse_completion``) and the refusals (``RequestError`` 400, ``Busy`` 429);
- ``engine.py``: the batch loop (continuous batching, per-row steering in one hook per block);
- ``kv.py``: KV-cache surgery between steps; ``sampling.py``: the next token and its log-probabilities;
- ``limits.py``: the limits and key (``ServeConfig``) and the guard in front of the app;
  ``metrics.py``: ``/metrics``;
- ``app.py``: the FastAPI routes, ``serve`` and ``launch``.
"""

from steerkit.serve.app import create_app, launch, serve
from steerkit.serve.engine import Engine, Request
from steerkit.serve.limits import ServeConfig
from steerkit.serve.schema import (
    POSITIONS,
    Busy,
    Completion,
    Entry,
    Library,
    RequestError,
    parse_completion,
    parse_steering,
)

__all__ = [
    "POSITIONS",
    "Busy",
    "Completion",
    "Engine",
    "Entry",
    "Library",
    "Request",
    "ServeConfig",
    "RequestError",
    "create_app",
    "launch",
    "parse_completion",
    "parse_steering",
    "serve",
]
