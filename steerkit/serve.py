"""Serve steering: an OpenAI-compatible server whose requests carry their own vectors, decoded in one batch.

The ``Engine`` owns the model in one thread and runs continuous batching over a KV cache of its own making:
between decode steps it admits waiting requests (prefilled together, left-padded, their caches joined to the
running batch) and drops finished or abandoned ones. Each row of the batch has its own steering — a sum of
α·v over the request's entries, on its prompt, its generated tokens or both, optionally under a CAST
condition decided from its prompt — added inside one hook per block (``hooks.intervene``), so requests with
different vectors, α and layers decode together and an unsteered row stays unsteered.

``create_app`` wraps an engine in FastAPI: ``/v1/chat/completions``, ``/v1/completions`` (streamed as
server-sent events or not), ``/v1/models`` and ``/v1/steering/vectors``. Vectors and conditions are loaded by
name from one folder at start; no request can name a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steerkit import arch
from steerkit.batching import pad_batch, pad_id
from steerkit.hooks import block_dtype, intervene
from steerkit.steer import scaled
from steerkit.vector import SteeringVector

log = logging.getLogger(__name__)
POSITIONS = ("all", "prompt", "generated")


def _cache_argument() -> str:
    """The forward argument that carries a KV cache: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


CACHE_ARGUMENT = _cache_argument()


class RequestError(ValueError):
    """A request the server refuses (HTTP 400), with a message that says why."""


class Busy(RuntimeError):
    """More requests are waiting than the queue holds (HTTP 429)."""


@dataclass
class Entry:
    """One steering entry of a request: α·v at some layers, on some positions, maybe under a condition."""

    vector: str
    alpha: float
    layers: list[int]
    positions: str = "all"
    condition: str | None = None


@dataclass
class Request:
    """One completion request and its progress; ``emit`` hands events to the waiting client."""

    prompt_ids: list[int]
    max_tokens: int
    entries: list[Entry]
    emit: object  # callable(event: dict) -> None, thread-safe
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # (vLLM's field) always max_tokens tokens: for benchmarks
    logprobs: int | None = None  # with each token its log-probability and this many top alternatives
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    fired: dict = field(default_factory=dict)  # condition name -> bool, decided at its prompt
    created: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None


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


# --- the batch's KV cache ---------------------------------------------------------------------------------


def _cache_layers(cache):
    return cache.layers


def _select_rows(cache, index: torch.Tensor) -> None:
    for layer in _cache_layers(cache):
        layer.keys, layer.values = layer.keys[index], layer.values[index]


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[-2] == width:
        return t
    pad = t.new_zeros((*t.shape[:-2], width - t.shape[-2], t.shape[-1]))
    return torch.cat([pad, t], dim=-2)


def _join(cache, other) -> None:
    """Append ``other``'s rows to ``cache``, left-padding the shorter one along the sequence."""
    for mine, theirs in zip(_cache_layers(cache), _cache_layers(other), strict=True):
        width = max(mine.keys.shape[-2], theirs.keys.shape[-2])
        mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
        mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])


def _trim_left(cache, n: int) -> None:
    for layer in _cache_layers(cache):
        layer.keys, layer.values = layer.keys[..., n:, :], layer.values[..., n:, :]


# --- the engine -----------------------------------------------------------------------------------------------


class _Plan:
    """What the steering hooks add in the current forward: per layer a ``[b, d]`` sum of α·v for each row, and
    rows whose entries wait on a condition decided at this forward's condition blocks."""

    def __init__(self):
        self.add: dict[int, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None  # [b, s] positions that receive it
        self.pending: list[tuple[int, Request, Entry]] = []  # (row, request, entry) decided in this forward
        self.hidden_mask: torch.Tensor | None = None  # [b, s] real prompt tokens (condition means)


class Engine:
    """Continuous batching with per-row steering, in one thread that owns the model (see the module docstring)."""

    def __init__(self, model, tok, library: Library, max_batch: int = 16, max_queue: int = 64, eos=None):
        self.model, self.tok, self.library = model, tok, library
        self.max_batch, self.max_queue = max_batch, max_queue
        config_eos = model.generation_config.eos_token_id if eos is None else eos
        self.eos = set(config_eos if isinstance(config_eos, list) else [config_eos]) - {None}
        self.pad = pad_id(tok)
        self.context = arch.context_length(model) or 10**9
        self.device = arch.input_device(model)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.active: list[Request] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [b, L] over the cache plus the next token
        self.plan = _Plan()
        self.stats = {"steps": 0, "prefills": 0, "served": 0}
        layers = {layer for vec in library.vectors.values() for layer in vec.layers}
        layers |= {c.layer for c in library.conditions.values()}
        self._layers = sorted(layers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steerkit-engine", daemon=True)
        self._thread.start()

    # -- interface for the web layer --
    def submit(self, request: Request) -> None:
        if len(request.prompt_ids) + request.max_tokens > self.context:
            raise RequestError(
                f"prompt of {len(request.prompt_ids)} tokens + max_tokens {request.max_tokens} exceeds the "
                f"model's context of {self.context}"
            )
        if self.waiting.qsize() >= self.max_queue:
            raise Busy(f"{self.waiting.qsize()} requests are waiting (queue limit {self.max_queue}); retry later")
        self.waiting.put(request)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    # -- the loop --
    def _run(self) -> None:
        fns = {layer: self._hook(layer) for layer in self._layers}
        with torch.inference_mode(), intervene(self.model, fns):
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception as err:  # a bug must not leave clients waiting forever
                    log.exception("engine step failed")
                    for request in [*self.active, *self._drain()]:
                        request.emit({"error": f"server error: {type(err).__name__}: {err}"})
                    self.active, self.cache, self.mask = [], None, None

    def _drain(self) -> list[Request]:
        out = []
        while not self.waiting.empty():
            out.append(self.waiting.get_nowait())
        return out

    def _step(self) -> None:
        self._drop([r for r in self.active if r.cancelled])
        room = self.max_batch - len(self.active)
        new = []
        while room > len(new):
            try:
                request = self.waiting.get(timeout=0.05 if not (self.active or new) else 0)
            except queue.Empty:
                break
            if not request.cancelled:
                new.append(request)
        if new:
            self._prefill(new)
        if self.active:
            self._decode()

    def _hook(self, layer: int):
        library = self.library

        def fn(h: torch.Tensor, _tracker) -> torch.Tensor | None:
            plan = self.plan
            add = plan.add.get(layer)
            for row, request, entry in plan.pending:  # CAST: decide at the condition's block, steer after it
                condition = library.conditions[entry.condition]
                if layer == condition.layer and entry.condition not in request.fired:
                    weights = plan.hidden_mask[row].float().to(h.device)
                    mean = (h[row].float() * weights.unsqueeze(-1)).sum(0) / weights.sum().clamp_min(1)
                    request.fired[entry.condition] = bool(condition.fires(mean.unsqueeze(0))[0])
                steer_prompt = entry.positions != "generated" and layer in entry.layers
                if steer_prompt and layer > condition.layer and request.fired.get(entry.condition):
                    extra = torch.zeros(h.shape[0], h.shape[-1], dtype=h.dtype, device=h.device)
                    extra[row] = scaled(library.vectors[entry.vector], layer, entry.alpha, "add", h.dtype).to(h.device)
                    add = extra if add is None else add + extra
            if add is None:
                return None
            mask = plan.mask.to(h.device).unsqueeze(-1).to(h.dtype)
            return h + mask * add.to(h.dtype).unsqueeze(1)

        return fn

    def _plan(self, requests: Sequence[Request], phase: str, mask: torch.Tensor) -> _Plan:
        """The steering of one forward: ``phase`` is "prompt" (a prefill) or "generated" (a decode step)."""
        plan = _Plan()
        plan.mask = mask.bool()
        plan.hidden_mask = mask.bool() if phase == "prompt" else None
        d = None
        for row, request in enumerate(requests):
            for entry in request.entries:
                if entry.condition is not None and phase == "prompt":  # decided here even if it steers later
                    plan.pending.append((row, request, entry))
                    continue
                if entry.positions not in ("all", phase):
                    continue
                if entry.condition is not None and not request.fired.get(entry.condition):
                    continue
                vec = self.library.vectors[entry.vector]
                for layer in entry.layers:
                    if d is None:
                        d = vec.d_model
                    if layer not in plan.add:
                        plan.add[layer] = torch.zeros(len(requests), d, dtype=torch.float64)
                    plan.add[layer][row] += vec[layer].double() * entry.alpha
        if phase == "prompt":  # a condition is decided before its rows are steered: at its block, once
            plan.pending.sort(key=lambda item: self.library.conditions[item[2].condition].layer)
        return plan

    def _prefill(self, requests: list[Request]) -> None:
        ids, mask, positions = pad_batch([r.prompt_ids for r in requests], self.pad, "left")
        self.plan = self._plan(requests, "prompt", mask)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
        )
        self.plan = _Plan()
        self.stats["prefills"] += 1
        tokens = self._sample(out.logits[:, -1], requests)
        cache = out["cache"] if "cache" in out else out.past_key_values  # transformers renamed it in 5.x
        if self.cache is None:
            self.cache, self.mask, self.active = cache, mask, list(requests)
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            self.mask = torch.cat([self._pad_mask(self.mask, width), self._pad_mask(mask, width)])
            _join(self.cache, cache)
            self.active += requests
        self._emit(requests, tokens)

    @staticmethod
    def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
        return torch.cat([mask.new_zeros((mask.shape[0], width - mask.shape[1])), mask], 1)

    def _decode(self) -> None:
        requests = list(self.active)
        last = torch.tensor([[r.generated[-1]] for r in requests])
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(requests), 1))], 1)
        positions = (self.mask.sum(-1, keepdim=True) - 1).clamp(min=0)
        self.plan = self._plan(requests, "generated", torch.ones(len(requests), 1))
        out = self.model(
            input_ids=last.to(self.device),
            attention_mask=self.mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **{CACHE_ARGUMENT: self.cache},
        )
        self.plan = _Plan()
        self.stats["steps"] += 1
        self._emit(requests, self._sample(out.logits[:, -1], requests))

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[dict]:
        """One event per row: the next token, with its log-probabilities if the request asked for them (those of
        the model's distribution, before temperature and top-p, as OpenAI and vLLM report them)."""
        logits = logits.float().cpu()
        events = []
        for row, request in zip(logits, requests, strict=True):
            event = {"token": self._pick(row, request)}
            if request.logprobs is not None:
                logp = torch.log_softmax(row, -1)
                top = logp.topk(request.logprobs) if request.logprobs else None
                event["logprob"] = float(logp[event["token"]])
                event["top"] = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            events.append(event)
        return events

    @staticmethod
    def _pick(row: torch.Tensor, request: Request) -> int:
        if request.temperature <= 0:
            return int(row.argmax())
        if request.generator is None:
            request.generator = torch.Generator().manual_seed(request.seed if request.seed is not None else 0)
        probs = torch.softmax(row / request.temperature, -1)
        if request.top_p < 1:
            ordered, index = probs.sort(descending=True)
            keep = ordered.cumsum(0) - ordered < request.top_p
            probs = torch.zeros_like(probs).scatter(0, index[keep], ordered[keep])
        return int(torch.multinomial(probs, 1, generator=request.generator))

    def _emit(self, requests: Sequence[Request], events: list[dict]) -> None:
        done = []
        for request, event in zip(requests, events, strict=True):
            token = event["token"]
            if token in self.eos and not request.ignore_eos:
                request.emit({"finish": "stop"})
                done.append(request)
                continue
            request.generated.append(token)
            request.emit(event)
            if len(request.generated) >= request.max_tokens:
                request.emit({"finish": "length"})
                done.append(request)
        self._drop(done)

    def _drop(self, requests: Sequence[Request]) -> None:
        if not requests:
            return
        gone = {id(r) for r in requests}
        keep = [i for i, r in enumerate(self.active) if id(r) not in gone]
        self.stats["served"] += len(self.active) - len(keep)
        if not keep:
            self.active, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep)
        self.active = [self.active[i] for i in keep]
        _select_rows(self.cache, index.to(self.device))
        self.mask = self.mask[index]
        empty = int((self.mask.cumsum(1) == 0).sum(1).min())  # columns that are padding in every row
        if empty:
            self.mask = self.mask[:, empty:]
            _trim_left(self.cache, empty)


# --- the web layer --------------------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str):
    """A FastAPI app serving ``engine`` with OpenAI's request and response shapes (plus ``steering``)."""
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse, StreamingResponse

    from steerkit.models import chat_prompt

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()

    app = FastAPI(title="steerkit", description="OpenAI-compatible completions with per-request steering",
                  lifespan=lifespan)  # fmt: skip
    tok = engine.tok

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "steerkit"}]}

    @app.get("/v1/steering/vectors")
    async def vectors():
        return {"object": "list", "data": engine.library.describe()}

    async def complete(http, chat: bool):
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        try:
            prompt = _prompt(body, chat, tok, chat_prompt)
            max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 64))
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
                raise RequestError(f"max_tokens={max_tokens!r}: expected an int in 1..4096")
            temperature = float(body.get("temperature") or 0.0)
            top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
            if not (0 <= temperature <= 100 and 0 < top_p <= 1):
                raise RequestError("temperature must be in 0..100 and top_p in (0, 1]")
            if body.get("n", 1) != 1:
                raise RequestError("n must be 1")
            ignore_eos, options = body.get("ignore_eos", False), body.get("stream_options") or {}
            if not isinstance(ignore_eos, bool) or not isinstance(options, dict):
                raise RequestError("ignore_eos must be true or false and stream_options an object")
            entries = parse_steering(body.get("steering"), engine.library, lambda i: block_dtype(engine.model, i))
            logprobs = _logprobs_option(body, chat)
            as_ids = body.get("return_tokens_as_token_ids", False)  # (vLLM's field) tokens as "token_id:{id}"
            if not isinstance(as_ids, bool):
                raise RequestError(f"return_tokens_as_token_ids={as_ids!r}: expected true or false")
        except RequestError as err:
            return error(400, str(err))
        except (TypeError, ValueError) as err:
            return error(400, f"bad request: {err}")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        emit = lambda e: loop.call_soon_threadsafe(events.put_nowait, e)  # noqa: E731  (called from the engine)
        sampling = {"temperature": temperature, "top_p": top_p, "seed": body.get("seed"), "ignore_eos": ignore_eos}
        request = Request(ids, max_tokens, entries, emit, logprobs=logprobs, **sampling)
        try:
            engine.submit(request)
        except RequestError as err:
            return error(400, str(err))
        except Busy as err:
            return error(429, str(err), "rate_limit_error")
        stamp, name = int(time.time()), body.get("model") or model_name
        kind = "chat.completion" if chat else "text_completion"
        if body.get("stream"):
            usage = bool(options.get("include_usage"))
            render = functools.partial(_logprobs, tok=tok, chat=chat, as_ids=as_ids)
            stream = _stream(request, events, tok, chat, stamp, name, usage, render)
            return StreamingResponse(stream, media_type="text/event-stream")
        finish, tokens, scored = "length", [], []
        try:
            while True:
                event = await events.get()
                if "error" in event:
                    return error(500, event["error"], "server_error")
                if "finish" in event:
                    finish = event["finish"]
                    break
                tokens.append(event["token"])
                scored.append(event)
        finally:
            request.cancelled = True
        text = tok.decode(tokens, skip_special_tokens=True)
        usage = _usage(len(ids), len(tokens))
        choice = {"index": 0, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = _logprobs(scored, tok=tok, chat=chat, as_ids=as_ids)
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {"id": f"cmpl-{request.id}", "object": kind, "created": stamp, "model": name,
                "choices": [choice], "usage": usage}  # fmt: skip

    async def chat_completions(http):
        return await complete(http, chat=True)

    async def completions(http):
        return await complete(http, chat=False)

    for path, endpoint in (("/v1/chat/completions", chat_completions), ("/v1/completions", completions)):
        endpoint.__annotations__ = {"http": HTTPRequest}  # (resolved here: this module defers annotations)
        app.post(path)(endpoint)

    @app.get("/v1/steering/stats")
    async def stats():
        return {**engine.stats, "active": len(engine.active), "waiting": engine.waiting.qsize()}

    return app


def _prompt(body: dict, chat: bool, tok, chat_prompt) -> str:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError("'messages' must be a non-empty list of {role, content}")
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


def _logprobs(events: list[dict], before: Sequence[int] = (), *, tok, chat: bool, as_ids: bool) -> dict:
    """The log-probabilities of ``events`` (engine token events) in OpenAI's chat or completions shape, each token
    as its text or (``as_ids``, vLLM's ``return_tokens_as_token_ids``) as ``token_id:{id}``; a completion's
    ``text_offset`` counts from the start of its text (``before``: the tokens already sent)."""
    name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: tok.decode([t]))
    entry = lambda t, lp: {"token": name(t), "logprob": lp, "bytes": list(name(t).encode())}  # noqa: E731
    if chat:
        content = [
            {**entry(e["token"], e["logprob"]), "top_logprobs": [entry(*top) for top in e["top"]]} for e in events
        ]
        return {"content": content}
    ids = [e["token"] for e in events]
    offsets = [len(tok.decode([*before, *ids[:i]], skip_special_tokens=True)) for i in range(len(ids))]
    return {"tokens": [name(t) for t in ids], "token_logprobs": [e["logprob"] for e in events],
            "top_logprobs": [{name(t): lp for t, lp in e["top"]} for e in events], "text_offset": offsets}  # fmt: skip


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(
    request: Request,
    events: asyncio.Queue,
    tok,
    chat: bool,
    stamp: int,
    name: str,
    usage: bool,
    render: Callable[..., dict],
):
    """Server-sent events in OpenAI's chunk shape (a last chunk with the usage if asked, as OpenAI's
    ``stream_options.include_usage``); a client that goes away frees its row."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    sent, tokens, scored = "", [], []  # scored: the token events not yet sent

    def chunk(text: str | None, finish: str | None) -> str:
        if chat:
            delta = {"content": text} if text is not None else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish}
        if request.logprobs is not None and text is not None:
            choice["logprobs"] = render(scored, tokens[: len(tokens) - len(scored)])
            scored.clear()
        payload = {"id": f"cmpl-{request.id}", "object": kind, "created": stamp, "model": name, "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            first = {"id": f"cmpl-{request.id}", "object": kind, "created": stamp, "model": name,
                     "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}  # fmt: skip
            yield f"data: {json.dumps(first)}\n\n"
        while True:
            event = await events.get()
            if "error" in event:
                yield f"data: {json.dumps({'error': {'message': event['error']}})}\n\n"
                break
            if "finish" in event:
                yield chunk(None, event["finish"])
                if usage:
                    last = {"id": f"cmpl-{request.id}", "object": kind, "created": stamp, "model": name, "choices": [],
                            "usage": _usage(len(request.prompt_ids), len(tokens))}  # fmt: skip
                    yield f"data: {json.dumps(last)}\n\n"
                break
            tokens.append(event["token"])
            scored.append(event)
            text = tok.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the next token
                continue
            yield chunk(text[len(sent) :], None)
            sent = text
        yield "data: [DONE]\n\n"
    finally:
        request.cancelled = True  # finished, or the client went away: the engine drops the row


def serve(model_name: str, vectors: str | Path, host: str = "127.0.0.1", port: int = 8000, device=None, dtype=None,
          max_batch: int = 16, max_queue: int = 64) -> None:  # fmt: skip
    """Load the model and the vectors, and serve until interrupted (``steerkit serve``)."""
    import uvicorn

    from steerkit.models import load_model

    model, tok = load_model(model_name, dtype=dtype, device=device)
    library = Library(vectors, arch.hidden_size(model), arch.num_layers(model))
    engine = Engine(model, tok, library, max_batch=max_batch, max_queue=max_queue)
    log.info("serving %s with vectors %s and conditions %s on http://%s:%d", model_name, sorted(library.vectors),
             sorted(library.conditions), host, port)  # fmt: skip
    uvicorn.run(create_app(engine, str(model_name)), host=host, port=port, log_level="warning")


def launch(vectors: str | Path, *args: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start ``steerkit serve --vectors VECTORS ARGS`` in a subprocess on a free port of 127.0.0.1 and wait until
    it answers: (the process, its base URL). For notebooks, tests and benchmarks; terminate the process to stop."""
    import socket
    import sys
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "steerkit.cli", "serve", "--vectors", str(vectors), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"steerkit serve exited with code {proc.returncode}: {proc.stderr.read().strip()}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=1):
                return proc, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"steerkit serve did not answer within {timeout:g} s")
