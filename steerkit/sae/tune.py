"""SAE-tuning (Resa, Wang et al. 2025): LoRA-tune a target with a frozen SAE spliced into it.

The SAE sits at block *layer* of the target for the whole of training. Loss ``"kl"`` (Resa's) is
KL(teacher ‖ student) on every real token, the teacher being the same target with adapters off and no SAE,
so no labels are needed; ``"ce"`` is next-token cross-entropy on the answer tokens. ``grad_through_sae=False``
runs the SAE under ``no_grad`` as Resa's released code does (adapters at or below the layer then learn
from nothing but the first tokens). Afterwards the SAE is gone: the result is a LoRA adapter (``out``; put
it onto another model of the same family with ``attach_adapter``) or, with ``merge=True``, a plain
checkpoint written through steerkit's checkpoint writer.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from steerkit._config import option
from steerkit._hub import card, name_of
from steerkit._io import atomic_path, check_output, confined
from steerkit.arch import input_device
from steerkit.backends import fingerprint
from steerkit.batching import pad_batch, pad_id
from steerkit.sae.io import check_sae, load_sae, sae_layer
from steerkit.sae.splice import splice

LOSSES = ("kl", "ce")
DEFAULT_LORA = {"lora_dropout": 0.05, "target_modules": "all-linear"}  # (rank and alpha: TuneConfig)
FAMILY_FILE = "steerkit_adapter.json"


def _examples(data, loss: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: ``{"prompt", "answer"}`` dicts, 2-tuples, or (for ``kl``) plain strings."""
    out = []
    for number, item in enumerate(data):
        if isinstance(item, str) and loss == "kl":
            out.append(("", item))
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str) and isinstance(item.get("answer"), str):
            out.append((item["prompt"], item["answer"]))
        elif isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(x, str) for x in item):
            out.append((item[0], item[1]))
        else:
            need = "a {'prompt', 'answer'} dict or a (prompt, answer) pair" + (" or a string" if loss == "kl" else "")
            raise ValueError(f"data[{number}] is {item!r}: expected {need}")
    if not out:
        raise ValueError("data is empty")
    return out


def _batch(tok, examples: list[tuple[str, str]], max_length: int):
    """Right-padded ids, attention mask, and a mask of answer tokens (the tokens the loss reads)."""
    rows, answer_masks = [], []
    for prompt, answer in examples:
        p = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        a = tok(answer, add_special_tokens=False)["input_ids"]
        ids = (p + a)[:max_length]
        rows.append(ids)
        answer_masks.append([False] * len(p[: len(ids)]) + [True] * (len(ids) - min(len(p), len(ids))))
    input_ids, mask, _ = pad_batch(rows, pad_id(tok), "right")
    answer = torch.zeros_like(mask, dtype=torch.bool)
    for i, flags in enumerate(answer_masks):
        answer[i, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
    return input_ids, mask, answer


@dataclass
class TuneConfig:
    """How SAE-tuning trains: the options of ``sae_tune``, and of ``steerkit sae-tune`` (which takes its options
    and their help from these fields)."""

    loss: str = option("kl", "kl (Resa: match the untouched target, no labels) or ce (the answers' tokens).")
    grad_through_sae: bool = option(True, "Let gradients flow through the frozen SAE (off: Resa's released code).")
    skip_first: bool = option(True, "Leave each row's first token unspliced (as splice does by default).")
    replace_outliers: bool = option(False, "Splice tokens above the SAE's recorded outlier norm too (Resa: every one).")
    epochs: int = option(2, "Passes over the data.")
    lr: float = option(1e-4, "AdamW learning rate.")
    batch_size: int = option(8, "Examples per step.")
    max_length: int = option(256, "Tokens per example (prompt and answer), cut beyond.")
    rank: int = option(32, "LoRA rank.")
    lora_alpha: float | None = option(None, "LoRA alpha (default 4 x rank, as Resa's 32 / 128).")
    seed: int = option(0, "Seed of the LoRA initialisation and the example order.")
    autocast: bool = option(False, "Forward passes in bf16 (the adapters and AdamW stay float32).")

    @classmethod
    def resa(cls, **changes) -> TuneConfig:
        """Resa's released recipe (their ``scripts/train/sae_tuning.py`` and ``sae_tuning.yaml``): the SAE frozen
        under ``no_grad`` and every token's block output replaced (the first and outliers too); LoRA rank 32, α
        128; KL to the adapter-free model; lr 1e-6, batch 1, 2 epochs. ``changes`` override fields (the learning
        rate Resa set for a 1.5B model is the one a miniature most needs to revisit)."""
        recipe = dict(loss="kl", grad_through_sae=False, skip_first=False, replace_outliers=True, epochs=2, lr=1e-6,
                      batch_size=1, rank=32, lora_alpha=128.0)  # fmt: skip
        return cls(**{**recipe, **changes})

    def checked(self) -> TuneConfig:
        """ValueError naming the first option out of range."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: expected one of {LOSSES}")
        for name in ("epochs", "batch_size", "max_length", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        return self


def sae_tune(
    target: nn.Module,
    tok,
    sae,
    layer: int | None,
    data: Sequence,
    lora: dict | None = None,
    out: str | Path | None = None,
    merge: bool = False,
    force: bool = False,
    progress: bool = True,
    config: TuneConfig | None = None,
    **options,
) -> nn.Module:
    """LoRA-tune a copy of ``target`` with ``sae`` spliced in at ``layer``; the target itself is not changed.

    ``sae=None`` (with ``loss="ce"``) is the baseline without an SAE: plain LoRA SFT on the answers.

    Returns the adapted model (a peft model) or, with ``merge=True``, a plain transformers model with the
    LoRA merged in. ``out`` saves the adapter (or, merged, a full checkpoint); ``history`` on the result
    lists the loss per step. The options are ``config``'s (a ``TuneConfig``) with any of its fields given as
    keywords on top; ``lora`` updates peft's LoRA settings (by default dropout 0.05 on every linear layer but the
    LM head, rank and alpha from the config). ``autocast=True`` is about 2× faster on a CPU with AMX.
    """
    from peft import LoraConfig, get_peft_model

    config = replace(config or TuneConfig(), **options).checked()
    if sae is None and config.loss == "kl":
        raise ValueError("without an SAE the kl loss is zero: pass an SAE, or loss='ce' for plain LoRA SFT")
    sae_source = sae
    if sae is not None:
        sae = load_sae(sae)
        check_sae(sae, target)
        sae.requires_grad_(False)
        layer = sae_layer(sae, layer)
    examples = _examples(data, config.loss)
    if out is not None:  # refuse a bad output before training, not after
        inputs = [sae_source] if isinstance(sae_source, str | Path) else []
        check_output(out, force=force, inputs=inputs, directory=True)
    torch.manual_seed(config.seed)
    alpha = config.lora_alpha if config.lora_alpha is not None else 4 * config.rank
    settings = {**DEFAULT_LORA, "r": config.rank, "lora_alpha": alpha, **(lora or {})}
    model = get_peft_model(copy.deepcopy(target), LoraConfig(**settings))
    history = _tune(model, tok, sae, layer, examples, config, progress)
    model.eval()
    if merge:
        model = model.merge_and_unload()
    if out is not None:
        if merge:
            save_checkpoint(model, tok, out, force=force)
        else:
            save_adapter(model, out, force=force)
    model.history = history
    return model


def _tune(model, tok, sae, layer: int | None, examples: list, config: TuneConfig, progress: bool) -> list[float]:
    """AdamW on the LoRA parameters over ``config.epochs`` shuffled passes; the loss of every step."""
    base = model.get_base_model()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    device = input_device(base)
    order = torch.Generator().manual_seed(config.seed)
    history = []
    bar = tqdm(total=config.epochs * math.ceil(len(examples) / config.batch_size), desc=f"SAE-tuning ({config.loss})",
               disable=not progress)  # fmt: skip
    for _ in range(config.epochs):
        perm = torch.randperm(len(examples), generator=order).tolist()
        for start in range(0, len(perm), config.batch_size):
            chunk = [examples[i] for i in perm[start : start + config.batch_size]]
            batch = [t.to(device) for t in _batch(tok, chunk, config.max_length)]
            value = _loss(model, base, sae, layer, batch, config)
            if not torch.isfinite(value):
                raise ValueError(
                    f"the {config.loss} loss is {float(value)} at step {len(history) + 1} (lr={config.lr:g}): "
                    "training diverged; nothing was written"
                )
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            history.append(float(value.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    bar.close()
    return history


def _loss(model, base, sae, layer: int | None, batch: list[torch.Tensor], config: TuneConfig) -> torch.Tensor:
    """One batch's loss with the SAE spliced in: KL to the adapter-free model on every real token (``kl``), or
    cross-entropy on the answer tokens (``ce``)."""
    input_ids, mask, answer = batch
    low = torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=config.autocast)
    if config.loss == "kl":
        with torch.no_grad(), model.disable_adapter(), low:
            teacher = F.log_softmax(base(input_ids=input_ids, attention_mask=mask).logits.float(), -1)
    spliced = (
        splice(
            base,
            sae,
            layer,
            skip_first=config.skip_first,
            grad_through_sae=config.grad_through_sae,
            max_norm=float("inf") if config.replace_outliers else None,
        )
        if sae is not None
        else contextlib.nullcontext()
    )
    with spliced, low:
        student = F.log_softmax(base(input_ids=input_ids, attention_mask=mask).logits.float(), -1)
    if config.loss == "kl":
        return (teacher.exp() * (teacher - student)).sum(-1)[mask.bool()].mean()
    targets = answer[:, 1:]  # position t predicts token t + 1
    if not targets.any():
        raise ValueError("no answer tokens in a batch: are the answers empty or cut by max_length?")
    picked = student[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return -picked[targets].mean()


def save_adapter(model: nn.Module, out: str | Path, force: bool = False) -> Path:
    """Write a peft model's adapter atomically, with the family it fits (model type, width, depth)."""
    with atomic_path(out, force=force, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / FAMILY_FILE).write_text(json.dumps(_family(model.get_base_model()), indent=1))
        base = fingerprint(model.get_base_model())["name"]
        lines = [
            f"LoRA adapter for `{name_of(base)}` from SAE-tuning",
            "`steerkit.attach_adapter(model, path)` or peft",
        ]
        text = card(
            "SAE-tuning adapter", lines, base_model=base, relation="adapter", tags=("lora", "peft", "sae-tuning")
        )
        (tmp / "README.md").write_text(text)  # replaces peft's own, which names no base model for local ones
    return Path(out)


def save_checkpoint(model: nn.Module, tok, out: str | Path, force: bool = False, inputs=()) -> Path:
    """A plain model's weights, config, generation config and tokenizer files through steerkit's checkpoint
    writer (tied tensors once, as transformers writes them)."""
    from steerkit.checkpoint import CheckpointWriter, specs_of

    tensors, seen = [], set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied copy (lm_head = embed_tokens)
            continue
        seen.add(tensor.data_ptr())
        tensors.append((name, tensor.detach()))
    with CheckpointWriter(out, specs_of(tensors), force=force, inputs=inputs) as writer:
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.add_file("config.json", model.config.to_json_string())
        if getattr(model, "generation_config", None) is not None:
            writer.add_file("generation_config.json", model.generation_config.to_json_string())
        with tempfile.TemporaryDirectory() as tokdir:
            tok.save_pretrained(tokdir)
            for path in Path(tokdir).iterdir():
                writer.add_file(path.name, path.read_bytes())
        base = fingerprint(model)["name"]
        lines = [f"base: `{name_of(base)}`", "weights written by steerkit (LoRA merged into the base)"]
        writer.add_file("README.md", card("Fine-tuned checkpoint", lines, base_model=base, relation="finetune"))
    return Path(out)


def _family(model: nn.Module) -> dict:
    fp = fingerprint(model)
    return {k: fp[k] for k in ("model_type", "hidden_size", "num_hidden_layers")}


def attach_adapter(model: nn.Module, adapter: str | Path, merge: bool = False) -> nn.Module:
    """Put a saved SAE-tuning adapter onto (a copy of) another model of the same family (Resa's modularity)."""
    from peft import PeftModel

    from steerkit._hub import local

    path = local(adapter)
    if not confined(path, "adapter_config.json", "adapter file").is_file():
        raise FileNotFoundError(f"no LoRA adapter at {path} (adapter_config.json missing)")
    if not confined(path, "adapter_model.safetensors", "adapter file").is_file():
        raise ValueError(f"{path} has no adapter_model.safetensors: steerkit loads adapters from safetensors only")
    family_file = confined(path, FAMILY_FILE, "adapter file")
    if family_file.is_file():
        wanted, have = json.loads(family_file.read_text()), _family(model)
        if wanted != have:
            raise ValueError(f"the adapter at {path} was trained for {wanted}, but the model is {have}")
    attached = PeftModel.from_pretrained(copy.deepcopy(model), str(path))
    attached.eval()
    return attached.merge_and_unload() if merge else attached
