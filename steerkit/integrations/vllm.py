"""steerkit inside vLLM: per-request steering vectors in vLLM's packed batches (a ``vllm.general_plugins`` plugin).

vLLM loads ``register`` in every process (the API server or ``LLM``'s front end, the engine core, each worker).
With ``STEERKIT_VECTORS`` naming a folder of vectors (the same folder ``steerkit serve --vectors`` takes), it

- in the front end, checks a request's ``steering`` (``SamplingParams.extra_args["steering"]``; through the
  OpenAI server ``vllm_xargs: {"steering": "<JSON list>"}``) exactly as ``steerkit serve`` does, so an unknown
  vector, a layer the vector lacks or a non-finite α is a 400 naming it; and salts the request's prefix-cache key
  with its steering, so a steered and an unsteered prompt never share KV blocks while identical steered ones do;
- in each worker, hooks every decoder block of the model once at load, and before every step builds one table
  from the scheduler's batch: for each steered layer a ``[2·max_reqs + 1, d]`` tensor of summed α·v (row 1 + 2r:
  request r's prompt tokens, row 2 + 2r: its generated tokens, row 0: zero) and a per-token index into it. The
  hook adds ``rows[index]`` to the block's output, so every token of the flat batch gets its own request's
  steering and a request that asked for nothing gets zeros.

Where the vector goes: vLLM's decoder layers return ``(hidden_states, residual)`` and fuse the residual add into
the next block's input norm (and the final norm), so the residual stream after block *i* is their sum; adding
α·v to ``hidden_states`` adds it to the stream once, as ``h ← h + α·v`` at block *i*'s output in ``sk.steer``.

Tensor parallelism: after a block's row-parallel all-reduce every rank holds the full ``[tokens, d]`` output, and
every rank builds the table from the same scheduler output in the same request order, so each adds the same rows.

Compiled models and graphs: the table's tensors are allocated once at load and only ever written in place (rows
zeroed and summed, the index overwritten before each step), so a graph captured over the hook (torch.compile /
vLLM's single Dynamo trace, CUDA graphs) reads this step's values from the same addresses. Under compilation the
hook has no Python branch (a branch would be frozen at trace time): every token gathers its row, row 0 being zero
for tokens that ask for nothing and for warm-up and padding tokens. In eager mode the hook skips steps in which
nothing steers. CAST conditions are refused (400): a condition is decided from the mean over the whole prompt at
its block, which chunked prefill and prefix caching do not compute in one forward.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os

import torch

log = logging.getLogger("steerkit")
ENV = "STEERKIT_VECTORS"
# vLLM model classes whose decoder blocks return (hidden_states, residual), summed into the residual stream.
ARCHITECTURES = {
    "LlamaForCausalLM": "model.layers",
    "MistralForCausalLM": "model.layers",
    "Phi3ForCausalLM": "model.layers",
    "Qwen2ForCausalLM": "model.layers",
    "Qwen3ForCausalLM": "model.layers",
    "GemmaForCausalLM": "model.layers",
    "Gemma2ForCausalLM": "model.layers",
    "Gemma3ForCausalLM": "model.layers",
}


def register() -> None:
    """The entry point: patch vLLM's input processor and model runner when ``STEERKIT_VECTORS`` is set."""
    if not os.environ.get(ENV):
        return
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(InputProcessor.process_inputs, "_steerkit", False):
        return  # vLLM may call plugins more than once in a process
    InputProcessor.process_inputs = _wrap(InputProcessor.process_inputs, _process_inputs)
    GPUModelRunner._prepare_inputs = _wrap(GPUModelRunner._prepare_inputs, _prepare_inputs)
    GPUModelRunner._dummy_run = _wrap(GPUModelRunner._dummy_run, _dummy_run)
    GPUModelRunner.load_model = _wrap(GPUModelRunner.load_model, _load_model)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:
        return
    if "load_model" in CPUModelRunner.__dict__:
        CPUModelRunner.load_model = _wrap(CPUModelRunner.load_model, _load_model)


def _wrap(original, replacement):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return replacement(original, self, *args, **kwargs)

    method._steerkit = True
    return method


@functools.cache
def _library(hidden_size: int, num_layers: int):
    from steerkit.serve.schema import Library

    return Library(os.environ[ENV], hidden_size, num_layers)


def _model_library(vllm_config):
    hf = vllm_config.model_config.hf_text_config
    return _library(hf.hidden_size, hf.num_hidden_layers)


# --- the front end: checking requests and salting the prefix cache --------------------------------------------


def steering_entries(params, vllm_config) -> list | None:
    """A request's steering as checked entries (None if it asks for none); ``VLLMValidationError`` (a 400) if bad."""
    from vllm.exceptions import VLLMValidationError

    from steerkit.serve.schema import RequestError, parse_steering

    spec = (getattr(params, "extra_args", None) or {}).get("steering")
    if spec is None:
        return None
    try:
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as err:
                raise RequestError(f"'steering' is not valid JSON: {err}") from None
        dtype = vllm_config.model_config.dtype
        entries = parse_steering(spec, _model_library(vllm_config), lambda _layer: dtype)
        for i, entry in enumerate(entries):
            if entry.condition is not None:
                raise RequestError(
                    f"steering[{i}]: conditions (CAST) are not supported by the vLLM plugin yet: a condition is "
                    "decided from the mean of the whole prompt at its block, which chunked prefill and prefix "
                    "caching do not compute in one forward; use steerkit serve for conditional steering"
                )
    except RequestError as err:
        raise VLLMValidationError(str(err), parameter="steering") from None
    return entries


def cache_salt(entries: list, salt: str | None = None) -> str:
    """The prefix-cache salt of a steered request: a hash of its entries (and any salt it already had)."""
    rows = [[e.vector, e.alpha, e.layers, e.positions] for e in entries]
    digest = hashlib.sha256(json.dumps([salt, rows]).encode()).hexdigest()[:32]
    return f"steerkit-{digest}"


def _process_inputs(original, self, request_id, prompt, params, *args, **kwargs):
    entries = steering_entries(params, self.vllm_config)
    request = original(self, request_id, prompt, params, *args, **kwargs)
    if entries:
        request.cache_salt = cache_salt(entries, request.cache_salt)
        rows = [{"vector": e.vector, "alpha": e.alpha, "layers": e.layers, "positions": e.positions} for e in entries]
        request.sampling_params.extra_args["steering"] = rows  # checked and resolved: the workers trust it
    elif entries is not None:  # an empty list asks for nothing
        request.sampling_params.extra_args.pop("steering")
    return request


# --- the workers: one table per step, one hook per block ------------------------------------------------------


class Table:
    """What the hooks add in the current step: per steered layer ``rows`` (see the module docstring), a per-token
    ``index`` into them, and the request order they were built for."""

    def __init__(self, library, max_reqs: int, max_tokens: int, dtype: torch.dtype, device, compiled: bool):
        layers = sorted({layer for vec in library.vectors.values() for layer in vec.layers})
        d = next(iter(library.vectors.values())).d_model
        self.library = library
        self.rows = {layer: torch.zeros(2 * max_reqs + 1, d, dtype=dtype, device=device) for layer in layers}
        self.index = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.compiled = compiled  # the hooks run inside a traced graph: no Python branch on the step's state
        self.active = False  # any request of this step steers
        self.order: tuple | None = None
        self.entries: dict[str, list[dict]] = {}  # request id -> its steering

    def fill(self, requests: list[tuple[str, list[dict]]]) -> None:
        """Rebuild ``rows`` for these (request id, entries) in batch order."""
        from steerkit.steer import scaled

        for rows in self.rows.values():
            rows.zero_()
        for r, (_id, entries) in enumerate(requests):
            for e in entries:
                vec = self.library.vectors[e["vector"]]
                for layer in e["layers"]:
                    v = scaled(vec, layer, e["alpha"], "add", torch.float32).to(self.rows[layer])
                    if e["positions"] in ("all", "prompt"):
                        self.rows[layer][1 + 2 * r] += v
                    if e["positions"] in ("all", "generated"):
                        self.rows[layer][2 + 2 * r] += v


def _load_model(original, self, *args, **kwargs):
    from vllm.config import CompilationMode

    out = original(self, *args, **kwargs)
    config = self.vllm_config
    compiled = config.compilation_config.mode != CompilationMode.NONE
    name = type(self.model).__name__
    if name not in ARCHITECTURES:
        raise RuntimeError(f"steerkit's vLLM plugin does not know where {name}'s blocks are; it knows "
                           f"{sorted(ARCHITECTURES)}")  # fmt: skip
    library = _model_library(config)
    table = Table(library, self.max_num_reqs, self.max_num_tokens, config.model_config.dtype, self.device, compiled)
    blocks = self.model.get_submodule(ARCHITECTURES[name])
    for i, block in enumerate(blocks):
        if i in table.rows and type(block).__name__ != "PPMissingLayer":  # (blocks of other pipeline ranks)
            block.register_forward_hook(_hook(table, i))
    self._steerkit = table
    log.info("steerkit: vectors %s on %d blocks of %s (%s)", sorted(library.vectors), len(table.rows), name,
             "compiled" if compiled else "eager")  # fmt: skip
    return out


def _hook(table: Table, layer: int):
    def hook(_module, _args, output):
        if not table.compiled and not table.active:  # (never evaluated under compilation: see the docstring)
            return None
        hidden, residual = output  # the stream after this block is hidden + residual: add α·v once, to hidden
        return hidden + table.rows[layer][table.index[: hidden.shape[0]]], residual

    return hook


def _prepare_inputs(original, self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
    out = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
    table: Table | None = getattr(self, "_steerkit", None)
    if table is None:
        return out
    batch = self.input_batch
    ids = list(batch.req_ids[: batch.num_reqs])
    for rid in ids:
        if rid not in table.entries:
            extra = self.requests[rid].sampling_params.extra_args or {}
            table.entries[rid] = extra.get("steering") or []
    table.entries = {rid: table.entries[rid] for rid in ids}  # forget finished requests
    table.active = any(table.entries.values())
    if not table.active:
        table.index.zero_()  # (read by compiled hooks, which add rows[index] on every step)
        return out
    if tuple(ids) != table.order:
        table.fill([(rid, table.entries[rid]) for rid in ids])
        table.order = tuple(ids)
    n = scheduler_output.total_num_scheduled_tokens
    rows = self.req_indices.gpu[:n]
    prompt = torch.from_numpy(batch.num_prompt_tokens[: batch.num_reqs]).to(rows.device)[rows]
    table.index[:n] = 1 + 2 * rows + (self.positions[:n] >= prompt)
    table.index[n:] = 0  # padding tokens get nothing
    return out


def _dummy_run(original, self, *args, **kwargs):
    """Warm-up and profiling forwards carry no request: no steering (the next step rewrites the index)."""
    table: Table | None = getattr(self, "_steerkit", None)
    if table is None:
        return original(self, *args, **kwargs)
    table.index.zero_()
    active, table.active = table.active, False
    try:
        return original(self, *args, **kwargs)
    finally:
        table.active = active
