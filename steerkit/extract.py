"""Contrastive pairs → SteeringVector: one direction per layer by mean difference, PCA, probe or mean positive.

Every contrastive direction is oriented so positives project higher than negatives, and PCA / probe
directions are rescaled to the norm of the mean difference, so one α means the same across methods.
Separation is the AUROC of the projection on held-out pairs (the ``test`` split, or every fifth pair).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from steerkit.backends import fingerprint
from steerkit.capture import Position, capture
from steerkit.data import Pair, as_pairs, pairs_hash
from steerkit.vector import SteeringVector


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann–Whitney AUROC)."""
    diff = pos.reshape(-1, 1) - neg.reshape(1, -1)
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def _first_pc(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """First right singular vector of ``x`` (uncentred) and the share of ``x``'s energy along it."""
    _, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return vh[0].float(), float(s[0] ** 2 / (s**2).sum().clamp_min(1e-30))


def _probe(pos: torch.Tensor, neg: torch.Tensor, l2: float = 0.1, steps: int = 100) -> torch.Tensor:
    """Weight vector of an L2-regularised logistic regression separating ``pos`` (1) from ``neg`` (0).

    Features are standardised; the strong default penalty suits the usual case of fewer pairs than dimensions,
    where an unregularised probe fits noise (it ignores the pairing that mean_diff exploits).
    """
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    center, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - center) / scale
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (w.detach() / scale).float()  # back to the raw activation space


def _mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, None]:
    return (pos - neg).mean(0), None


def _pca_diff(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, float]:
    return _first_pc(pos - neg)  # uncentred: the mean difference is the signal, not noise to subtract


def _pca_center(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, float]:
    middle = (pos + neg) / 2  # each pair centred on its own mean (repeng's pca_center)
    return _first_pc(torch.cat([pos - middle, neg - middle]))


def _mean_positive(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, None]:
    return pos.mean(0), None


@dataclass(frozen=True)
class Method:
    """An extraction method: ``fn(pos, neg)`` gives a direction and (for PCA) its explained variance;
    ``contrastive`` ones are oriented so positives project higher and scaled to the mean difference's norm,
    so one α means the same across them."""

    fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, float | None]]
    contrastive: bool
    about: str


# name -> method: ``extract(method=)`` and ``steerkit extract --method`` read this table
METHODS: dict[str, Method] = {
    "mean_diff": Method(_mean_diff, True, "mean of the paired differences (AxBench's strongest)"),
    "pca_diff": Method(_pca_diff, True, "first principal component of the paired differences, uncentred"),
    "pca_center": Method(_pca_center, True, "first principal component of pair-centred activations (repeng)"),
    "probe": Method(lambda pos, neg: (_probe(pos, neg), None), True, "L2 logistic regression"),
    "mean_positive": Method(_mean_positive, False, "mean of the positives alone (Højer et al.'s R)"),
}


def direction(pos: torch.Tensor, neg: torch.Tensor, method: str = "mean_diff") -> tuple[torch.Tensor, float | None]:
    """One layer's direction from paired activations ``pos``, ``neg`` ``[n, d]``; and PCA's explained variance."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {tuple(METHODS)}")
    spec = METHODS[method]
    vec, explained = spec.fn(pos, neg)
    if spec.contrastive:
        vec = vec / vec.norm().clamp_min(1e-12) * (pos - neg).mean(0).norm()
        if ((pos - neg) @ vec).mean() < 0:
            vec = -vec
    return vec, explained


def split_pairs(pairs: Sequence[Pair]) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): the pairs' own ``test`` split, else every fifth pair when there are at least five."""
    train = [p for p in pairs if p.split == "train"]
    test = [p for p in pairs if p.split == "test"]
    if not test and len(train) >= 5:
        test = train[4::5]
        train = [p for i, p in enumerate(train) if i % 5 != 4]
    if not train:
        raise ValueError("no training pairs: every pair is marked split='test'")
    return train, test


def extract(
    model,
    tok,
    pairs: Sequence[Pair | tuple[str, str]],
    layers: Iterable[int] | None = None,
    method: str = "mean_diff",
    position: Position = "last",
    batch_size: int = 16,
    progress: bool | None = None,
) -> SteeringVector:
    """A SteeringVector from contrastive ``pairs`` (``Pair`` objects or ``(positive, negative)`` tuples) at
    ``layers`` (default: every block).

    Methods: ``mean_diff`` (default; AxBench's best), ``pca_diff`` (uncentred PCA of the differences),
    ``pca_center`` (PCA of pair-centred activations), ``probe`` (logistic regression), ``mean_positive``
    (Højer's R). Metadata records the model fingerprint, method, pair hash, and per layer the held-out
    AUROC (``separation``), the norm, and PCA's explained variance.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {tuple(METHODS)}")
    pairs = as_pairs(pairs)
    train, test = split_pairs(pairs)
    fp = fingerprint(model)
    layers = list(range(fp["num_hidden_layers"])) if layers is None else list(layers)
    texts = [p.positive for p in train] + [p.negative for p in train]
    texts += [p.positive for p in test] + [p.negative for p in test]
    acts = capture(model, tok, texts, layers, position=position, batch_size=batch_size, progress=progress)
    n, m = len(train), len(test)
    pos, neg = acts[:n], acts[n : 2 * n]
    test_pos, test_neg = acts[2 * n : 2 * n + m], acts[2 * n + m :]
    directions, separation, explained = {}, {}, {}
    for j, layer in enumerate(layers):
        vec, share = direction(pos[:, j], neg[:, j], method)
        directions[layer] = vec
        if m:
            separation[layer] = auroc(test_pos[:, j] @ vec, test_neg[:, j] @ vec)
        if share is not None:
            explained[layer] = share
    meta = {
        "model": fp,
        "method": method,
        "position": position,
        "pairs_hash": pairs_hash(pairs),
        "n_train": n,
        "n_test": m,
        "separation": separation,
        "norms": {layer: float(v.norm()) for layer, v in directions.items()},
    }
    if explained:
        meta["explained_variance"] = explained
    return SteeringVector(directions, meta)
