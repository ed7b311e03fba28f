"""steerkit: read behaviours out of language models and write them back in."""

from steerkit.arch import get_blocks, hidden_size, num_layers, residual_writers
from steerkit.capture import Recorder, capture
from steerkit.condition import Condition, extract_condition, find_condition
from steerkit.data import Pair, bundled_sets, load_pairs, persona_pairs
from steerkit.data.corpus import load_corpus
from steerkit.evals import load_task, sweep
from steerkit.extract import METHODS, extract
from steerkit.hub import push_to_hub
from steerkit.models import EMBEDDED, embedded_checkpoint, load_model
from steerkit.sae import attach_adapter, evaluate_sae, load_sae, sae_tune, splice, train_sae
from steerkit.steer import generate, steer
from steerkit.vector import SteeringVector
from steerkit.weights import TaskVector, bake, merge

__version__ = "0.1.0"


def __getattr__(name: str):
    """``sk.plots`` on first use (matplotlib loads only when a figure is wanted)."""
    if name == "plots":
        import importlib

        return importlib.import_module("steerkit.plots")
    raise AttributeError(f"module 'steerkit' has no attribute {name!r}")


__all__ = [
    "EMBEDDED",
    "Condition",
    "METHODS",
    "Pair",
    "Recorder",
    "SteeringVector",
    "TaskVector",
    "attach_adapter",
    "bake",
    "bundled_sets",
    "capture",
    "embedded_checkpoint",
    "evaluate_sae",
    "extract",
    "extract_condition",
    "find_condition",
    "generate",
    "get_blocks",
    "hidden_size",
    "load_corpus",
    "load_model",
    "load_pairs",
    "load_sae",
    "load_task",
    "merge",
    "num_layers",
    "persona_pairs",
    "push_to_hub",
    "residual_writers",
    "sae_tune",
    "splice",
    "steer",
    "sweep",
    "train_sae",
]
