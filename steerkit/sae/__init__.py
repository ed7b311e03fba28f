"""Sparse autoencoders: training (sae-lens classes, steerkit capture), evaluation, splicing, SAE-tuning."""

from steerkit.sae.evaluate import evaluate_sae
from steerkit.sae.io import load_sae
from steerkit.sae.splice import splice
from steerkit.sae.train import ARCHS, train_sae

__all__ = ["ARCHS", "evaluate_sae", "load_sae", "splice", "train_sae"]
