"""The same capture and steer on TransformerLens and nnsight models.

A *runner* knows how to run a model up to some blocks and hand back their outputs ``[b, s, d]``.
``runner_for`` returns one for a TransformerLens or nnsight model and ``None`` for a plain
transformers model, which ``steerkit.capture`` drives with its own hooks.
"""

from __future__ import annotations

from torch import nn


def kind(model) -> str:
    """``"tlens"`` (HookedTransformer, TransformerBridge), ``"nnsight"`` or ``"hf"`` (anything else)."""
    module = type(model).__module__
    if module.startswith("transformer_lens"):
        return "tlens"
    if module.startswith("nnsight") or any(c.__module__.startswith("nnsight") for c in type(model).__mro__):
        return "nnsight"
    return "hf"


def runner_for(model: nn.Module, blocks: str | None = None):
    """A runner for a TransformerLens or nnsight model; ``None`` for a transformers model."""
    which = kind(model)
    if which == "tlens":
        from steerkit.backends.tlens import TLRunner

        return TLRunner(model)
    if which == "nnsight":
        from steerkit.backends.nnsight import NNsightRunner

        return NNsightRunner(model, blocks)
    return None


def hf_model(model: nn.Module) -> nn.Module | None:
    """The transformers model inside a backend wrapper (the model itself for transformers; None if it has none)."""
    which = kind(model)
    if which == "nnsight":
        return model._module
    if which == "tlens":
        return getattr(model, "original_model", None)
    return model


def fingerprint(model: nn.Module) -> dict:
    """What identifies a model's residual stream: ``model_type``, ``hidden_size``, ``num_hidden_layers``, ``name``."""
    inner = hf_model(model)
    if inner is None:  # a HookedTransformer: no transformers model inside
        cfg = model.cfg
        return {
            "model_type": cfg.original_architecture,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "name": cfg.model_name,
        }
    from steerkit import arch

    config = arch.unwrap(inner).config
    return {
        "model_type": getattr(config, "model_type", None),
        "hidden_size": arch.hidden_size(inner),
        "num_hidden_layers": arch.num_layers(inner),
        "name": getattr(config, "_name_or_path", None) or None,
    }
