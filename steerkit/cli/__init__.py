"""The ``steerkit`` command line: one thin subcommand per capability; the logic lives in the library.

Every command checks what it can before a model loads (input files, layer specs, vector files, the output path)
and ends an expected failure with one ``error:`` line and exit code 2; an interrupt exits 130. Outputs follow
the library's rules: an existing output is replaced only with ``--force``, never an input. The commands live by
capability: ``vectors.py``, ``weights.py``, ``sae.py``, ``serve.py`` and ``files.py``; ``_common.py`` holds the
app, the shared options and ``main``.
"""

# each module registers its commands; --help lists them in this order
# isort: off
from steerkit.cli import vectors  # noqa: F401
from steerkit.cli import weights  # noqa: F401
from steerkit.cli import sae  # noqa: F401
from steerkit.cli import serve  # noqa: F401
from steerkit.cli import files  # noqa: F401

# isort: on
from steerkit.cli._common import app, main

__all__ = ["app", "main"]
