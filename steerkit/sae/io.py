"""Load sae-lens SAEs (a folder, a Hub repo, a sae-lens release) with errors that say what is wrong; find the
block an SAE reads from its hook name; check an SAE fits a model."""

from __future__ import annotations

import json
import math
import re
import warnings

from torch import nn

from steerkit._io import confined
from steerkit.backends import fingerprint

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def load_sae(sae_or_path, device: str = "cpu", sae_id: str | None = None, subfolder: str | None = None):
    """A ``sae_lens.SAE`` from a directory (``cfg.json`` + ``sae_weights.safetensors``), a Hub repo id holding one
    (optionally in ``subfolder``), or a sae-lens pretrained release with ``sae_id``; an SAE passes through.

    Repos and releases come through the Hub cache, so they load offline once cached. steerkit moves an SAE to
    the device of the activations it reads when it runs; ``device`` is where it is loaded.
    """
    if isinstance(sae_or_path, nn.Module):
        return sae_or_path
    if sae_id is not None:
        from sae_lens import SAE

        try:
            return SAE.from_pretrained(release=str(sae_or_path), sae_id=sae_id, device=device)
        except Exception as err:  # unknown release or id, not cached offline, network errors
            raise ValueError(f"cannot load sae-lens release {sae_or_path!r}, id {sae_id!r}: {err}") from None
    from steerkit._hub import local

    path = local(sae_or_path)
    path = confined(path, subfolder, "SAE subfolder") if subfolder else path
    if not path.is_dir():
        raise FileNotFoundError(f"no SAE directory at {path}: expected a folder with {CFG_FILE} and {WEIGHTS_FILE}")
    missing = [name for name in (CFG_FILE, WEIGHTS_FILE) if not confined(path, name, "SAE file").is_file()]
    if missing:
        raise ValueError(f"{path} is not a sae-lens SAE directory: {', '.join(missing)} missing")
    try:
        cfg = json.loads((path / CFG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / CFG_FILE} is not valid JSON ({err})") from err
    if not isinstance(cfg, dict) or not {"architecture", "d_in", "d_sae"} <= cfg.keys():
        raise ValueError(f"{path / CFG_FILE} lacks architecture / d_in / d_sae")
    _check_shapes(path, cfg)
    steerkit_info = (cfg.get("metadata") or {}).get("steerkit") if isinstance(cfg.get("metadata"), dict) else None
    if isinstance(steerkit_info, dict) and steerkit_info.get("max_norm") is not None:
        check_max_norm(steerkit_info["max_norm"], f"metadata.steerkit.max_norm in {path / CFG_FILE}")
    from sae_lens import SAE

    try:
        return SAE.load_from_disk(path, device=device)
    except Exception as err:  # safetensors header errors, missing or mis-shaped tensors, unknown architecture
        raise ValueError(f"cannot load the SAE in {path}: {type(err).__name__}: {err}") from err


def _check_shapes(path, cfg: dict) -> None:
    """``d_in`` and ``d_sae`` (and a transcoder's ``d_out``) as positive ints that match the weight file's tensors,
    read from its header before sae-lens sizes anything from them."""
    from safetensors import SafetensorError, safe_open

    sizes = {key: cfg.get(key, cfg.get("d_in")) for key in ("d_in", "d_sae", "d_out")}
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path / CFG_FILE}: {key}={value!r}: expected a positive int")
    d_in, d_sae, d_out = sizes.values()
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,)}
    try:
        with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"cannot load the SAE in {path}: {WEIGHTS_FILE} is not a readable safetensors file: {err}"
        ) from None
    for name, shape in expected.items():
        if name in shapes and shapes[name] != shape:
            raise ValueError(f"{path / WEIGHTS_FILE}: {name} has shape {list(shapes[name])} but {CFG_FILE} declares "
                             f"{list(shape)} (d_in={d_in}, d_sae={d_sae})")  # fmt: skip
    if not {"W_enc", "W_dec"} <= shapes.keys():
        raise ValueError(f"{path / WEIGHTS_FILE} lacks W_enc or W_dec: not an SAE's weights")


def check_max_norm(value, name: str = "max_norm") -> float:
    """An outlier norm as a positive number (``inf`` replaces every token); NaN, zero or less is an error."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive number (inf to splice every token)")
    return float(value)


def on_device(sae, device):
    """``sae`` on ``device``: itself when it is there already, else a moved copy (the caller's SAE stays put).

    steerkit runs an SAE where the activations are; its parameters keep their dtype and inputs are cast to it.
    """
    import copy

    import torch

    return sae if sae.device == torch.device(device) else copy.deepcopy(sae).to(device)


_HOOKS = (
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 0),  # TransformerLens: the output of block i
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), -1),  # the input of block i: the output of block i - 1
    (re.compile(r"^blocks\.(\d+)\.(?:hook_mlp_in|ln2\.hook_normalized)$"), 0),  # a transcoder of block i's MLP
    (re.compile(r"^(?:model\.)?(?:model\.)?layers\.(\d+)$"), 0),  # a transformers block module
    (re.compile(r"^transformer\.h\.(\d+)$|^gpt_neox\.layers\.(\d+)$"), 0),
)


def sae_layer(sae, layer: int | None = None) -> int:
    """The block whose output the SAE reads, from its ``hook_name``; ``layer`` (if given) wins, with a warning
    when the two disagree. A hook point that is not a block output is an error saying to pass ``layer=``."""
    hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    found = None
    for pattern, shift in _HOOKS:
        match = pattern.match(hook or "")
        if match:
            found = int(next(g for g in match.groups() if g is not None)) + shift
            break
    if layer is not None:
        if found is not None and found != layer:
            warnings.warn(
                f"the SAE reads {hook} (the output of block {found}) but layer={layer} was given", stacklevel=3
            )
        return layer
    if found is None or found < 0:
        raise ValueError(
            f"the SAE's hook {hook!r} is not the output of a decoder block (resid_post of block i, or resid_pre of "
            "block i + 1): pass layer= to say where it goes"
        )
    return found


def check_sae(sae, model: nn.Module) -> None:
    """Raise ValueError unless the SAE's ``d_in`` equals the model's residual width."""
    width = fingerprint(model)["hidden_size"]
    if sae.cfg.d_in != width:
        raise ValueError(f"the SAE reads d_in={sae.cfg.d_in} but the model's residual stream has width {width}")


def recorded_max_norm(sae) -> float | None:
    """The activation norm above which ``train_sae`` treated a token as an outlier (attention sink), if recorded."""
    info = sae.cfg.metadata.get("steerkit") or {}
    value = info.get("max_norm") if isinstance(info, dict) else None
    return check_max_norm(value, "the SAE's recorded max_norm") if value is not None else None
