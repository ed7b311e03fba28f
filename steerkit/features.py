"""SAE latents as behaviour: a latent's decoder row as a steering vector, the latents that separate a contrastive
pair set, and what each latent does on a corpus.

- ``feature_vector(sae, latents)``: a ``SteeringVector`` of decoder rows, so a latent goes wherever a vector goes
  (``steer``, ``generate``, ``steerkit serve``, ``bake``, ``export-gguf``, ``push``). α is in the latent's own
  activation units: adding α·W_dec[i] at its block is what raising latent *i*'s activation by α does to the
  reconstruction. ``steer(..., mode="clamp_feature", sae=)`` and ``splice(..., clamp=)`` hold a latent at a value.
- ``top_latents(model, tok, sae, pairs)``: latents ranked by how they separate the pairs (mean activation
  difference on the train split, AUROC on the held-out one).
- ``latent_stats(model, tok, sae, corpus)``: per latent its firing frequency, largest activation, activation
  histogram, top activating contexts (tokens and the latent's activation on each) and logit-lens tokens,
  streamed over the corpus with memory bounded by the tokens read and the latents kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from steerkit import arch
from steerkit.backends import fingerprint
from steerkit.capture import Recorder, capture
from steerkit.data import as_pairs
from steerkit.data.corpus import Corpus, load_corpus
from steerkit.extract import split_pairs
from steerkit.hooks import block_device
from steerkit.sae.io import check_sae, load_sae, on_device, sae_layer
from steerkit.vector import SteeringVector

HISTOGRAM_EDGES = torch.logspace(-2, 3, 41)  # activation bins (log-spaced, 0.01 .. 1000) of the dashboards


def _weights(latents, d_sae: int) -> dict[int, float]:
    """``{latent: weight}`` from an int, a list of ints or a mapping, each latent in ``0..d_sae - 1``."""
    if isinstance(latents, int) and not isinstance(latents, bool):
        latents = {latents: 1.0}
    elif not isinstance(latents, Mapping):
        latents = dict.fromkeys(latents, 1.0)
    bad = [i for i in latents if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < d_sae]
    if not latents or bad:
        raise ValueError(f"latents {bad or '(none)'}: expected latent indices in 0..{d_sae - 1}")
    return {int(i): float(w) for i, w in latents.items()}


def feature_vector(sae, latents: int | Iterable[int] | Mapping[int, float], layer: int | None = None,
                   source: str | None = None) -> SteeringVector:  # fmt: skip
    """A ``SteeringVector`` at the SAE's block (``layer``, default from its hook name) whose direction is the sum
    of the latents' decoder rows (each times its weight, if ``latents`` maps them to weights). Its metadata names
    the latents, their decoder norms and the SAE (``source``, or the path it was loaded from), so that
    ``steer(..., mode="clamp_feature", sae=...)`` can hold them at a value instead."""
    if isinstance(sae, str) or hasattr(sae, "__fspath__"):
        source = source or str(sae)
    sae = load_sae(sae)
    layer = sae_layer(sae, layer)
    weights = _weights(latents, sae.cfg.d_sae)
    rows = sae.W_dec.detach().float().cpu()
    direction = sum(w * rows[i] for i, w in weights.items())
    meta = {
        "method": "sae_feature",
        "latents": {str(i): w for i, w in weights.items()},
        "units": "alpha is added latent activation: alpha * W_dec[i] for each latent i (times its weight)",
        "decoder_norms": {str(i): float(rows[i].norm()) for i in weights},
        "sae": source,
        "model": {"name": sae.cfg.metadata.model_name, "hidden_size": sae.cfg.d_in},
    }
    return SteeringVector({layer: direction}, meta)


def _latent_means(model, tok, sae, layer: int, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """``[len(texts), d_sae]``: each text's latent activations averaged over its tokens after the first."""
    acts, rows = capture(model, tok, texts, [layer], position="all", batch_size=batch_size, progress=False)
    sae = on_device(sae, "cpu")
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    keep = ~first | (torch.bincount(rows, minlength=len(texts))[rows] == 1)  # a one-token text keeps its token
    sums = torch.zeros(len(texts), sae.cfg.d_sae)
    with torch.no_grad():
        for start in range(0, len(rows), 4096):
            chunk = slice(start, start + 4096)
            latent = sae.encode(acts[chunk, 0].to(sae.dtype)).float() * keep[chunk, None]
            sums.index_add_(0, rows[chunk], latent)
    return sums / torch.bincount(rows[keep], minlength=len(texts)).clamp_min(1)[:, None]


def top_latents(model, tok, sae, pairs, layer: int | None = None, n: int = 20, batch_size: int = 16) -> list[dict]:
    """The ``n`` latents that best separate ``pairs`` (a bundled set's name, ``Pair`` objects or tuples): each
    ``{"latent", "mean_diff", "auroc", "positive_mean", "negative_mean"}``, ranked by held-out AUROC (the
    pairs' test split; positives above negatives is 1) and then by the train split's mean difference. Each
    text's score is its latent activation averaged over its tokens after the first."""
    from steerkit.data import load_pairs

    sae = load_sae(sae)
    check_sae(sae, model)
    layer = arch.validate_layer(sae_layer(sae, layer), fingerprint(model)["num_hidden_layers"])
    pairs = load_pairs(pairs) if isinstance(pairs, str) else as_pairs(pairs)
    train, test = split_pairs(pairs)
    if not test:
        raise ValueError("top_latents needs held-out pairs (a test split, or at least five pairs)")
    texts = [p.positive for p in train + test] + [p.negative for p in train + test]
    means = _latent_means(model, tok, sae, layer, texts, batch_size)
    half, n_train = len(train) + len(test), len(train)
    pos, neg = means[:half], means[half:]
    diff = (pos[:n_train] - neg[:n_train]).mean(0)
    test_pos, test_neg = pos[n_train:], neg[n_train:]
    compare = test_pos.T[:, :, None] - test_neg.T[:, None, :]  # [d_sae, test, test]
    auroc = (compare > 0).float().mean((1, 2)) + 0.5 * (compare == 0).float().mean((1, 2))
    order = sorted(range(sae.cfg.d_sae), key=lambda i: (-float(auroc[i]), -float(diff[i])))[:n]
    return [{"latent": i, "mean_diff": float(diff[i]), "auroc": float(auroc[i]),
             "positive_mean": float(pos[:, i].mean()), "negative_mean": float(neg[:, i].mean())}
            for i in order]  # fmt: skip


@dataclass
class LatentStats:
    """What ``latent_stats`` measured, for the latents in ``latents`` (row *j* of each tensor is ``latents[j]``)."""

    latents: list[int]
    tokens: int
    frequency: torch.Tensor  # fraction of tokens each latent fired on
    max_activation: torch.Tensor
    histogram: torch.Tensor  # [latents, len(HISTOGRAM_EDGES) + 1] counts of firings below, between and above the edges
    contexts: dict[int, list[dict]] = field(default_factory=dict)  # latent -> [{activation, tokens, acts}]
    logit_lens: dict[int, dict] = field(default_factory=dict)  # latent -> {"top": [(token, value)], "bottom": ...}


def latent_stats(model, tok, sae, corpus: Corpus | None = None, latents: Sequence[int] | None = None,
                 tokens: int = 32_768, top: int = 8, window: int = 12, ctx_len: int = 128, batch_size: int = 16,
                 progress: bool = True) -> LatentStats:  # fmt: skip
    """Per-latent statistics over about ``tokens`` held-out tokens of ``corpus`` (default: the embedded one); see
    ``LatentStats``. Memory holds the token ids read, the ``top`` best positions of each latent kept, and their
    histograms; the contexts (``window`` tokens each side) are re-run at the end to show the latent's
    activation on every token of them."""
    sae = load_sae(sae)
    check_sae(sae, model)
    layer = sae_layer(sae, None)
    sae = on_device(sae, block_device(model, layer))  # where the block's output is: moved once, not per batch
    corpus = corpus if corpus is not None else load_corpus("default")
    chosen = torch.tensor(list(range(sae.cfg.d_sae)) if latents is None else list(latents))
    tally = _Tally(len(chosen), top)
    sequences: list[torch.Tensor] = []
    bar = tqdm(total=tokens, unit="tok", desc=f"latent statistics at layer {layer}", disable=not progress)
    for batch in corpus.batches(tok, ctx_len, batch_size, "heldout"):
        if tally.tokens >= tokens:
            break
        acts = _encode(model, sae, layer, batch)[..., chosen]  # [b, s - 1, L]: positions after the first
        tally.add(acts, len(sequences))
        sequences += list(batch)
        bar.update(acts.shape[0] * acts.shape[1])
    bar.close()
    if not sequences:
        raise ValueError(f"corpus {corpus.name!r} gave no held-out text")
    stats = tally.result([int(i) for i in chosen])
    stats.contexts = _contexts(model, tok, sae, layer, sequences, tally, stats.latents, window, batch_size)
    stats.logit_lens = _logit_lens(model, tok, sae, stats.latents)
    return stats


def _encode(model, sae, layer: int, batch: torch.Tensor) -> torch.Tensor:
    """Latent activations ``[b, s - 1, d_sae]`` (float32, CPU) of packed ``batch`` after its first position (``sae``
    already on the block's device)."""
    with torch.no_grad(), Recorder(model, [layer], stop=True) as rec:
        model(input_ids=batch.to(arch.input_device(model)), use_cache=False)
    h = rec[layer][:, 1:]
    with torch.no_grad():
        return sae.encode(h.to(sae.dtype)).float().cpu()


class _Tally:
    """Running frequency, maxima, histograms and each latent's ``top`` best (activation, sequence, position)."""

    def __init__(self, n: int, top: int):
        self.fires, self.max = torch.zeros(n, dtype=torch.long), torch.zeros(n)
        self.histogram = torch.zeros(n, len(HISTOGRAM_EDGES) + 1, dtype=torch.long)
        self.best = torch.full((top, n), -1.0)
        self.where = torch.zeros(top, n, dtype=torch.long)  # sequence * 10**6 + position
        self.tokens = 0

    def add(self, acts: torch.Tensor, first_sequence: int) -> None:
        b, s, n = acts.shape
        flat = acts.reshape(-1, n)
        self.tokens += flat.shape[0]
        active = flat > 0
        self.fires += active.sum(0)
        self.max = torch.maximum(self.max, flat.max(0).values)
        bins = torch.bucketize(flat, HISTOGRAM_EDGES)
        self.histogram.scatter_add_(1, bins.T, active.T.long())
        k = min(self.best.shape[0], flat.shape[0])
        values, index = flat.topk(k, dim=0)
        where = (first_sequence + index // s) * 10**6 + index % s + 1  # (position 0 was dropped)
        values, order = torch.cat([self.best, values]).topk(self.best.shape[0], dim=0)
        self.best, self.where = values, torch.cat([self.where, where]).gather(0, order)

    def result(self, latents: list[int]) -> LatentStats:
        return LatentStats(latents, self.tokens, self.fires.double().div(max(1, self.tokens)).float(), self.max,
                           self.histogram)  # fmt: skip


def _contexts(model, tok, sae, layer, sequences, tally: _Tally, latents: list[int], window: int,
              batch_size: int) -> dict:  # fmt: skip
    """Each latent's best contexts: the tokens around its peak and its activation on each of them."""
    wanted = sorted({int(w) // 10**6 for w in tally.where[tally.best > 0].flatten()})
    acts = {}  # sequence -> [s - 1, d_sae], re-run in batches (packed sequences share one length)
    for start in range(0, len(wanted), batch_size):
        chunk = wanted[start : start + batch_size]
        acts.update(zip(chunk, _encode(model, sae, layer, torch.stack([sequences[i] for i in chunk])), strict=True))
    out: dict[int, list[dict]] = {}
    for column, latent in enumerate(latents):
        out[latent] = []
        for value, where in zip(tally.best[:, column].tolist(), tally.where[:, column].tolist(), strict=True):
            if value <= 0:
                break
            seq, pos = divmod(where, 10**6)
            ids = sequences[seq]
            lo, hi = max(1, pos - window), min(len(ids), pos + window + 1)
            row = acts[seq][lo - 1 : hi - 1, latent]
            words = [tok.decode([int(t)]) for t in ids[lo:hi]]
            out[latent].append({"activation": value, "peak": pos - lo, "tokens": words,
                                "acts": [round(float(a), 4) for a in row]})  # fmt: skip
    return out


def _logit_lens(model: nn.Module, tok, sae, latents: list[int], k: int = 10) -> dict:
    """The tokens each latent's decoder row promotes and suppresses most through the unembedding."""
    unembed = model.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d]
    rows = sae.W_dec.detach().float().cpu()[latents]
    logits = rows @ unembed.T
    top, bottom = logits.topk(k, dim=1), (-logits).topk(k, dim=1)
    name = lambda t: tok.decode([int(t)])  # noqa: E731
    return {latent: {"top": [(name(t), float(v)) for t, v in zip(top.indices[j], top.values[j], strict=True)],
                     "bottom": [(name(t), -float(v)) for t, v in zip(bottom.indices[j], bottom.values[j], strict=True)]}
            for j, latent in enumerate(latents)}  # fmt: skip
