"""Train sparse autoencoders on block outputs of any transformers model, with sae-lens' SAE classes.

The loop, in one screen: read packed sequences from a corpus, run the model up to the deepest requested
block (``Recorder(stop=True)``), drop each sequence's first position and any token above 5× the median norm
(attention sinks: on SmolLM2 the first token has ~170× the median norm, and now and then the second or
third; 4 tokens in 10,000 held 92% of the variance), push the activations through a shuffling buffer, and
take Adam steps on ``TrainingSAE.training_forward_pass``. Activations are scaled to mean norm √d_in while
training; the scale is folded into the weights on save, so the saved SAE takes raw activations. TopK and
BatchTopK get AuxK on latents dead for ``dead_window`` tokens; JumpReLU its pre-activation loss; ReLU+L1 its
L1 warm-up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from steerkit._config import option
from steerkit._io import atomic_path, check_output, remove_created
from steerkit.arch import hidden_size, input_device, layer_list, mlp_module, num_layers
from steerkit.backends import fingerprint
from steerkit.backends.tlens import hook_name
from steerkit.capture import Recorder
from steerkit.data.corpus import Corpus
from steerkit.distributed import all_gather, all_reduce, barrier, broadcast, world
from steerkit.hooks import block_device, on_output
from steerkit.sae.io import load_sae

logger = logging.getLogger(__name__)
OUTLIER_FACTOR = 5.0  # a token whose norm exceeds 5× the median is an outlier (attention sink)


def _classes(name: str):
    """sae-lens' (TrainingSAE, TrainingSAEConfig) for an architecture name, from its own training registry."""
    import sae_lens  # noqa: F401  (importing it registers the built-in architectures)
    from sae_lens.registry import get_sae_training_class

    return get_sae_training_class(name)


def _sparse(k: float, steps: int) -> dict:
    return {"k": k}  # TopK / BatchTopK; AuxK at sae-lens' coefficient 1 (its aux loss is not variance-normalised)


def _jumprelu(k: float, steps: int) -> dict:
    return {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": float(k), "l0_coefficient": 1.0,
            "l0_warm_up_steps": max(1, steps // 20), "pre_act_loss_coefficient": 3e-6}  # fmt: skip


def _standard(k: float, steps: int) -> dict:
    return {"l1_coefficient": 5.0, "l1_warm_up_steps": max(1, steps // 20)}  # ReLU + L1 (k unused)


KINDS = ("sae", "transcoder")
# sae-lens architecture name -> steerkit's defaults for it, from k (the target L0) and the number of steps
ARCHS: dict[str, Callable[[float, int], dict]] = {
    "topk": _sparse,
    "batchtopk": _sparse,
    "jumprelu": _jumprelu,
    "standard": _standard,
}


# --- activations -------------------------------------------------------------------------------------------


class ShuffleBuffer:
    """Mixes activations from many sequences: each batch handed out is drawn at random from everything the buffer
    holds, and a chunk of new rows goes in once there is room for it. Between batches its whole state is the rows
    it holds and its generator, so a checkpoint that saves both resumes it exactly."""

    def __init__(self, capacity: int, batch_size: int, generator: torch.Generator):
        self.capacity, self.batch_size, self.generator = capacity, batch_size, generator
        self.store: dict[int, torch.Tensor] | None = None
        self.size = 0

    def make_room(self, n: int) -> Iterator[dict[int, torch.Tensor]]:
        """Hand out batches until ``n`` more rows fit."""
        while self.size + n > self.capacity and self.size >= self.batch_size:
            yield self.pop()

    def insert(self, acts: dict[int, torch.Tensor]) -> None:
        """Add ``{layer: [n, d]}`` rows (the store grows if a chunk is larger than the capacity)."""
        n = next(iter(acts.values())).shape[0]
        if self.store is None or self.size + n > next(iter(self.store.values())).shape[0]:
            room = max(self.capacity, self.size + n)
            self.store = {layer: torch.cat([self.rows()[layer] if self.store else x[:0], x.new_empty(room - self.size,
                          x.shape[1])]) for layer, x in acts.items()}  # fmt: skip
        for layer, x in acts.items():
            self.store[layer][self.size : self.size + n] = x
        self.size += n

    def pop(self) -> dict[int, torch.Tensor]:
        """One batch drawn at random; the buffer's last rows fill the places it leaves."""
        b, end = self.batch_size, self.size - self.batch_size
        chosen = torch.randperm(self.size, generator=self.generator)[:b].to(next(iter(self.store.values())).device)
        holes = chosen[chosen < end]
        tail = torch.ones(b, dtype=torch.bool, device=chosen.device)
        tail[chosen[chosen >= end] - end] = False
        movers = torch.arange(end, self.size, device=chosen.device)[tail]
        batch = {}
        for layer, x in self.store.items():
            batch[layer] = x[chosen].clone()
            x[holes] = x[movers]
        self.size = end
        return batch

    def rows(self) -> dict[int, torch.Tensor]:
        """What the buffer holds: ``{layer: [size, d]}`` (for a checkpoint)."""
        return {layer: x[: self.size] for layer, x in (self.store or {}).items()}

    def drain(self) -> Iterator[dict[int, torch.Tensor]]:
        """Hand out what is left in full batches (a last partial batch is dropped)."""
        while self.size >= self.batch_size:
            yield self.pop()


def mlp_activations(model: nn.Module, batch: torch.Tensor, layers: Sequence[int], first: int = 1
                    ) -> dict[int, torch.Tensor]:  # fmt: skip
    """``{layer: [b * (s - first), 2 d]}`` float32: at each position from ``first`` on, block ``layer``'s MLP
    input and then its output (what a transcoder reads and predicts)."""
    seen: dict[int, tuple] = {}
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(on_output(mlp_module(model, layer), lambda _m, args, out, layer=layer: seen.__setitem__(
                layer, (args[0], out))))  # fmt: skip
        block_activations(model, batch, layers)
    out = {}
    for layer in layers:
        x, y = (t[:, first:].reshape(-1, t.shape[-1]).float() for t in seen[layer])
        out[layer] = torch.cat([x, y], dim=-1)
    return out


def block_activations(model: nn.Module, batch: torch.Tensor, layers: Sequence[int], first: int = 1
                      ) -> dict[int, torch.Tensor]:  # fmt: skip
    """``{layer: [b * (s - first), d]}`` float32 outputs of ``layers`` on packed ``batch`` from position ``first``
    (by default the first position, an attention sink, is dropped)."""
    device = input_device(model)
    with torch.inference_mode(), Recorder(model, layers, stop=True) as rec:
        model(input_ids=batch.to(device), use_cache=False)
    out = {}
    for layer in layers:
        h = rec[layer][:, first:].reshape(-1, rec[layer].shape[-1]).float()
        if not torch.isfinite(h).all():
            raise ValueError(f"non-finite activations at layer {layer}: the model produced NaN or inf")
        out[layer] = h
    return out


# --- one SAE being trained ---------------------------------------------------------------------------------


@dataclass
class _Run:
    """One layer's SAE, optimiser and running statistics."""

    layer: int
    sae: nn.Module
    optimizer: torch.optim.Optimizer
    scale: float | None = None
    scale_out: float | None = None  # a transcoder's: its target (the MLP output) is scaled on its own
    transcode: bool = False  # rows are [MLP input, MLP output]: encode the first half, predict the second
    max_norm: float | None = None  # activations above this norm are outliers (attention sinks), not trained on
    since_fired: torch.Tensor | None = None  # tokens since each latent last fired
    history: list[dict] = field(default_factory=list)
    last_in: torch.Tensor | None = None  # BatchTopK's: the last batch it encoded (scaled), to set its threshold

    def step(self, x: torch.Tensor, step: int, total_steps: int, lr: float, dead_window: int) -> dict:
        from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput

        if self.since_fired is None:
            self.since_fired = torch.zeros(self.sae.cfg.d_sae, device=x.device)
        for group in self.optimizer.param_groups:  # constant, then linear decay over the last 20%
            group["lr"] = lr * min(1.0, (total_steps - step) / max(1, total_steps // 5))
        coefficients = {}
        for name, c in self.sae.get_coefficients().items():
            if isinstance(c, TrainCoefficientConfig):
                coefficients[name] = c.value * min(1.0, (step + 1) / max(1, c.warm_up_steps))
            else:
                coefficients[name] = c
        self.sae.train()
        if self.transcode:  # rows are [MLP input, MLP output]
            d = x.shape[1] // 2
            x_in, x = x[:, :d] * self.scale, x[:, d:] * self.scale_out  # x: the target, from here on
        else:
            x_in = x = x * self.scale
        if hasattr(self.sae, "topk_threshold"):
            self.last_in = x_in
        if self.transcode:
            out = _transcode(self.sae, x_in, x, self.since_fired > dead_window)
        else:
            out = self.sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x_in,
                    coefficients=coefficients,
                    dead_neuron_mask=self.since_fired > dead_window,
                    n_training_steps=step,
                    is_logging_step=False,
                )  # fmt: skip
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        loss = _average_gradients(list(self.sae.parameters()), out.loss.detach())
        if not torch.isfinite(loss):  # every rank sees the same averaged loss, so all stop together
            raise ValueError(
                f"the layer-{self.layer} SAE's loss is {float(loss)} at step {step + 1}: training diverged "
                f"(lr={self.optimizer.param_groups[0]['lr']:g}); nothing was written"
            )
        nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.optimizer.step()
        with torch.no_grad():
            active = out.feature_acts.detach() > 0
            fired = all_reduce(active.any(0).to(torch.uint8), "max", "counting live latents").bool()
            self.since_fired += x.shape[0] * world()[1]
            self.since_fired[fired] = 0
            residual = (out.sae_out - x).pow(2).sum()
            total = (x - x.mean(0)).pow(2).sum()
            return {
                "step": step + 1,
                "loss": float(out.loss),
                "mse": float(out.losses["mse_loss"]) / x.shape[1],
                "explained_variance": float(1 - residual / total),
                "l0": float(active.sum(-1).float().mean()),
                "dead_fraction": float((self.since_fired > dead_window).float().mean()),
            }


def _transcode(sae, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor):
    """A transcoder's training pass: encode the MLP input ``x``, predict the MLP output ``y``; the loss is the
    squared error plus AuxK (dead latents predicting the error that remains), as sparsify's ``transcode=True``.
    Its global threshold is set once, at the end (``_set_threshold``)."""
    from types import SimpleNamespace

    feature_acts, hidden_pre = sae.encode_with_hidden_pre(x)
    recon = sae.decode(feature_acts)
    mse = (recon - y).pow(2).sum(-1).mean()
    aux = sae.calculate_topk_aux_loss(sae_in=y, sae_out=recon, hidden_pre=hidden_pre, dead_neuron_mask=dead)
    return SimpleNamespace(loss=mse + aux, feature_acts=feature_acts, sae_out=recon, losses={"mse_loss": mse})


@torch.no_grad()
def _set_threshold(run: _Run) -> None:
    """BatchTopK's global threshold from the final weights: the smallest activation BatchTopK keeps on the last
    training batch (k per token on average). sae-lens keeps a running average (rate 0.01) of that value over
    training, which lags a threshold still rising when a short run ends: on a 500k-token transcoder it saved 1.34
    against 2.76, and the saved model fired 132 latents per token for k = 32."""
    if run.last_in is None:
        return
    acts, _ = run.sae.encode_with_hidden_pre(run.last_in.to(run.sae.W_enc.dtype))
    run.sae.topk_threshold = acts[acts > 0].min().to(run.sae.topk_threshold)


def _average_gradients(params: list[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Average the SAE's gradients and its loss over data-parallel ranks in one all-reduce (alone: the loss)."""
    size = world()[1]
    if size == 1:
        return loss
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.reshape(1).float()])
    all_reduce(flat, "sum", "averaging SAE gradients").div_(size)
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        param.grad = flat[offset : offset + grad.numel()].view_as(grad).to(grad.dtype)
        offset += grad.numel()
    return flat[-1]


def _mean_over_ranks(log: dict) -> dict:
    """A step's logged metrics averaged over ranks (the same dict alone)."""
    if world()[1] == 1:
        return log
    keys = [k for k in log if k != "step"]
    values = all_reduce(torch.tensor([float(log[k]) for k in keys], dtype=torch.float64), "sum", "logging")
    return {**log, **{k: float(v) / world()[1] for k, v in zip(keys, values, strict=True)}}


def _all_have(flag: bool) -> bool:
    """True only when every rank has ``flag`` (so all ranks stop at the same step)."""
    return bool(all_reduce(torch.tensor([int(flag)]), "min", "checking every rank has data"))


def _new_run(
    arch_name: str, layer: int, d_in: int, d_sae: int, options: dict, lr: float, meta: dict, device="cpu"
) -> _Run:
    from sae_lens.saes.sae import SAEMetadata

    sae_cls, cfg_cls = _classes(arch_name)
    metadata = SAEMetadata(**meta, hook_name=hook_name(layer))
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, metadata=metadata, device=str(device), **options)
    sae = sae_cls(cfg)
    return _Run(layer, sae, torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999)))


# --- checkpoints ---------------------------------------------------------------------------------------------


def _save_checkpoint(path: Path, runs: dict[int, _Run], state: dict, rng_states: list[torch.Tensor],
                     buffers: list[dict[int, torch.Tensor]] = ()) -> None:  # fmt: skip
    """Weights, Adam moments, firing counters, each rank's shuffle RNG and buffered rows in safetensors; the rest
    in JSON (no pickle)."""
    from safetensors.torch import save_file

    with atomic_path(path, force=True, directory=True) as tmp:  # replaces this run's previous checkpoint
        tmp.mkdir()
        trainers = {}
        for layer, run in runs.items():
            weights = {k: v.contiguous().cpu() for k, v in run.sae.state_dict().items()}
            save_file(weights, str(tmp / f"sae_{layer}.safetensors"))
            optim = run.optimizer.state_dict()
            tensors = {f"adam.{i}.{key}": value for i, slot in optim["state"].items() for key, value in slot.items()}
            tensors["since_fired"] = run.since_fired
            if run.last_in is not None:
                tensors["last_in"] = run.last_in
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / f"trainer_{layer}.safetensors"))
            trainers[layer] = {
                "param_groups": optim["param_groups"],
                "scale": run.scale,
                "scale_out": run.scale_out,
                "max_norm": run.max_norm,
                "history": run.history,
            }
        save_file({f"shuffle.{rank}": rng for rank, rng in enumerate(rng_states)}, str(tmp / "rng.safetensors"))
        held = {
            f"{rank}.{layer}": x.contiguous().cpu() for rank, rows in enumerate(buffers) for layer, x in rows.items()
        }
        save_file(held, str(tmp / "buffer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "trainers": trainers}, indent=1))


def _load_checkpoint(path: Path, runs: dict[int, _Run], expect: dict, generator: torch.Generator,
                     buffer: ShuffleBuffer | None = None) -> dict:  # fmt: skip
    """Restore what ``_save_checkpoint`` wrote into ``runs``, this rank's ``generator`` and ``buffer``; returns the
    state."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        differs = {k: (state["config"].get(k), v) for k, v in expect.items() if state["config"].get(k) != v}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / 'state.json'} is not a steerkit SAE checkpoint ({err})") from None
    if differs:
        raise ValueError(f"checkpoint {path} was made with other settings (saved, now): {differs}")
    rank, size = world()
    if state.get("world_size", 1) != size:
        raise ValueError(
            f"checkpoint {path} was made by {state.get('world_size', 1)} rank(s); resume it with the same number "
            f"(torchrun --nproc_per_node {state.get('world_size', 1)}), not {size}"
        )
    for layer, run in runs.items():
        run.sae.load_state_dict(load_file(str(path / f"sae_{layer}.safetensors")))
        tensors = load_file(str(path / f"trainer_{layer}.safetensors"))
        saved = state["trainers"][str(layer)]
        slots: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                index, name = key.removeprefix("adam.").split(".", 1)
                slots.setdefault(int(index), {})[name] = value
        run.optimizer.load_state_dict({"state": slots, "param_groups": saved["param_groups"]})
        run.since_fired = tensors["since_fired"].to(run.sae.device)
        run.last_in = tensors["last_in"].to(run.sae.device) if "last_in" in tensors else None
        run.scale, run.history, run.scale_out = saved["scale"], saved["history"], saved.get("scale_out")
        run.max_norm = saved["max_norm"]
    generator.set_state(load_file(str(path / "rng.safetensors"))[f"shuffle.{rank}"])
    held = path / "buffer.safetensors"
    if buffer is not None and held.is_file():
        rows = {
            int(key.partition(".")[2]): x
            for key, x in load_file(str(held)).items()
            if key.partition(".")[0] == str(rank)
        }
        if rows and next(iter(rows.values())).shape[0]:
            buffer.insert({layer: x.to(runs[layer].sae.device) for layer, x in rows.items()})
    return state


# --- the configuration ------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How SAEs are trained: the options of ``train_sae``, and of ``steerkit train-sae`` (which takes its options
    and their help from these fields)."""

    arch: str = option("topk", f"sae-lens architecture: {', '.join(ARCHS)} (standard: ReLU + L1).")
    kind: str = option(
        "sae",
        "sae (reads and reconstructs a block's output) or transcoder (reads the block's MLP "
        "input and predicts its output; batchtopk only, saved as sae-lens' jumprelu_transcoder)",
    )
    d_sae: int | None = option(None, "Latents (default 8 x the model's width).")
    k: float = option(32, "Active latents per token: TopK's k (whole), BatchTopK's mean k, JumpReLU's target L0.")
    tokens: int = option(2_000_000, "Training tokens.")
    ctx_len: int = option(128, "Tokens per packed sequence.")
    batch_size: int = option(1024, "Activations per SAE step, over all ranks together.")
    model_batch: int = option(32, "Sequences per forward pass of the model.")
    lr: float | None = option(None, "Adam learning rate (default 2e-4 * sqrt(16384 / d_sae)).")
    dead_window: int = option(500_000, "Tokens without firing after which a latent counts as dead (AuxK's window).")
    buffer_tokens: int = option(131_072, "Activations the shuffle buffer mixes.")
    checkpoint_every: int | None = option(None, "Save a checkpoint to OUTPUT.ckpt every N tokens.")
    resume: bool = option(False, "Continue from OUTPUT.ckpt (same settings and number of ranks).")
    seed: int = option(0, "Seed of the SAE's initialisation and of the shuffling.")
    autocast: bool = option(False, "Run the SAE's matmuls in bf16 (parameters and Adam stay float32).")
    every_token: bool = option(
        False,
        "Train on every position, the first and attention sinks included (by default both are left out, and "
        "splicing leaves them alone); an SAE spliced at every token, as Resa's recipe does, needs them.",
    )

    def checked(self, d_in: int, ranks: int) -> TrainConfig:
        """This config with its defaults filled in for a model of width ``d_in`` trained on ``ranks`` ranks;
        ValueError naming the first option out of range."""
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}: expected one of {tuple(ARCHS)}")
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: expected one of {KINDS}")
        if self.kind == "transcoder" and self.arch != "batchtopk":
            raise ValueError(
                f"a transcoder trains as batchtopk (arch={self.arch!r} given): sae-lens loads its inference form, a "
                "jumprelu_transcoder with BatchTopK's global threshold, and has no TopK transcoder to load"
            )
        d_sae = 8 * d_in if self.d_sae is None else self.d_sae
        for name, value in {"d_sae": d_sae, "tokens": self.tokens, "batch_size": self.batch_size,
                            "model_batch": self.model_batch}.items():  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        k = self.k
        if not (isinstance(k, int | float) and 0 < k <= d_sae):
            raise ValueError(f"k={k!r}: expected a number in (0, d_sae={d_sae}]")
        if self.arch == "topk":
            if float(k) != int(k):
                raise ValueError(f"k={k!r}: TopK needs a whole number of latents (batchtopk takes a mean k)")
            k = int(k)
        if self.batch_size % ranks:
            raise ValueError(
                f"batch_size={self.batch_size} does not split evenly over {ranks} ranks: use a multiple of {ranks} "
                "(each rank takes batch_size / world size activations a step)"
            )
        if self.tokens // self.batch_size < 1:
            raise ValueError(f"tokens={self.tokens} is less than one batch of {self.batch_size}")
        lr = 2e-4 * math.sqrt(16384 / d_sae) if self.lr is None else self.lr
        return replace(self, d_sae=d_sae, k=k, lr=lr)

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


@dataclass
class _Position:
    """Where a run stands: SAE steps taken, this rank's sequences read (every W-th of the corpus, from the
    rank-th), its outlier counts and its shuffle buffer (with the buffer's generator)."""

    step: int
    consumed: int
    counts: dict
    buffer: ShuffleBuffer


# --- the public entry point -------------------------------------------------------------------------------------


def train_sae(
    model: nn.Module,
    tok,
    corpus: Corpus,
    layer: int | Sequence[int],
    out: str | Path | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
    force: bool = False,
    **options,
):
    """Train an SAE on block ``layer``'s output (a list of layers: one SAE each, from one pass of the model).

    Returns a ``sae_lens.SAE`` (a dict ``{layer: SAE}`` for a list), reloaded from the sae-lens directory it
    wrote to ``out`` (with a list: ``out/layer_{i}``); its ``training_log`` lists the logged metrics. The
    options are ``config``'s (a ``TrainConfig``) with any of its fields given as keywords on top; other keywords
    go to sae-lens' training config. ``checkpoint_every`` (tokens) saves to ``{out}.ckpt`` so ``resume=True``
    continues an interrupted run (from the next unread sequence, with the same Adam moments and shuffling). An
    existing ``out`` (or an old checkpoint, unless resuming) is an error before training starts, unless
    ``force=True``.
    """
    names = {f.name for f in fields(TrainConfig)}
    config = replace(config or TrainConfig(), **{key: v for key, v in options.items() if key in names})
    arch_options = {key: v for key, v in options.items() if key not in names}
    single = isinstance(layer, int)
    layers = layer_list(layer, num_layers(model), name="layer")
    if not isinstance(corpus, Corpus):
        raise TypeError(f"corpus must be a steerkit Corpus (see load_corpus), got {type(corpus).__name__}")
    rank, size = world()
    config = config.checked(hidden_size(model), size)
    out, ckpt = _outputs(out, config, corpus, force)
    runs = _new_runs(model, corpus, layers, config, arch_options)
    position = _Position(0, 0, {"excluded": 0, "seen": 0}, _buffer(config))
    position.buffer.generator.manual_seed(config.seed + rank)
    if config.resume:
        state = _load_checkpoint(ckpt, runs, _settings(config, layers), position.buffer.generator, position.buffer)
        position.step, position.consumed = state["step"], state["consumed"][rank]
        position.counts.update(state["counts"][rank])
    logger.info(
        "training %s SAE(s) on layer(s) %s: %d tokens in %d steps of %d, %d rank(s), from step %d", config.arch,
        layers, config.tokens, config.steps, config.batch_size, size, position.step,
    )  # fmt: skip
    _train(model, tok, corpus, runs, config, position, ckpt, progress)
    return _finish(runs, position.step * config.batch_size, position.counts, out, ckpt, single, force)


def _outputs(out, config: TrainConfig, corpus: Corpus, force: bool) -> tuple[Path | None, Path | None]:
    """The output folder and its checkpoint folder, checked before hours of training, not after."""
    if (config.checkpoint_every or config.resume) and out is None:
        raise ValueError("checkpoint_every and resume need out= (checkpoints go to {out}.ckpt)")
    if out is None:
        return None, None
    out = Path(out)
    ckpt = out.with_name(out.name + ".ckpt")
    check_output(out, force=force, directory=True, inputs=[corpus.source] if corpus.source else ())
    if config.resume and not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {ckpt}")
    if config.checkpoint_every and not config.resume and ckpt.exists() and not force:
        raise FileExistsError(
            f"{ckpt} holds an earlier run's checkpoint: pass resume=True to continue it, or force=True"
        )
    return out, ckpt


def _settings(config: TrainConfig, layers: list[int]) -> dict:
    """What a checkpoint must have been made with to be resumed."""
    return {"arch": config.arch, "layers": layers, "d_sae": config.d_sae, "k": config.k, "ctx_len": config.ctx_len,
            "batch_size": config.batch_size, **({"kind": config.kind} if config.kind != "sae" else {}),
            **({"every_token": True} if config.every_token else {})}  # fmt: skip


def _new_runs(model: nn.Module, corpus: Corpus, layers: list[int], config: TrainConfig, arch_options: dict) -> dict:
    """One fresh SAE and optimiser per layer, on its block's device, seeded by ``config.seed``."""
    options = {**ARCHS[config.arch](config.k, config.steps), **arch_options}
    if config.kind == "transcoder":  # its decoder bias lives in the output's space, not the input's
        options["apply_b_dec_to_input"] = False
    meta = {"model_name": fingerprint(model)["name"], "context_size": config.ctx_len, "prepend_bos": False,
            "dataset_path": corpus.name}  # fmt: skip
    torch.manual_seed(config.seed)
    runs = {}
    for value in layers:
        first = "included" if config.every_token else "excluded"
        steerkit = {"layer_index": value, "corpus_fingerprint": corpus.fingerprint, "first_position": first}
        runs[value] = _new_run(config.arch, value, hidden_size(model), config.d_sae, options, config.lr,
                               {**meta, "steerkit": steerkit}, block_device(model, value))  # fmt: skip
        runs[value].transcode = config.kind == "transcoder"
    return runs


def _activations(model, tok, corpus: Corpus, runs: dict, config: TrainConfig, position: _Position,
                 buffer: ShuffleBuffer):  # fmt: skip
    """Shuffled batches ``{layer: [batch_size / W, d]}`` of this rank's activations, outliers left out, until the
    corpus ends; the first batch sets each SAE's scale and outlier norm. A sequence counts as read (``consumed``,
    the outlier counts) when its rows enter the buffer, so a checkpoint taken between any two batches, with the
    buffer's rows, resumes exactly."""
    rank, size = world()
    skip = rank + position.consumed * size
    needed = lambda: (config.steps - position.step) * buffer.batch_size  # noqa: E731  (rows training still takes)
    for chunk in corpus.batches(tok, config.ctx_len, config.model_batch, "train", skip=skip, shard=(rank, size)):
        read = mlp_activations if config.kind == "transcoder" else block_activations
        acts = read(model, chunk, list(runs), first=0 if config.every_token else 1)
        for run in runs.values():
            if run.scale is None:
                _first_batch(run, acts[run.layer], hidden_size(model), config.every_token)
        keep = torch.stack([acts[v].norm(dim=-1) <= run.max_norm for v, run in runs.items()]).all(0)
        yield from buffer.make_room(int(keep.sum()))
        buffer.insert({v: x[keep] for v, x in acts.items()})
        position.consumed += chunk.shape[0]
        position.counts["excluded"] += int((~keep).sum())
        position.counts["seen"] += keep.numel()
        while buffer.size >= needed() > 0:  # the last batches: everything still needed is here
            yield buffer.pop()
    yield from buffer.drain()


def _buffer(config: TrainConfig) -> ShuffleBuffer:
    """This rank's shuffle buffer: ``buffer_tokens`` over all ranks (at least two batches each)."""
    size = world()[1]
    local_batch = config.batch_size // size
    capacity = max(min(config.buffer_tokens, config.tokens) // size, 2 * local_batch)
    return ShuffleBuffer(capacity, local_batch, torch.Generator())


def _train(model, tok, corpus, runs: dict, config: TrainConfig, position: _Position, ckpt, progress: bool) -> None:
    """Adam steps until ``config.tokens``, logging about 100 times and checkpointing every ``checkpoint_every``."""
    layers, steps, batch = list(runs), config.steps, config.batch_size
    bar = tqdm(total=steps * batch, initial=position.step * batch, unit="tok", disable=not progress or world()[0])
    bar.set_description(f"SAE {config.arch} layer{'s' if len(layers) > 1 else ''} {','.join(map(str, layers))}")
    log_every = max(1, steps // 100)
    next_ckpt = position.step * batch + config.checkpoint_every if config.checkpoint_every else None
    source = _activations(model, tok, corpus, runs, config, position, position.buffer)
    try:
        while position.step < steps:
            acts = next(source, None)
            if not _all_have(acts is not None):  # a rank ran out of text: every rank stops here
                break
            with torch.autocast(acts[layers[0]].device.type, dtype=torch.bfloat16, enabled=config.autocast):
                logs = {v: runs[v].step(acts[v], position.step, steps, config.lr, config.dead_window) for v in layers}
            position.step += 1
            bar.update(batch)
            first = logs[layers[0]]
            bar.set_postfix(L0=f"{first['l0']:.1f}", EV=f"{first['explained_variance']:.3f}",
                            dead=f"{first['dead_fraction']:.1%}")  # fmt: skip
            if position.step % log_every == 0 or position.step == steps:
                for v, log in logs.items():
                    runs[v].history.append({**_mean_over_ranks(log), "tokens": position.step * batch})
            if next_ckpt is not None and position.step * batch >= next_ckpt and position.step < steps:
                _checkpoint(ckpt, runs, position, _settings(config, layers))
                next_ckpt += config.checkpoint_every
    finally:
        bar.close()
    if position.step < steps:
        raise ValueError(
            f"corpus {corpus.name!r} ran out after {position.step * batch} of {config.tokens} tokens: "
            "pass a larger corpus or fewer tokens"
        )


def _finish(runs: dict, trained: int, counts: dict, out: Path | None, ckpt: Path | None, single: bool, force: bool):
    """Write the SAEs (rank 0; to a temporary folder without ``out``), drop the checkpoint, read them back."""
    totals = all_reduce(torch.tensor([counts["excluded"], counts["seen"]]), "sum", "counting outliers").tolist()
    counts = {"excluded": totals[0], "seen": totals[1]}
    first = next(iter(runs))
    if out is None:
        with tempfile.TemporaryDirectory() as tmp:
            _write(runs, trained, Path(tmp), single, counts)
            result = _read(runs, Path(tmp), single)
        return result[first] if single else result
    if world()[0] == 0:  # one writer; the other ranks read what it wrote
        with atomic_path(out, force=force, directory=True) as tmp:
            tmp.mkdir()
            _write(runs, trained, tmp, single, counts)
        if (ckpt / "state.json").is_file():  # this run's checkpoint (or the one it resumed): done with
            remove_created(ckpt)
    barrier("waiting for rank 0 to write the SAE")
    result = _read(runs, out, single)
    return result[first] if single else result


def _first_batch(run: _Run, acts: torch.Tensor, d_in: int, every_token: bool = False) -> None:
    """Outlier norm (inf with ``every_token``), mean norm → √d_in scale and decoder bias at the mean of the
    inliers, from the first batch (rank 0's, for every rank, so data-parallel SAEs start identical). A
    transcoder's input and output are scaled apart and its decoder bias starts at the output's mean."""
    norms = acts.norm(dim=-1)
    typical = OUTLIER_FACTOR * float(norms.median())
    max_norm = math.inf if every_token else typical
    inliers = acts[norms <= typical]
    x, y = (inliers[:, :d_in], inliers[:, d_in:]) if run.transcode else (inliers, inliers)
    scales = [math.sqrt(d_in) / float(part.norm(dim=-1).mean().clamp_min(1e-12)) for part in (x, y)]
    stats = broadcast(torch.tensor([max_norm, *scales]))
    run.max_norm, run.scale = float(stats[0]), float(stats[1])
    run.scale_out = float(stats[2]) if run.transcode else None
    target_scale = run.scale_out if run.transcode else run.scale
    run.sae.b_dec.data = broadcast((y.mean(0) * target_scale).to(run.sae.b_dec.dtype))


def _checkpoint(ckpt: Path, runs: dict, position: _Position, settings: dict) -> None:
    """Every rank's data position, counters and shuffle RNG, written by rank 0."""
    counts = position.counts
    positions = [int(x) for x in all_gather(torch.tensor([position.consumed]), "checkpointing")]
    tallies = [t.tolist() for t in all_gather(torch.tensor([[counts["excluded"], counts["seen"]]]), "checkpointing")]
    rngs = [r[0] for r in all_gather(position.buffer.generator.get_state().unsqueeze(0), "checkpointing")]
    held = {layer: all_gather(x, "checkpointing the shuffle buffers") for layer, x in position.buffer.rows().items()}
    buffers = [{layer: pieces[r] for layer, pieces in held.items()} for r in range(len(rngs))]
    if world()[0] == 0:
        state = {
            "step": position.step,
            "consumed": positions,
            "counts": [{"excluded": t[0][0], "seen": t[0][1]} for t in tallies],
            "world_size": len(positions),
            "config": settings,
        }
        _save_checkpoint(ckpt, runs, state, rngs, buffers)
        logger.debug("checkpoint at step %d written to %s", position.step, ckpt)
    barrier("waiting for rank 0 to write a checkpoint")


def _write(runs: dict[int, _Run], trained: int, root: Path, single: bool, counts: dict) -> None:
    """Fold the training scale into each SAE and write sae-lens directories plus ``training_log.json``."""
    for value, run in runs.items():
        target = root if single else root / f"layer_{value}"
        max_norm = run.max_norm if math.isfinite(run.max_norm) else None  # none: trained on every token
        info = {**run.sae.cfg.metadata.steerkit, "tokens": trained, "scale": run.scale, "max_norm": max_norm,
                "outlier_fraction": counts["excluded"] / max(1, counts["seen"])}  # fmt: skip
        _set_threshold(run)
        if run.transcode:
            _transcoder(run, {**info, "scale_out": run.scale_out}).save_model(target)
        else:
            run.sae.fold_activation_norm_scaling_factor(run.scale)
            run.sae.cfg.metadata.steerkit = info
            run.sae.save_inference_model(target)
        (target / "training_log.json").write_text(json.dumps(run.history))


def _transcoder(run: _Run, info: dict):
    """A trained BatchTopK transcoder as sae-lens' ``JumpReLUTranscoder`` on raw activations: the input scale
    folded into the encoder, the output scale out of the decoder, and (sae-lens trains BatchTopK with
    ``rescale_acts_by_decoder_norm``) each latent's decoder norm moved from the decoder into the encoder, so the
    pre-activations compared with BatchTopK's global threshold are the ones it was trained on."""
    from sae_lens import JumpReLUTranscoder, JumpReLUTranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = run.sae
    meta = sae.cfg.metadata
    metadata = SAEMetadata(model_name=meta.model_name, hook_name=f"blocks.{run.layer}.hook_mlp_in",
                           context_size=meta.context_size, prepend_bos=False, dataset_path=meta.dataset_path,
                           hook_name_out=f"blocks.{run.layer}.hook_mlp_out", steerkit=info)  # fmt: skip
    cfg = JumpReLUTranscoderConfig(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, d_out=sae.cfg.d_in, metadata=metadata,
                                   apply_b_dec_to_input=False,
                                   device=str(sae.device))  # fmt: skip
    transcoder = JumpReLUTranscoder(cfg)
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else torch.ones_like(sae.b_enc)
        transcoder.load_state_dict({
            "W_enc": sae.W_enc * run.scale * norms, "b_enc": sae.b_enc * norms,
            "W_dec": sae.W_dec / norms[:, None] / run.scale_out, "b_dec": sae.b_dec / run.scale_out,
            "threshold": torch.full_like(sae.b_enc, float(sae.topk_threshold)),
        })  # fmt: skip
    return transcoder


def _read(runs: dict[int, _Run], root: Path, single: bool) -> dict:
    result = {}
    for value, run in runs.items():
        sae = load_sae(root if single else root / f"layer_{value}", device=str(run.sae.device))
        sae.training_log = run.history
        result[value] = sae
    return result
