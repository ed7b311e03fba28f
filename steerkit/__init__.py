"""steerkit: read behaviours out of language models and write them back in.

Layers. A module imports only from its own layer or the layers below it (``tests/test_layers.py`` checks every
import, those inside functions too, and that there is no import cycle); a subpackage stands at its layer with
everything it holds unless a module of it is named on its own line.

    0 foundations   _checks _config _io batching distributed formats
    1 structure     arch checkpoint
    2 models        models backends
    3 plumbing      _hub hooks data
    4 data types    vector weights.taskvec capture
    5 appliers      extract steer sae.io clamp weights
    6 methods       condition sae evals features
    7 services      hub plots serve dashboard
    8 entry points  integrations cli demo steerkit
"""

from steerkit.arch import get_blocks, hidden_size, num_layers, residual_writers
from steerkit.capture import Recorder, capture
from steerkit.condition import Condition, extract_condition, find_condition
from steerkit.data import Pair, bundled_sets, load_pairs, persona_pairs
from steerkit.data.corpus import load_corpus
from steerkit.evals import load_task, sweep
from steerkit.extract import METHODS, extract
from steerkit.features import feature_vector, latent_stats, top_latents
from steerkit.hub import push_to_hub
from steerkit.models import EMBEDDED, embedded_checkpoint, load_model
from steerkit.sae import TrainConfig, TuneConfig, attach_adapter, evaluate_sae, load_sae, sae_tune, splice, train_sae
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
    "TrainConfig",
    "TuneConfig",
    "attach_adapter",
    "bake",
    "bundled_sets",
    "capture",
    "embedded_checkpoint",
    "evaluate_sae",
    "extract",
    "extract_condition",
    "feature_vector",
    "find_condition",
    "generate",
    "get_blocks",
    "hidden_size",
    "latent_stats",
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
    "top_latents",
    "train_sae",
]
