"""Splice an SAE into a model: block *layer*'s output becomes the SAE's reconstruction.

Works on transformers, TransformerLens and nnsight models (the hook sits on the same module ``steer`` uses).
Padding is never replaced, and by default neither is each row's first real token nor a token whose norm is
above the SAE's recorded outlier norm: attention sinks (on SmolLM2 the first token has ~170× the median
norm, and now and then the second or third too) are not reconstructed by a residual-stream SAE, and the SAEs
``train_sae`` writes never saw them. ``error_term=True`` adds back x − x̂ (without gradient), so the output
equals the original while gradients flow through the SAE, as sae-lens' ``use_error_term``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from steerkit import arch
from steerkit._checks import finite
from steerkit.backends import fingerprint
from steerkit.clamp import clamped
from steerkit.hooks import intervene, on_output
from steerkit.sae.io import check_max_norm, check_sae, load_sae, on_device, recorded_max_norm, sae_layer


def reconstruct(sae, x: torch.Tensor) -> torch.Tensor:
    """The SAE's reconstruction of ``x`` in ``x``'s dtype (the SAE runs in its own dtype)."""
    return sae.decode(sae.encode(x.to(sae.dtype))).to(x.dtype)


@contextlib.contextmanager
def replace_output(
    model: nn.Module,
    layer: int,
    fn: Callable[[torch.Tensor], torch.Tensor],
    skip_first: bool = True,
    max_norm: float | None = None,
) -> Iterator[nn.Module]:
    """Block ``layer``'s output h becomes ``fn(h)`` on real tokens (from the second one with ``skip_first``),
    except where ‖h‖ exceeds ``max_norm``."""
    layer = arch.validate_layer(layer, fingerprint(model)["num_hidden_layers"])
    if max_norm is not None:
        check_max_norm(max_norm)
    positions = 1 if skip_first else "all"

    def replace(h: torch.Tensor, tracker) -> torch.Tensor:
        new = fn(h)
        selected = tracker.selection(h, positions)
        if max_norm is not None:
            small = h.norm(dim=-1) <= max_norm
            selected = small if selected is None else selected & small
        return new if selected is None else torch.where(selected.unsqueeze(-1), new, h)

    with intervene(model, {layer: replace}):
        yield model


def is_transcoder(sae) -> bool:
    """Whether ``sae`` maps a block's MLP input to its output (sae-lens' transcoder classes) rather than
    reconstructing the residual stream."""
    return "transcoder" in type(sae.cfg).architecture()


@contextlib.contextmanager
def replace_mlp(model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor], skip_first: bool = True,
                max_norm: float | None = None) -> Iterator[nn.Module]:  # fmt: skip
    """Block ``layer``'s MLP output becomes ``fn(MLP input)``, but at each row's first position (``skip_first``)
    and where ‖[input, output]‖ exceeds ``max_norm`` (a transcoder's recorded outliers). A plain forward hook on
    the MLP, for every forward while it is entered; rows are taken as unpadded (packed text, or one prompt)."""
    layer = arch.validate_layer(layer, fingerprint(model)["num_hidden_layers"])

    def hook(_module, args, out):
        new = fn(args[0]).to(out.dtype)
        keep = torch.zeros(out.shape[:-1], dtype=torch.bool, device=out.device)
        if skip_first:
            keep[..., 0] = True
        if max_norm is not None:
            keep |= torch.cat([args[0], out], dim=-1).norm(dim=-1) > max_norm
        return torch.where(keep.unsqueeze(-1), out, new)

    with on_output(arch.mlp_module(model, layer), hook):
        yield model


def splice(
    model: nn.Module,
    sae,
    layer: int | None = None,
    error_term: bool = False,
    skip_first: bool = True,
    grad_through_sae: bool = True,
    max_norm: float | None = None,
    clamp: dict[int, float] | None = None,
) -> contextlib.AbstractContextManager[nn.Module]:
    """Replace block ``layer``'s output (default: the block the SAE's hook name reads) by ``sae``'s
    reconstruction inside the ``with`` block.

    ``sae``: a ``sae_lens.SAE`` or a directory sae-lens can load; it runs on the block's device (a moved copy if
    it is elsewhere), in its own dtype. ``grad_through_sae=False`` runs the SAE
    under ``no_grad`` (Resa's released code: nothing at or below the layer then gets a gradient).
    Tokens whose norm exceeds ``max_norm`` (default: the outlier norm ``train_sae`` recorded, if any)
    keep their activation; pass ``float("inf")`` to replace them too.

    A transcoder (``is_transcoder``) replaces the block's MLP output with its prediction from the MLP input
    (``replace_mlp``), the SAE's error included.

    ``clamp={latent: value}`` instead holds those latents at those activations and adds only the difference the
    decoder makes (``steerkit.clamp.clamped``: the reconstruction error stays, as in Neuronpedia and Goodfire).
    """
    sae = load_sae(sae)
    check_sae(sae, model)
    layer = sae_layer(sae, layer)
    max_norm = recorded_max_norm(sae) if max_norm is None else max_norm
    placed: dict = {}  # device -> the SAE there (moved once per context)

    def there(device: torch.device):
        if device not in placed:
            placed[device] = on_device(sae, device)
        return placed[device]

    if is_transcoder(sae):
        if clamp is not None or error_term:
            raise ValueError("clamp and error_term act on the residual stream: they do not apply to a transcoder")
        return replace_mlp(model, layer, lambda x: reconstruct(there(x.device), x), skip_first, max_norm)
    if clamp is not None:
        bad = [latent for latent in clamp if not 0 <= int(latent) < sae.cfg.d_sae]
        if bad or not clamp:
            raise ValueError(f"clamp={clamp!r}: expected {{latent: activation}} with latents in 0..{sae.cfg.d_sae - 1}")
        values = {int(latent): finite(value, f"clamp[{latent}]") for latent, value in clamp.items()}
        return replace_output(model, layer, clamped(sae, values), skip_first, max_norm)

    def fn(h: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(grad_through_sae and torch.is_grad_enabled()):
            new = reconstruct(there(h.device), h)
        return new + (h - new).detach() if error_term else new

    return replace_output(model, layer, fn, skip_first, max_norm)
