"""The batch loop of ``steerkit serve``: continuous batching with per-row steering, in one thread that owns the
model.

Between decode steps the engine admits waiting requests (prefilled together, left-padded, their KV caches joined
to the running batch, ``kv.py``) and drops finished or abandoned ones. Each row has its own steering — a sum of
α·v over the request's entries, on its prompt, its generated tokens or both, optionally under a CAST condition
decided from its prompt — added inside one hook per block (``hooks.intervene``), so requests with different
vectors, α and layers decode together and an unsteered row stays unsteered.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from steerkit import arch
from steerkit.batching import pad_batch, pad_id
from steerkit.hooks import intervene
from steerkit.serve import kv
from steerkit.serve.sampling import sample
from steerkit.serve.schema import Busy, Entry, Library, RequestError, Unavailable
from steerkit.steer import scaled

log = logging.getLogger(__name__)


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
        self.ending: str | None = None  # set by end_all: why every request now ends
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steerkit-engine", daemon=True)
        self._thread.start()

    # -- interface for the web layer --
    def submit(self, request: Request) -> None:
        if self.ending is not None:
            raise Unavailable(self.ending)
        if len(request.prompt_ids) + request.max_tokens > self.context:
            room = self.context - len(request.prompt_ids)
            raise RequestError(
                f"prompt of {len(request.prompt_ids)} tokens + max_tokens {request.max_tokens} exceeds the "
                f"model's context of {self.context}"
                + (f": max_tokens can be at most {room}" if room > 0 else ": the prompt alone fills it")
            )
        if self.waiting.qsize() >= self.max_queue:
            raise Busy(f"{self.waiting.qsize()} requests are waiting (queue limit {self.max_queue}); retry later")
        self.waiting.put(request)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def alive(self) -> bool:
        """Whether the batch loop still runs."""
        return self._thread.is_alive()

    def end_all(self, message: str) -> None:
        """From any thread: end every running and waiting request with an error event (at the next step) and
        refuse new ones (a server shutting down)."""
        self.ending = message

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
        if self.ending is not None and (self.active or not self.waiting.empty()):
            for request in [*self.active, *self._drain()]:
                request.emit({"error": self.ending, "status": 503})
            self._drop(list(self.active))
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
        tokens = sample(out.logits[:, -1], requests)
        cache = out["cache"] if "cache" in out else out.past_key_values  # transformers renamed it in 5.x
        if self.cache is None:
            self.cache, self.mask, self.active = cache, mask, list(requests)
        else:
            self.mask = kv.join(self.cache, self.mask, cache, mask)
            self.active += requests
        self._emit(requests, tokens)

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
            **{kv.CACHE_ARGUMENT: self.cache},
        )
        self.plan = _Plan()
        self.stats["steps"] += 1
        self._emit(requests, sample(out.logits[:, -1], requests))

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
        self.mask = kv.select_rows(self.cache, self.mask, index)
