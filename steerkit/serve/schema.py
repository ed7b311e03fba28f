"""What a request may ask of the server, checked before it reaches the engine: the vectors and conditions on
offer (``Library``), a request's ``steering`` (``parse_steering``, also the vLLM plugin's check), and the OpenAI
fields of a completion (``parse_completion``). Every refusal is a ``RequestError`` (HTTP 400) saying why."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steerkit import arch
from steerkit.batching import prompt_ids
from steerkit.serve.limits import ServeConfig
from steerkit.steer import scaled
from steerkit.vector import SteeringVector

POSITIONS = ("all", "prompt", "generated")


class RequestError(ValueError):
    """A request the server refuses (HTTP 400), with a message that says why."""


class Busy(RuntimeError):
    """More requests are waiting than the queue holds (HTTP 429)."""


class Unavailable(RuntimeError):
    """The server is shutting down (HTTP 503)."""


@dataclass
class Entry:
    """One steering entry of a request: α·v at some layers, on some positions, maybe under a condition."""

    vector: str
    alpha: float
    layers: list[int]
    positions: str = "all"
    condition: str | None = None


class Library:
    """The vectors and conditions a server may use, loaded by name from one folder (``NAME.safetensors`` or
    ``NAME.gguf`` vectors, ``NAME.condition.safetensors`` conditions)."""

    def __init__(self, folder: str | Path, hidden_size: int, num_layers: int):
        from steerkit.condition import Condition

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no vector folder at {folder}")
        self.vectors: dict[str, SteeringVector] = {}
        self.conditions: dict[str, Condition] = {}
        for path in sorted(folder.iterdir()):
            if path.name.endswith(".condition.safetensors"):
                self.conditions[path.name.removesuffix(".condition.safetensors")] = Condition.load(path)
            elif path.suffix in (".safetensors", ".gguf"):
                vec = SteeringVector.load(path)
                vec.check_model(hidden_size, num_layers)
                self.vectors[path.stem] = vec
        if not self.vectors:
            raise ValueError(f"{folder} holds no steering vectors (.safetensors or .gguf)")

    def describe(self) -> list[dict]:
        rows = []
        for name, vec in self.vectors.items():
            best = vec.default_layers() if vec.separation or len(vec.layers) == 1 else None
            rows.append({"name": name, "kind": "vector", "layers": vec.layers, "default_layers": best,
                         "method": vec.metadata.get("method"), "d_model": vec.d_model})  # fmt: skip
        rows += [
            {"name": name, "kind": "condition", "layer": c.layer, "threshold": c.threshold, "f1": c.f1}
            for name, c in self.conditions.items()
        ]
        return rows


def parse_steering(spec, library: Library, dtype_at: Callable[[int], torch.dtype]) -> list[Entry]:
    """The ``steering`` field of a request as entries, checked against what is loaded; RequestError if not.
    ``dtype_at(layer)`` is the dtype α·v is added in at that block (it must be finite there)."""
    if spec is None:
        return []
    if not isinstance(spec, list):
        raise RequestError("'steering' must be a list of {vector, alpha, layers?, positions?, condition?}")
    entries = []
    for i, item in enumerate(spec):
        if not isinstance(item, dict) or "vector" not in item:
            raise RequestError(f"steering[{i}] must be an object with a 'vector' name")
        unknown = set(item) - {"vector", "alpha", "layers", "positions", "condition"}
        if unknown:
            raise RequestError(f"steering[{i}] has unknown fields {sorted(unknown)}")
        name = item["vector"]
        if name not in library.vectors:
            raise RequestError(f"steering[{i}]: no vector {name!r}; loaded: {sorted(library.vectors)}")
        vec = library.vectors[name]
        alpha = item.get("alpha", 1.0)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise RequestError(f"steering[{i}]: alpha={alpha!r} is not a finite number")
        try:
            layers = vec.default_layers() if item.get("layers") is None else arch.layer_list(item["layers"], 10**6)
            missing = [layer for layer in layers if layer not in vec]
            if missing:
                raise ValueError(f"layers {missing} are not in vector {name!r} (it has {vec.layers})")
            for layer in layers:  # α·v must be finite in the model's dtype
                scaled(vec, layer, float(alpha), "add", dtype_at(layer))
        except (ValueError, TypeError) as err:
            raise RequestError(f"steering[{i}]: {err}") from None
        positions = item.get("positions", "all")
        if positions not in POSITIONS:
            raise RequestError(f"steering[{i}]: positions={positions!r}: expected one of {POSITIONS}")
        condition = item.get("condition")
        if condition is not None and condition not in library.conditions:
            raise RequestError(f"steering[{i}]: no condition {condition!r}; loaded: {sorted(library.conditions)}")
        entries.append(Entry(name, float(alpha), layers, positions, condition))
    return entries


@dataclass
class Completion:
    """A checked completion request: what the engine runs (``prompt_ids``, ``max_tokens``, ``entries``,
    ``sampling``, ``logprobs``) and how the reply is shaped."""

    prompt_ids: list[int]
    max_tokens: int
    entries: list[Entry]
    sampling: dict = field(default_factory=dict)  # temperature, top_p, seed, ignore_eos
    logprobs: int | None = None  # top alternatives per token (None: no log-probabilities)
    as_ids: bool = False  # (vLLM's return_tokens_as_token_ids) tokens named "token_id:{id}"
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these it would contain


def parse_completion(body, chat: bool, tok, library: Library, dtype_at: Callable[[int], torch.dtype],
                     limits: ServeConfig | None = None) -> Completion:  # fmt: skip
    """An OpenAI chat or completions request body (plus ``steering`` and vLLM's ``ignore_eos`` and
    ``return_tokens_as_token_ids``) as a ``Completion``; RequestError naming the first field that is wrong or
    over one of ``limits`` (messages, stop sequences, steering entries)."""
    limits = limits or ServeConfig()
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = _prompt(body, chat, tok, limits.max_messages)
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 64))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        raise RequestError(f"max_tokens={max_tokens!r}: expected an int in 1..4096")
    try:
        temperature = float(body.get("temperature") or 0.0)
        top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
    except (TypeError, ValueError):
        raise RequestError("temperature and top_p must be numbers") from None
    if not (0 <= temperature <= 100 and 0 < top_p <= 1):
        raise RequestError("temperature must be in 0..100 and top_p in (0, 1]")
    if body.get("n", 1) != 1:
        raise RequestError("n must be 1")
    flags = {key: body.get(key, False) for key in ("ignore_eos", "return_tokens_as_token_ids", "stream")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise RequestError(f"{key}={value!r}: expected true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed={seed!r}: expected an int")
    steering = body.get("steering")
    if isinstance(steering, list) and len(steering) > limits.max_steering:
        raise RequestError(f"{len(steering)} steering entries: the server's limit is {limits.max_steering} "
                           "(max_steering)")  # fmt: skip
    entries = parse_steering(steering, library, dtype_at)
    sampling = {"temperature": temperature, "top_p": top_p, "seed": seed, "ignore_eos": flags["ignore_eos"]}
    ids = prompt_ids(tok, [prompt])[0]
    return Completion(ids, max_tokens, entries, sampling, _logprobs_option(body, chat),
                      flags["return_tokens_as_token_ids"], flags["stream"], bool(options.get("include_usage")),
                      body.get("model"), _stop(body.get("stop"), limits.max_stop))  # fmt: skip


def _stop(stop, most: int) -> list[str]:
    """OpenAI's ``stop``: a string or a list of strings, each non-empty."""
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stops):
        raise RequestError("stop must be a string or a list of strings of 1 to 256 characters")
    if len(stops) > most:
        raise RequestError(f"{len(stops)} stop sequences: the server's limit is {most} (max_stop)")
    return stops


def _prompt(body: dict, chat: bool, tok, most: int) -> str:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError("'messages' must be a non-empty list of {role, content}")
        if len(messages) > most:
            raise RequestError(f"{len(messages)} messages: the server's limit is {most} (max_messages)")
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise RequestError("each message needs a role (system, user, assistant) and string content")
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n".join(m["content"] for m in messages) + "\n"
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be a non-empty string")
    return prompt


def _logprobs_option(body: dict, chat: bool) -> int | None:
    """How many top alternatives each token's log-probability comes with (None: no log-probabilities): OpenAI's
    ``logprobs`` (an int) for completions, ``logprobs: true`` and ``top_logprobs`` for chat."""
    if chat:
        wanted, top = body.get("logprobs"), body.get("top_logprobs")
        if wanted not in (None, True, False):
            raise RequestError(f"logprobs={wanted!r}: expected true or false")
        if top is not None and not wanted:
            raise RequestError("top_logprobs needs logprobs: true")
        n = (top or 0) if wanted else None
    else:
        n = body.get("logprobs")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 20):
        raise RequestError(f"{'top_logprobs' if chat else 'logprobs'}={n!r}: expected an int in 0..20")
    return n
