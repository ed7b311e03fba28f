"""The one place that reads and replaces decoder-block outputs: positions, padding, context-local activation.

``intervene(model, {layer: fn})`` runs ``fn(h, tracker)`` on block *layer*'s output ``h`` during every
forward pass made from the thread or asyncio task that entered it, and nowhere else: the functions live in
a ``ContextVar``, and one shared hook per module (installed while any context uses it, removed with the
last) dispatches to the functions active in the calling context. So one model can serve several callers
with different vectors at once. A pre-hook on the model's top module feeds each context's
``PositionTracker`` the attention mask and KV-cache length, so padding is never touched and generated
positions are known under KV-cache generation. ``steer``, ``splice`` and ``Recorder`` are built on it.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from steerkit import arch
from steerkit.backends import hf_model


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; a ``Recorder(stop=True)`` swallows it."""


def block_hidden(output) -> torch.Tensor:
    """The hidden-state tensor in a block's output (blocks return a tensor or a tuple starting with one)."""
    return output[0] if isinstance(output, tuple | list) else output


def hook_targets(model: nn.Module, blocks: str | None = None) -> tuple[nn.Module, list[nn.Module]]:
    """(top module for the tracker, one module per block whose output is block *i*'s residual stream)."""
    inner = hf_model(model)
    if inner is not None:
        return inner, list(arch.get_blocks(inner, blocks))
    return model, [block.hook_resid_post for block in model.blocks]  # HookedTransformer


def block_dtype(model: nn.Module, layer: int) -> torch.dtype:
    """The dtype block ``layer``'s output has (its parameters' dtype, else the model's)."""
    inner = hf_model(model)
    blocks = arch.get_blocks(inner) if inner is not None else model.blocks
    params = itertools.chain(blocks[layer].parameters(), (inner or model).parameters())
    return next(params, torch.empty(0)).dtype


def block_device(model: nn.Module, layer: int) -> torch.device:
    """Where block ``layer`` computes: its parameters' device, or the model's input device when accelerate has
    offloaded the block (its parameters then sit on the meta device until the forward)."""
    inner = hf_model(model)
    blocks = arch.get_blocks(inner) if inner is not None else model.blocks
    for param in blocks[layer].parameters():
        if param.device.type != "meta":
            return param.device
    return arch.input_device(inner if inner is not None else model)


# --- positions -------------------------------------------------------------------------------------------


@dataclass
class Step:
    """What one forward call looks like: which current tokens are real, their columns and token indices."""

    valid: torch.Tensor  # [b, s] bool, False on padding
    columns: torch.Tensor  # [s] absolute column of each current token in the full sequence
    real_index: torch.Tensor  # [b, s] index among the row's real tokens
    prompt_len: int  # columns below this are the prompt


class PositionTracker:
    """Fed by a forward pre-hook on the model's top module; records the shape of the current step."""

    def __init__(self):
        self.step: Step | None = None
        self._selection: tuple | None = None  # (key, selection) for the current step
        self._prompt_len = 0
        self._last_ids: torch.Tensor | None = None

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if torch.is_tensor(ids) and ids.dim() == 2 else embeds
        if ref is None:  # strings (TransformerLens) or an unknown call: every position
            self.step = self._selection = None
            return
        b, s = ref.shape[:2]
        device = ref.device
        mask = kwargs.get("attention_mask")
        has_mask = torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[1] >= s
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        if has_mask:  # generate passes the mask over prompt + everything so far
            past_len = mask.shape[1] - s
        elif past is not None and hasattr(past, "get_seq_length"):
            past_len = int(past.get_seq_length())
        else:
            past_len = 0
        if past_len == 0 and not self._extends_last(ids):
            self._prompt_len = s  # a new prompt (a generation without cache re-sends prompt + generated)
        self._last_ids = ids if torch.is_tensor(ids) and past_len == 0 else self._last_ids
        columns = past_len + torch.arange(s, device=device)
        if has_mask:
            full = mask.to(device).bool()
            valid = full[:, -s:]
            real_index = (full.long().cumsum(-1) - 1)[:, -s:]
        else:
            valid = torch.ones(b, s, dtype=torch.bool, device=device)
            real_index = columns.expand(b, s)
        self.step = Step(valid, columns, real_index, self._prompt_len)
        self._selection = None

    def _extends_last(self, ids) -> bool:
        last = self._last_ids
        return (
            torch.is_tensor(ids)
            and last is not None
            and ids.shape[0] == last.shape[0]
            and ids.shape[1] > last.shape[1]
            and torch.equal(ids[:, : last.shape[1]], last.to(ids.device))
        )

    def selection(self, hidden: torch.Tensor, positions: str | int) -> torch.Tensor | None:
        """Bool ``[b, s]`` of the positions of ``hidden`` to act on, or None for all (computed once a step).

        ``positions``: ``"all"`` real tokens, ``"prompt"``, ``"generated"``, or an int: real tokens from there on.
        """
        key = (hidden.shape[:2], hidden.device, positions)
        if self._selection is not None and self._selection[0] == key:
            return self._selection[1]
        b, s = hidden.shape[:2]
        step = self.step
        if step is None or step.valid.shape != (b, s):
            arange = torch.arange(s, device=hidden.device)
            step = Step(torch.ones(b, s, dtype=torch.bool, device=hidden.device), arange, arange.expand(b, s), s)
        valid = step.valid.to(hidden.device)
        columns = step.columns.to(hidden.device).expand(b, s)
        if positions == "all":
            selected = valid
        elif positions == "prompt":
            selected = valid & (columns < step.prompt_len)
        elif positions == "generated":
            selected = valid & (columns >= step.prompt_len)
        else:
            selected = valid & (step.real_index.to(hidden.device) >= positions)
        result = None if bool(selected.all()) else selected
        self._selection = (key, result)
        return result


# --- context-local dispatch ------------------------------------------------------------------------------

BlockFn = Callable[[torch.Tensor, PositionTracker], "torch.Tensor | None"]


@dataclass(eq=False)
class _Entry:
    """What one ``intervene`` context adds: its tracker and a function per block module."""

    top: nn.Module
    tracker: PositionTracker
    fns: dict[nn.Module, BlockFn]


_ACTIVE: ContextVar[tuple[_Entry, ...]] = ContextVar("steerkit_interventions", default=())
_lock = threading.Lock()
_installed: dict[nn.Module, list] = {}  # module -> [hook handle, number of contexts using it]


def _track(module, args, kwargs):
    for entry in _ACTIVE.get():
        if entry.top is module:
            entry.tracker(module, args, kwargs)


def _dispatch(module, _inputs, output):
    h, replaced = None, False
    for entry in _ACTIVE.get():
        fn = entry.fns.get(module)
        if fn is None:
            continue
        h = block_hidden(output) if h is None else h
        new = fn(h, entry.tracker)
        if new is not None:
            h, replaced = new, True
    if not replaced:
        return None
    return (h, *output[1:]) if isinstance(output, tuple) else h


def _acquire(module: nn.Module, register: Callable[[], object]) -> None:
    with _lock:
        slot = _installed.get(module)
        if slot is None:
            slot = _installed[module] = [register(), 0]
        slot[1] += 1


def _release(module: nn.Module) -> None:
    with _lock:
        slot = _installed[module]
        slot[1] -= 1
        if slot[1] == 0:
            slot[0].remove()
            del _installed[module]


@contextlib.contextmanager
def intervene(model: nn.Module, fns: Mapping[int, BlockFn], blocks: str | None = None) -> Iterator[PositionTracker]:
    """Apply ``fns[layer](h, tracker)`` to block outputs on forwards run from this thread or task, until exit.

    A function returns the new hidden state, or None to leave it. Contexts nest and add up in the order they
    were entered; hooks are removed when the last context on a module exits, also on exceptions.
    """
    top, targets = hook_targets(model, blocks)
    entry = _Entry(top, PositionTracker(), {targets[layer]: fn for layer, fn in fns.items()})
    acquired: list[nn.Module] = []
    _ACTIVE.set((*_ACTIVE.get(), entry))
    try:
        _acquire(top, lambda: top.register_forward_pre_hook(_track, with_kwargs=True))
        acquired.append(top)
        for module in entry.fns:
            _acquire(module, lambda module=module: module.register_forward_hook(_dispatch))
            acquired.append(module)
        yield entry.tracker
    finally:
        for module in acquired:
            _release(module)
        _ACTIVE.set(tuple(e for e in _ACTIVE.get() if e is not entry))


@contextlib.contextmanager
def on_output(module: nn.Module, fn: Callable[[nn.Module, tuple, object], object]) -> Iterator[nn.Module]:
    """A plain forward hook ``fn(module, args, output)`` on one sub-module (an MLP) while entered, on every
    forward from any context; it returns a replacement output or None. For what reads or replaces a part of a
    block (transcoders) rather than the block's output, which ``intervene`` owns."""
    handle = module.register_forward_hook(fn)
    try:
        yield module
    finally:
        handle.remove()


def active_count() -> int:
    """How many modules carry steerkit hooks right now (0 once every context has exited)."""
    with _lock:
        return len(_installed)
