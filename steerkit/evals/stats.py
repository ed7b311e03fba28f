"""Intervals and tests for per-item results: bootstrap, paired bootstrap, fraction of a gain recovered, McNemar,
pass@k, paired held-out AUROC against a pair-swap null; over seeds, a t-interval of the mean; across a stage's
comparisons, Holm's correction."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from steerkit.extract import auroc


def bootstrap(
    values: torch.Tensor | Sequence[float], stat: Callable = torch.mean, n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(statistic, 2.5th, 97.5th percentile) over ``n`` resamples of the rows of ``values``."""
    if not isinstance(values, torch.Tensor):
        values = torch.tensor(values, dtype=torch.float32)
    if len(values) == 0:
        raise ValueError("bootstrap of no values")
    g = torch.Generator().manual_seed(seed)
    draws = torch.stack([stat(values[torch.randint(len(values), (len(values),), generator=g)]) for _ in range(n)])
    low, high = torch.quantile(draws.float(), torch.tensor([0.025, 0.975])).tolist()
    return float(stat(values)), low, high


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over the same items with its 95% bootstrap interval (items resampled together)."""
    if len(a) != len(b):
        raise ValueError(f"paired results of different lengths: {len(a)} and {len(b)}")
    return bootstrap(torch.tensor(a, dtype=torch.float32) - torch.tensor(b, dtype=torch.float32), n=n, seed=seed)


def gain_recovered(
    treated: Sequence[float], base: Sequence[float], reference: Sequence[float], n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean(treated) − mean(base)) / (mean(reference) − mean(base)) on the same items, with its 95% bootstrap
    interval (items resampled together): the fraction of the reference's gain over the base that ``treated``
    recovers. Raises ValueError when the reference does not beat the base (the fraction has no meaning)."""
    if not len(treated) == len(base) == len(reference):
        raise ValueError(f"paired results of different lengths: {len(treated)}, {len(base)}, {len(reference)}")
    rows = torch.tensor([list(r) for r in zip(treated, base, reference, strict=True)], dtype=torch.float64)
    gain = float(rows[:, 2].mean() - rows[:, 1].mean())
    if gain <= 0:
        raise ValueError(f"the reference does not beat the base (by {gain:+.3f}): no gain to recover")

    def fraction(v: torch.Tensor) -> torch.Tensor:
        return (v[:, 0].mean() - v[:, 1].mean()) / (v[:, 2].mean() - v[:, 1].mean())

    return bootstrap(rows, stat=fraction, n=n, seed=seed)


def performance_share(
    treated: Sequence[float], reference: Sequence[float], n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """mean(treated) / mean(reference) on the same items, with its 95% bootstrap interval (items resampled
    together): Resa's measure, the tuned model's accuracy as a share of the RL model's (not of its gain)."""
    if len(treated) != len(reference):
        raise ValueError(f"paired results of different lengths: {len(treated)} and {len(reference)}")
    rows = torch.tensor([list(r) for r in zip(treated, reference, strict=True)], dtype=torch.float64)
    if float(rows[:, 1].sum()) <= 0:
        raise ValueError("the reference scores 0: no performance to take a share of")
    return bootstrap(rows, stat=lambda v: v[:, 0].mean() / v[:, 1].mean().clamp(min=1e-12), n=n, seed=seed)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for paired correct/incorrect results (binomial on discordant items)."""
    if len(a) != len(b):
        raise ValueError(f"paired results of different lengths: {len(a)} and {len(b)}")
    only_a = sum(bool(x) and not bool(y) for x, y in zip(a, b, strict=True))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(a, b, strict=True))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct among ``n`` samples (Chen et al. 2021): 1 − C(n−c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def auroc_null(
    pos: torch.Tensor | Sequence[float], neg: torch.Tensor | Sequence[float], n: int = 1000, seed: int = 0
) -> tuple[float, float, list[float]]:
    """AUROC of paired held-out scores (``pos[i]``, ``neg[i]`` from one pair), its permutation p-value, and the
    null AUROCs.

    The null swaps the two members of each pair at random, which leaves their distribution unchanged when the
    score cannot tell them apart; the direction that made the scores must come from other pairs.
    """
    pos, neg = torch.as_tensor(pos, dtype=torch.float32), torch.as_tensor(neg, dtype=torch.float32)
    if pos.ndim != 1 or pos.shape != neg.shape or len(pos) < 2:
        raise ValueError(f"need two equal 1-D score vectors of >= 2 pairs: got {tuple(pos.shape)}, {tuple(neg.shape)}")
    observed = auroc(pos, neg)
    g = torch.Generator().manual_seed(seed)
    null = []
    for _ in range(n):
        swap = torch.rand(len(pos), generator=g) < 0.5
        null.append(auroc(torch.where(swap, neg, pos), torch.where(swap, pos, neg)))
    p = (1 + sum(x >= observed for x in null)) / (1 + n)
    return observed, p, null


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean of a few values (one per seed), the honest interval
    for three seeds where ± one standard deviation is not one."""
    from scipy import stats as scipy_stats

    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError(f"a t interval needs at least two values, got {len(values)}")
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = float(scipy_stats.t.ppf((1 + level) / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return mean, mean - half, mean + half


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given: compare each with the family's α (the step-down
    procedure's adjusted values, monotone, capped at 1)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * float(p_values[i])))
        adjusted[i] = running
    return adjusted


def empirical_p(observed: float, null: Sequence[float]) -> tuple[float, float]:
    """Where an effect sits among effects of null controls (e.g. random directions): (the share of the null
    below it, the one-sided p-value (1 + #null ≥ observed) / (1 + n), which is never 0 for a finite null)."""
    null = [float(v) for v in null]
    if not null:
        raise ValueError("the null distribution is empty: expected at least one control effect")
    below = sum(v < observed for v in null) / len(null)
    return below, (1 + sum(v >= observed for v in null)) / (1 + len(null))
