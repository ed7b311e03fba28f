"""Sparse autoencoders: training (sae-lens classes, steerkit capture), evaluation, splicing, SAE-tuning."""

from steerkit.sae.evaluate import evaluate_sae, top_activations
from steerkit.sae.io import load_sae
from steerkit.sae.splice import splice
from steerkit.sae.train import ARCHS, TrainConfig, train_sae
from steerkit.sae.tune import TuneConfig, attach_adapter, sae_tune

__all__ = [
    "ARCHS",
    "TrainConfig",
    "TuneConfig",
    "attach_adapter",
    "evaluate_sae",
    "load_sae",
    "sae_tune",
    "splice",
    "top_activations",
    "train_sae",
]
