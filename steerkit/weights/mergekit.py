"""mergekit configurations: a mergekit YAML (``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``,
``linear``) run through steerkit's streaming merge, with mergekit 0.1.5's semantics and defaults.

Every key is either understood or an error naming it: steerkit never quietly ignores part of a config.
Per-layer gradients and filters (list-valued parameters), ``slices`` and ``modules`` are not supported.
steerkit computes in float32 whatever ``dtype`` says (mergekit computes in ``dtype``), so with
``dtype: bfloat16`` the two can differ by bf16 rounding; the output is written in ``out_dtype`` (else
``dtype``, else the base's dtype).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from steerkit.weights.merge import merge
from steerkit.weights.taskvec import TaskVector

log = logging.getLogger(__name__)

# method -> (its per-model parameters, its shared parameters): what mergekit 0.1.5 declares for each
_TASK_ARITHMETIC = ({"weight", "density"}, {"normalize", "rescale", "lambda", "int8_mask"})
PARAMETERS = {
    "task_arithmetic": _TASK_ARITHMETIC,
    "ties": _TASK_ARITHMETIC,
    "dare_ties": _TASK_ARITHMETIC,
    "dare_linear": _TASK_ARITHMETIC,
    "linear": ({"weight"}, {"normalize"}),
}
TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
UNSUPPORTED = {"slices", "modules", "tokenizer", "chat_template"}


def _scalar(value, where: str):
    if isinstance(value, bool | int | float):
        return value
    raise ValueError(f"{where} is {value!r}: steerkit takes one number per parameter (no gradients or filters)")


def read_config(config: str | os.PathLike | dict) -> dict:
    """A mergekit config (YAML file or dict), checked key by key; returns the parsed dict."""
    where = str(config) if not isinstance(config, dict) else "the config"
    if not isinstance(config, dict):
        try:
            config = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"cannot read the mergekit config {where}: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a mapping of mergekit keys")
    unsupported = sorted(UNSUPPORTED & config.keys())
    if unsupported:
        raise ValueError(f"{where}: {unsupported} are mergekit features steerkit does not run; use mergekit itself")
    unknown = sorted(config.keys() - TOP_LEVEL)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (steerkit reads {sorted(TOP_LEVEL)})")
    method = config.get("merge_method")
    if method not in PARAMETERS:
        raise ValueError(f"{where}: merge_method {method!r} is not one steerkit runs: {sorted(PARAMETERS)}")
    per_model, shared = PARAMETERS[method]
    for key, value in (config.get("parameters") or {}).items():
        if key not in per_model | shared:
            raise ValueError(f"{where}: parameter {key!r} does not apply to {method} ({sorted(per_model | shared)})")
        _scalar(value, f"{where}: parameters.{key}")
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError(f"{where}: 'models' must list at least one {{model: ..., parameters: ...}}")
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry or entry.keys() - {"model", "parameters"}:
            raise ValueError(f"{where}: models[{i}] must be {{model: ..., parameters: {{...}}}}, got {entry!r}")
        if not isinstance(entry["model"], str) or "+" in entry["model"]:
            raise ValueError(f"{where}: models[{i}].model {entry['model']!r}: a path or repo id (no +lora)")
        for key, value in (entry.get("parameters") or {}).items():
            if key not in per_model:
                raise ValueError(f"{where}: models[{i}] parameter {key!r} does not apply to {method}")
            _scalar(value, f"{where}: models[{i}].parameters.{key}")
    if config.get("tokenizer_source") not in (None, "base"):
        raise ValueError(
            f"{where}: tokenizer_source {config['tokenizer_source']!r}: steerkit keeps the base's tokenizer"
        )
    if method != "linear" and not config.get("base_model"):
        raise ValueError(f"{where}: {method} needs base_model")
    if method == "linear" and (config.get("parameters") or {}).get("normalize") is False:
        raise ValueError(f"{where}: linear with normalize: false is not supported (steerkit merges about a base)")
    return config


def _parameter(config: dict, entry: dict, key: str, default=None):
    value = (entry.get("parameters") or {}).get(key, (config.get("parameters") or {}).get(key, default))
    if value is None:
        raise ValueError(f"models entry {entry['model']!r} has no {key!r} (and no shared default)")
    return value


def merge_config(
    config: str | os.PathLike | dict,
    out: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    progress: bool | None = None,
    seed: int = 0,
) -> Path:
    """Run a mergekit config (see the module docstring) and write the checkpoint to ``out``."""
    config = read_config(config)
    method = config["merge_method"]
    shared = config.get("parameters") or {}
    models = config["models"]
    dtype = config.get("out_dtype") or config.get("dtype")
    if config.get("dtype") not in (None, "float32"):
        log.info("steerkit computes in float32; mergekit would compute in %s", config["dtype"])
    if method == "linear":  # Σ wᵢ·mᵢ / Σ wᵢ = m₀ + Σ (wᵢ / Σ w)·(mᵢ − m₀)
        weights = [float(_parameter(config, entry, "weight")) for entry in models]
        total = sum(weights)
        if abs(total) < 1e-8:
            raise ValueError("the linear weights sum to zero")
        first = models[0]["model"]
        vectors = [
            (TaskVector.between(e["model"], first), w / total) for e, w in zip(models[1:], weights[1:], strict=True)
        ]
        return merge(first, vectors or [(TaskVector.between(first, first), 0.0)], out, "task_arithmetic",
                     max_shard_size=max_shard_size, force=force, progress=progress, dtype=dtype)  # fmt: skip
    base = config["base_model"]
    vectors = [
        (
            TaskVector.between(entry["model"], base),
            float(_parameter(config, entry, "weight")),
            float(_parameter(config, entry, "density", 1.0)),
        )
        for entry in models
        if entry["model"] != base  # mergekit leaves the base out of the deltas
    ]
    if not vectors:
        raise ValueError("the config lists no model besides base_model")
    return merge(
        base,
        vectors,
        out,
        method,
        seed=seed,
        max_shard_size=max_shard_size,
        force=force,
        progress=progress,
        normalize=shared.get("normalize"),
        rescale=shared.get("rescale"),
        scale=float(shared.get("lambda", 1.0)),
        dtype=dtype,
    )
