"""steerkit: read behaviours out of language models and write them back in."""

from steerkit.arch import get_blocks, hidden_size, num_layers, residual_writers
from steerkit.capture import Recorder, capture
from steerkit.data import Pair, bundled_sets, load_pairs, persona_pairs
from steerkit.evals import load_task, sweep
from steerkit.extract import METHODS, extract
from steerkit.models import EMBEDDED, embedded_checkpoint, load_model
from steerkit.steer import generate, steer
from steerkit.vector import SteeringVector
from steerkit.weights import TaskVector, bake, merge

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED",
    "METHODS",
    "Pair",
    "Recorder",
    "SteeringVector",
    "TaskVector",
    "bake",
    "bundled_sets",
    "capture",
    "embedded_checkpoint",
    "extract",
    "generate",
    "get_blocks",
    "hidden_size",
    "load_model",
    "load_pairs",
    "load_task",
    "merge",
    "num_layers",
    "persona_pairs",
    "residual_writers",
    "steer",
    "sweep",
]
