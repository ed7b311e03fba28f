"""Figures (matplotlib): each function returns a Figure and, given ``path``, writes it as PNG atomically."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files, not windows; notebooks display the returned Figure themselves

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from steerkit._io import atomic_path  # noqa: E402


def _save(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return fig


def task_vector_layers(stats: dict, title: str = "task vector by layer", path=None) -> Figure:
    """Delta norm and relative norm (‖Δ‖/‖θ_B‖) per layer, from ``TaskVector.stats()``."""
    layers = sorted(k for k in stats["layers"] if k is not None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.bar(layers, [stats["layers"][k]["norm"] for k in layers], color="tab:blue")
    ax1.set(xlabel="layer", ylabel="‖Δ‖", title="delta norm")
    ax2.plot(layers, [stats["layers"][k]["relative"] for k in layers], "o-", color="tab:orange")
    ax2.set(xlabel="layer", ylabel="‖Δ‖ / ‖θ_B‖", title="relative change")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def separation(vector, title: str | None = None, path=None) -> Figure:
    """Held-out AUROC and direction norm per layer of an extracted SteeringVector."""
    layers = vector.layers
    fig, ax1 = plt.subplots(figsize=(6, 3.2))
    ax1.plot(layers, [vector.separation.get(k, float("nan")) for k in layers], "o-", label="held-out AUROC")
    ax1.set(xlabel="layer", ylabel="AUROC", ylim=(0.4, 1.02))
    ax2 = ax1.twinx()
    ax2.plot(layers, [float(vector[k].norm()) for k in layers], "s--", color="tab:gray", label="norm")
    ax2.set_ylabel("‖v‖")
    ax1.set_title(title or f"{vector.metadata.get('method', 'vector')}: separation by layer")
    fig.tight_layout()
    return _save(fig, path)
