"""How good an SAE is on held-out text: reconstruction, sparsity, and what splicing it in costs the model.

Per held-out batch the model runs three times: clean (recording block *layer*), with the SAE spliced in,
and with the block's output zero-ablated. CE loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean);
KL score = 1 − KL(clean‖sae) / KL(clean‖zero). Positions are the tokens after the first, except
outliers above the SAE's recorded norm (neither is replaced, see ``splice``); next-token losses are
taken from the second position on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from steerkit import arch
from steerkit.backends import fingerprint
from steerkit.batching import pad_batch, pad_id
from steerkit.capture import Recorder
from steerkit.data.corpus import Corpus, load_corpus
from steerkit.sae.io import check_sae, load_sae, on_device, recorded_max_norm, sae_layer
from steerkit.sae.splice import is_transcoder, replace_mlp, replace_output, splice

DENSE_ABOVE = 0.1  # a latent firing on more than 10% of tokens counts as dense


def _ce_and_kl(logits: torch.Tensor, clean_logp: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Summed next-token CE of ``logits`` and summed KL(clean ‖ logits) over positions."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ce = -logp.gather(-1, targets.unsqueeze(-1)).sum()
    kl = (clean_logp.exp() * (clean_logp - logp)).sum()
    return float(ce), float(kl)


@torch.no_grad()
def evaluate_sae(
    model: nn.Module,
    tok,
    sae,
    layer: int | None = None,
    corpus: Corpus | None = None,
    tokens: int = 32_768,
    ctx_len: int | None = None,
    batch_size: int = 16,
    max_norm: float | None = None,
    progress: bool = True,
    texts: Sequence[str] | None = None,
) -> dict:
    """Metrics of ``sae`` at block ``layer`` (default: from its hook name) on ``corpus``' held-out split (default:
    the embedded corpus), about ``tokens`` tokens, packed into rows of ``ctx_len``.

    ``texts`` instead scores each text as its own row (cut at ``ctx_len`` tokens, right-padded, padding never
    scored), every one of them: the setting where an SAE is used on prompts, rather than the packed text it was
    trained on.

    Returns floats ``explained_variance``, ``mse`` (per element), ``l0``, ``dead_fraction`` (never fired
    on these tokens), ``dense_fraction`` (fired on > 10%), ``ce_loss_clean`` / ``_spliced`` / ``_zero``,
    ``ce_loss_recovered``, ``kl_spliced``, ``kl_zero``, ``kl_score``, ``tokens``, and the tensor
    ``latent_frequency`` (fraction of tokens each latent fired on). Tokens above ``max_norm`` (default: the
    SAE's recorded outlier norm) are neither replaced nor scored; ``outlier_fraction`` says how many.
    """
    sae = load_sae(sae)
    check_sae(sae, model)
    layer = arch.validate_layer(sae_layer(sae, layer), fingerprint(model)["num_hidden_layers"])
    if texts is not None and corpus is not None:
        raise ValueError("pass corpus or texts, not both")
    corpus = corpus if corpus is not None or texts is not None else load_corpus("default")
    ctx_len = ctx_len or int(sae.cfg.metadata.get("context_size") or 128)
    batches, tokens, source = _held_out(tok, corpus, texts, ctx_len, batch_size, tokens)
    max_norm = recorded_max_norm(sae) if max_norm is None else max_norm
    tally = _Tally(sae.cfg.d_in, sae.cfg.d_sae)
    device = arch.input_device(model)
    bar = tqdm(total=tokens, unit="tok", desc=f"evaluating SAE at layer {layer}", disable=not progress)
    for ids, mask in batches:
        if tally.n_acts >= tokens:
            break
        score = _score_transcoder if is_transcoder(sae) else _score
        sae = score(model, sae, layer, ids.to(device), mask.to(device), max_norm, tally)
        bar.update(tally.last)
    bar.close()
    if tally.n_acts == 0:
        raise ValueError(f"{source} gave no held-out tokens to evaluate on")
    return tally.metrics()


def _held_out(tok, corpus, texts, ctx_len: int, batch_size: int, tokens: int):
    """(batches of (ids, mask), the tokens to score, how the source is named): ``texts`` one per row, cut at
    ``ctx_len`` and right-padded, all of them; else ``corpus``' held-out split packed into rows of ``ctx_len``."""
    if texts is None:
        batches = ((b, torch.ones_like(b)) for b in corpus.batches(tok, ctx_len, batch_size, "heldout"))
        return batches, tokens, f"corpus {corpus.name!r}"
    rows = [tok(t, add_special_tokens=False)["input_ids"][:ctx_len] if isinstance(t, str) else None for t in texts]
    bad = [i for i, row in enumerate(rows) if row is None or len(row) < 3]
    if not rows or bad:
        raise ValueError(f"texts: expected strings of at least 3 tokens; bad at {bad[:5] or 'empty list'}")
    starts = range(0, len(rows), batch_size)
    batches = (pad_batch(rows[i : i + batch_size], pad_id(tok), "right")[:2] for i in starts)
    return batches, sum(len(row) - 1 for row in rows), f"{len(rows)} texts"


def _score(model, sae, layer: int, ids: torch.Tensor, mask: torch.Tensor, max_norm, tally: _Tally):
    """One batch three times (clean, SAE spliced, block zero-ablated) into ``tally``; returns the SAE, moved to
    the block's device on the first batch when the block computes elsewhere."""
    real, scored = mask[:, 1:].bool(), mask[:, 2:].bool()  # activations after the first token; predictions
    run = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    with Recorder(model, [layer]) as rec:
        clean = model(**run).logits[:, 1:-1][scored]
    x = rec[layer][:, 1:][real.to(rec[layer].device)].float()
    sae = on_device(sae, x.device)
    inlier = x.norm(dim=-1) <= (max_norm or float("inf"))
    x = x[inlier]
    acts = sae.encode(x.to(sae.dtype))
    tally.reconstruction(x, acts, sae.decode(acts).float(), outliers=int((~inlier).sum()))
    targets = ids[:, 2:][scored]
    clean_logp = F.log_softmax(clean.float(), dim=-1)
    with splice(model, sae, layer, max_norm=max_norm):
        spliced = model(**run).logits[:, 1:-1][scored]
    with replace_output(model, layer, torch.zeros_like, max_norm=max_norm):
        zero = model(**run).logits[:, 1:-1][scored]
    tally.losses(clean_logp, targets, spliced, zero)
    return sae


def _score_transcoder(model, sae, layer: int, ids: torch.Tensor, mask: torch.Tensor, max_norm, tally: _Tally):
    """One batch three times for a transcoder: clean (reading its MLP's input and output), with the MLP replaced
    by the transcoder, and with the MLP's output zeroed; the reconstruction scored is of the MLP output."""
    from steerkit.sae.train import mlp_activations

    real, scored = mask[:, 1:].bool(), mask[:, 2:].bool()
    run = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    with torch.no_grad():
        clean = model(**run).logits[:, 1:-1][scored]
    rows = mlp_activations(model, ids, [layer])[layer][real.reshape(-1).to("cpu")]
    sae = on_device(sae, rows.device)
    inlier = rows.norm(dim=-1) <= (max_norm or float("inf"))
    x, y = rows[inlier, : sae.cfg.d_in], rows[inlier, sae.cfg.d_in :]
    acts = sae.encode(x.to(sae.dtype))
    tally.reconstruction(y, acts, sae.decode(acts).float(), outliers=int((~inlier).sum()))
    targets = ids[:, 2:][scored]
    with replace_mlp(model, layer, lambda h: sae.decode(sae.encode(h.to(sae.dtype))), max_norm=max_norm):
        spliced = model(**run).logits[:, 1:-1][scored]
    with replace_mlp(model, layer, torch.zeros_like, max_norm=max_norm):
        zero = model(**run).logits[:, 1:-1][scored]
    tally.losses(F.log_softmax(clean.float(), dim=-1), targets, spliced, zero)
    return sae


class _Tally:
    """Running sums over held-out batches: reconstruction and firing per activation, CE and KL per prediction."""

    def __init__(self, d_in: int, d_sae: int):
        self.d_in = d_in
        self.sums = dict.fromkeys(("sq_err", "sq", "l0", "ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"), 0.0)
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.x_sum = torch.zeros(d_in, dtype=torch.float64)
        self.n_acts = self.n_preds = self.outliers = self.last = 0

    def reconstruction(self, x: torch.Tensor, acts: torch.Tensor, recon: torch.Tensor, outliers: int) -> None:
        self.sums["sq_err"] += float((recon - x).pow(2).sum())
        self.sums["sq"] += float(x.double().pow(2).sum())
        self.x_sum += x.double().sum(0).cpu()
        active = acts > 0
        self.sums["l0"] += float(active.sum())
        self.fires += active.sum(0).cpu()
        self.n_acts += x.shape[0]
        self.outliers += outliers
        self.last = x.shape[0]

    def losses(self, clean_logp, targets, spliced: torch.Tensor, zero: torch.Tensor) -> None:
        self.sums["ce_clean"] += float(-clean_logp.gather(-1, targets.unsqueeze(-1)).sum())
        for name, logits in (("sae", spliced), ("zero", zero)):
            ce, kl = _ce_and_kl(logits, clean_logp, targets)
            self.sums[f"ce_{name}"] += ce
            self.sums[f"kl_{name}"] += kl
        self.n_preds += targets.numel()

    def metrics(self) -> dict:
        sums, n_acts, n_preds = self.sums, self.n_acts, self.n_preds
        total_var = sums["sq"] - float(self.x_sum.pow(2).sum()) / n_acts
        ce_clean, ce_sae, ce_zero = (sums[k] / n_preds for k in ("ce_clean", "ce_sae", "ce_zero"))
        kl_sae, kl_zero = sums["kl_sae"] / n_preds, sums["kl_zero"] / n_preds
        frequency = self.fires.double() / n_acts
        return {
            "explained_variance": 1 - sums["sq_err"] / total_var,
            "fvu": sums["sq_err"] / total_var,  # fraction of variance unexplained (of the MLP output, a transcoder's)
            "mse": sums["sq_err"] / (n_acts * self.d_in),
            "l0": sums["l0"] / n_acts,
            "dead_fraction": float((self.fires == 0).double().mean()),
            "dense_fraction": float((frequency > DENSE_ABOVE).double().mean()),
            "ce_loss_clean": ce_clean,
            "ce_loss_spliced": ce_sae,
            "ce_loss_zero": ce_zero,
            "ce_loss_recovered": (ce_zero - ce_sae) / (ce_zero - ce_clean),
            "kl_spliced": kl_sae,
            "kl_zero": kl_zero,
            "kl_score": 1 - kl_sae / kl_zero,
            "tokens": n_acts,
            "outlier_fraction": self.outliers / (n_acts + self.outliers),
            "latent_frequency": frequency.float(),
        }


@torch.no_grad()
def top_activations(
    model: nn.Module,
    tok,
    sae,
    layer: int | None,
    corpus: Corpus | None,
    latents: list[int],
    sequences: int = 64,
    top: int = 5,
    window: int = 12,
    ctx_len: int | None = None,
    batch_size: int = 16,
) -> dict[int, list[dict]]:
    """For each latent, the ``top`` held-out tokens it fires on most strongly: ``{"activation", "token",
    "context"}`` with the ``window`` tokens before it as context (first positions excluded, as in training)."""
    sae = load_sae(sae)
    check_sae(sae, model)
    layer = arch.validate_layer(sae_layer(sae, layer), fingerprint(model)["num_hidden_layers"])
    corpus = corpus if corpus is not None else load_corpus("default")
    bad = [latent for latent in latents if not 0 <= latent < sae.cfg.d_sae]
    if bad:
        raise ValueError(f"latents {bad} out of range: the SAE has {sae.cfg.d_sae}")
    ctx_len = ctx_len or int(sae.cfg.metadata.get("context_size") or 128)
    device = arch.input_device(model)
    index = torch.tensor(latents)
    rows, values = [], []
    for batch in corpus.batches(tok, ctx_len, batch_size, "heldout"):
        if len(rows) * batch_size >= sequences:
            break
        with Recorder(model, [layer], stop=True) as rec:
            model(input_ids=batch.to(device), use_cache=False)
        h = rec[layer][:, 1:]
        sae = on_device(sae, h.device)
        acts = sae.encode(h.to(sae.dtype)).float().cpu()[..., index]  # [b, s-1, n]
        rows.append(batch)
        values.append(acts)
    if not rows:
        raise ValueError(f"corpus {corpus.name!r} gave no held-out text")
    ids, acts = torch.cat(rows), torch.cat(values)  # [N, s], [N, s-1, n]
    flat = acts.reshape(-1, len(latents))
    result = {}
    for column, latent in enumerate(latents):
        best = flat[:, column].topk(min(top, flat.shape[0]))
        result[latent] = []
        for value, where in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            if value <= 0:
                break
            seq, pos = divmod(where, acts.shape[1])
            pos += 1  # acts start at position 1
            result[latent].append(
                {
                    "activation": value,
                    "token": tok.decode(ids[seq, pos : pos + 1]),
                    "context": tok.decode(ids[seq, max(0, pos - window) : pos]),
                }
            )
    return result
