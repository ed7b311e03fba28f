"""steerkit: read behaviours out of language models and write them back in."""

from steerkit.arch import get_blocks, hidden_size, num_layers, residual_writers
from steerkit.capture import Recorder, capture
from steerkit.models import EMBEDDED, embedded_checkpoint, load_model

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED",
    "Recorder",
    "capture",
    "embedded_checkpoint",
    "get_blocks",
    "hidden_size",
    "load_model",
    "num_layers",
    "residual_writers",
]
