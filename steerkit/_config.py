"""The options of steerkit's long jobs and services (``TrainConfig``, ``TuneConfig``, ``ServeConfig``) are
dataclass fields that carry their own help, so the function and its command share one list (the command line
reads ``metadata["help"]``, and ``metadata["envvar"]`` where an environment variable may give the value)."""

from dataclasses import field


def option(default, help: str, envvar: str | None = None):
    """A config field with ``default`` and the ``help`` its command-line option shows (and the environment
    variable it may also be read from)."""
    return field(default=default, metadata={"help": help, "envvar": envvar})
