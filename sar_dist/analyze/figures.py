"""The report's PNG figures, drawn with matplotlib's Agg backend (no display) into bytes."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _png(fig: Any) -> bytes:
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _by_layer(report: dict[str, Any], key: str, title: str, ylabel: str, *, log: bool) -> bytes:
    layers = report["per_layer"]
    labels = report["inputs"]["labels"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if not layers:
        _empty(ax, "no tensors with a layer index")
    else:
        xs = [entry["layer"] for entry in layers]
        positive = True
        for i, label in enumerate(labels):
            ys = [entry["models"][i][key] for entry in layers]
            vals = [np.nan if y is None else y for y in ys]
            positive &= all(v > 0 for v in vals if not np.isnan(v))
            ax.plot(xs, vals, marker="o", markersize=3, label=label)
        if log and positive:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    ax.set_title(title)
    return _png(fig)


def _matrix(values: np.ndarray, labels: list[str], title: str, *, vmin: float | None, vmax: float | None,
            cmap: str, ax: Any, fmt: str = "{:.3g}", notes: np.ndarray | None = None) -> None:
    im = ax.imshow(np.ma.masked_invalid(values), vmin=vmin, vmax=vmax, cmap=cmap)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(title)
    if len(labels) <= 12:
        for r in range(len(labels)):
            for c in range(len(labels)):
                v = values[r, c]
                if r == c and np.isnan(v):
                    continue
                text = "n/a" if np.isnan(v) else fmt.format(v)
                if notes is not None and not np.isnan(notes[r, c]):
                    text += f"\n(chance {notes[r, c]:.3g})"
                ax.text(c, r, text, ha="center", va="center", fontsize=7,
                        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.7, "linewidth": 0})


def _pair_matrix(report: dict[str, Any], key: str, diag: float) -> np.ndarray:
    k = len(report["inputs"]["labels"])
    out = np.full((k, k), np.nan)
    for i in range(k):
        out[i, i] = diag
    for p in report["overall"]["pairs"]:
        v = p[key]
        out[p["a"], p["b"]] = out[p["b"], p["a"]] = np.nan if v is None else v
    return out


def render_figures(report: dict[str, Any]) -> dict[str, bytes]:
    """The four figures as PNG bytes, keyed by file name."""
    labels = report["inputs"]["labels"]
    figs = {
        "sparsity_by_layer.png": _by_layer(report, "density", "Update density by layer (1 - sparsity)",
                                           "fraction of entries updated", log=True),
        "off_principal_by_layer.png": _by_layer(
            report, "off_principal_share",
            f"Update energy outside the base's top {100 * report['settings']['rank_fraction']:g}% principal block",
            "off-principal share of ||t||^2", log=False),
    }

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    jac = _pair_matrix(report, "jaccard", np.nan)  # the diagonal (1) is left blank: it would swamp the scale
    chance = _pair_matrix(report, "jaccard_chance", np.nan)
    _matrix(jac, labels, "Jaccard of update masks (chance in brackets)", vmin=0.0, vmax=None, cmap="viridis",
            ax=axes[0], notes=chance)
    ratio = _pair_matrix(report, "intersection_vs_chance", np.nan)
    finite = ratio[np.isfinite(ratio)]
    top = max(2.0, float(finite.max())) if finite.size else 2.0
    _matrix(ratio, labels, "Overlap / overlap expected by chance", vmin=0.0, vmax=top, cmap="magma", ax=axes[1],
            fmt="{:.2f}x")
    figs["overlap_matrix.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    _matrix(_pair_matrix(report, "cosine", 1.0), labels, "Cosine similarity of task vectors", vmin=-1.0, vmax=1.0,
            cmap="coolwarm", ax=ax)
    figs["cosine_matrix.png"] = _png(fig)
    return figs
