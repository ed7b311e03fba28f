"""nnsight models (``LanguageModel`` / ``TransformersModel``): block outputs read inside a trace.

nnsight runs the code of a ``with model.trace(...)`` block from its source, so this works from files and
notebooks (not from code piped to stdin).
"""

from __future__ import annotations

import torch

from steerkit import arch


def blocks_envoy(model, blocks: str | None = None):
    """The nnsight envoy of the decoder-block list (found on the wrapped transformers model)."""
    inner = model._module
    target = arch.get_blocks(inner, blocks)
    path = next(name for name, module in inner.named_modules() if module is target)
    envoy = model
    for part in path.split("."):
        envoy = getattr(envoy, part)
    return envoy


class NNsightRunner:
    """Runs an nnsight model in a trace that saves block outputs and stops after the deepest one."""

    padding_side = "right"

    def __init__(self, model, blocks: str | None = None):
        self.model = model
        self.blocks = blocks_envoy(model, blocks)
        self.n_layers = len(arch.get_blocks(model._module, blocks))
        self.context_length = arch.context_length(model._module)
        self.tokenizer = getattr(model, "tokenizer", None)

    @property
    def device(self) -> torch.device:
        return arch.input_device(self.model._module)

    def run(self, input_ids, attention_mask, position_ids, layers) -> dict[int, torch.Tensor]:
        order = sorted(layers)  # nnsight requires modules to be visited in execution order
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        saved: list = []  # filled in place: names first bound inside a trace do not survive it in a function
        with self.model.trace(inputs) as tracer:
            for layer in order:
                saved.append(self.blocks[layer].output.save())
            tracer.stop()
        return {
            layer: (out[0] if isinstance(out, tuple) else out).detach() for layer, out in zip(order, saved, strict=True)
        }
