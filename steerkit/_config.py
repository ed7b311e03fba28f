"""The options of steerkit's long jobs (``TrainConfig``, ``TuneConfig``) are dataclass fields that carry their
own help, so the function and its command share one list (the command line reads ``metadata["help"]``)."""

from dataclasses import field


def option(default, help: str):
    """A config field with ``default`` and the ``help`` its command-line option shows."""
    return field(default=default, metadata={"help": help})
