"""TransformerLens models (HookedTransformer, TransformerBridge): block *i* is ``blocks.{i}.hook_resid_post``."""

from __future__ import annotations

import torch


def hook_name(layer: int) -> str:
    """TransformerLens' name for the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


class TLRunner:
    """Runs a TransformerLens model with recording hooks, stopping after the deepest requested block."""

    padding_side = "right"  # causal attention: right padding never reaches the real tokens, mask or not

    def __init__(self, model):
        self.model = model
        self.n_layers = model.cfg.n_layers
        self.context_length = model.cfg.n_ctx
        self.tokenizer = model.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def run(self, input_ids, attention_mask, position_ids, layers) -> dict[int, torch.Tensor]:
        store: dict[int, torch.Tensor] = {}

        def recorder(layer):
            def hook(value, hook):
                store[layer] = value.detach()

            return hook

        stop = max(layers) + 1
        self.model.run_with_hooks(
            input_ids,
            fwd_hooks=[(hook_name(layer), recorder(layer)) for layer in layers],
            stop_at_layer=stop if stop < self.n_layers else None,
        )
        return store
