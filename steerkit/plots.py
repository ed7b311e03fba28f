"""Figures (matplotlib): each function returns a Figure and, given ``path``, writes it as PNG atomically.

No backend is forced: in Jupyter the figures show inline, on a machine without a display matplotlib falls
back to Agg, and the command line (which only writes files) chooses Agg itself.
"""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from steerkit._io import atomic_path


def save_figure(fig: Figure, path: str | os.PathLike | None, force: bool = False) -> Figure:
    """Write ``fig`` as a PNG to ``path`` atomically (nothing when ``path`` is None); returns ``fig``.

    An existing file is replaced only with ``force=True``."""
    if path is not None:
        with atomic_path(path, force=force) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return fig


def close(fig: Figure) -> None:
    """Free a figure that was only written to a file (pyplot keeps every open figure alive)."""
    plt.close(fig)


def task_vector_layers(stats: dict, title: str = "task vector by layer", path=None, force: bool = False) -> Figure:
    """Delta norm and relative norm (‖Δ‖/‖θ_B‖) per layer, from ``TaskVector.stats()``."""
    layers = sorted(k for k in stats["layers"] if k is not None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.bar(layers, [stats["layers"][k]["norm"] for k in layers], color="tab:blue")
    ax1.set(xlabel="layer", ylabel="‖Δ‖", title="delta norm")
    ax2.plot(layers, [stats["layers"][k]["relative"] for k in layers], "o-", color="tab:orange")
    ax2.set(xlabel="layer", ylabel="‖Δ‖ / ‖θ_B‖", title="relative change")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, force)


def separation(vector, title: str | None = None, path=None, force: bool = False) -> Figure:
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
    return save_figure(fig, path, force)


def sweep_metrics(
    rows: list[dict], metrics=("kl", "entropy", "accuracy"), title: str = "", path=None, force: bool = False
) -> Figure:
    """One panel per metric: the metric against α, one line per layer (rows from ``steerkit.sweep``)."""
    metrics = [m for m in metrics if m in rows[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for layer in layers:
            sub = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["alpha"])
            ax.plot([r["alpha"] for r in sub], [r[metric] for r in sub], "o-", label=f"layer {layer}")
        ax.set(xlabel="α", ylabel=metric, title=metric)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, force)


def pca_scatter(
    positive, negative, layer: int | None = None, labels=("positive", "negative"), path=None, force: bool = False
) -> Figure:
    """Positive and negative activations ``[n, d]`` projected on the first two principal components of both."""
    import torch

    both = torch.cat([positive, negative]).double()
    centred = both - both.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ vh[:2].T).float()
    n = len(positive)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter(xy[:n, 0], xy[:n, 1], s=14, label=labels[0], color="tab:green")
    ax.scatter(xy[n:, 0], xy[n:, 1], s=14, label=labels[1], color="tab:red")
    ax.set(xlabel="PC 1", ylabel="PC 2", title="activations" + (f" at layer {layer}" if layer is not None else ""))
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, force)


def length_accuracy(
    points: list[dict], title: str = "concise vector: length vs accuracy", path=None, force: bool = False
) -> Figure:
    """Mean completion length against accuracy, one point per setting (``{"label", "length", "accuracy"}``)."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for p in points:
        ax.scatter(p["length"], p["accuracy"], s=30)
        ax.annotate(p["label"], (p["length"], p["accuracy"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set(xlabel="mean completion length (tokens)", ylabel="accuracy", title=title)
    fig.tight_layout()
    return save_figure(fig, path, force)


def sae_training(log: list[dict], title: str = "SAE training", path=None, force: bool = False) -> Figure:
    """Explained variance, L0 and dead fraction against training tokens (``sae.training_log``)."""
    tokens = [row["tokens"] for row in log]
    panels = (("explained_variance", "explained variance"), ("l0", "L0"), ("dead_fraction", "dead fraction"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.plot(tokens, [row[key] for row in log], "-", color="tab:blue")
        ax.set(xlabel="training tokens", ylabel=label, title=label)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, force)


def latent_frequency(frequency, title: str = "latent firing frequency", path=None, force: bool = False) -> Figure:
    """Histogram of log10 firing frequency per latent; dead latents (never fired) are counted at the left."""
    import torch

    freq = torch.as_tensor(frequency).double()
    dead = int((freq == 0).sum())
    logs = freq[freq > 0].log10().tolist()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(logs, bins=50, color="tab:blue")
    ax.axvline(-1, color="tab:red", linestyle="--", label="dense (10% of tokens)")
    ax.set(xlabel="log10 firing frequency", ylabel="latents", title=f"{title} ({dead} dead of {len(freq)})")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, force)
