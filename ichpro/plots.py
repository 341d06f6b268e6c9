"""Figure helpers shared by the notebooks: CT slices with outlines, calibration, ROC curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

from ichpro.config import BRAIN_WINDOW

MASK_COLOURS = {1: "red", 2: "deepskyblue"}  # parenchymal haematoma, intraventricular blood


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Save a figure as PNG (and close it); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def show_axial(ax: plt.Axes, volume: np.ndarray, z: int, mask: np.ndarray | None = None,
               window: tuple[float, float] = BRAIN_WINDOW, title: str = "") -> None:
    """Draw axial slice ``z`` of a RAS-ordered (x, y, z) volume as a radiology viewer does
    (anterior up, patient's right on the image's left), with mask outlines."""
    ax.imshow(volume[::-1, :, z].T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower")
    if mask is not None:
        for label, colour in MASK_COLOURS.items():
            if (mask[:, :, z] == label).any():
                ax.contour((mask[::-1, :, z] == label).T, levels=[0.5], colors=colour,
                           linewidths=1.0, origin="lower")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def largest_lesion_slice(mask: np.ndarray) -> int:
    """Index of the axial slice with the most parenchymal haematoma (else any blood) voxels."""
    area = (mask == 1).sum(axis=(0, 1))
    if not area.any():
        area = (mask > 0).sum(axis=(0, 1))
    return int(area.argmax()) if area.any() else mask.shape[2] // 2


def binomial_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of a proportion."""
    if n == 0:
        return np.nan, np.nan
    a = (1 - level) / 2
    low = beta.ppf(a, successes, n - successes + 1) if successes > 0 else 0.0
    high = beta.ppf(1 - a, successes + 1, n - successes) if successes < n else 1.0
    return float(low), float(high)


def plot_calibration(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """Observed rates (95 % CI) against the published ICH-score and FUNC tables."""
    panels = list(dict.fromkeys(table["table"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, name in zip(np.atleast_1d(axes), panels):
        part = table[table["table"] == name].reset_index(drop=True)
        x = np.arange(len(part))
        ax.bar(x, part["published"], color="lightgray", label="published")
        ax.fill_between(x, part["published"] - part["tolerance"],
                        part["published"] + part["tolerance"], step="mid", color="gray",
                        alpha=0.2, label="tolerance")
        observed = part.dropna(subset=["observed"])
        ci = [binomial_ci(round(o * n), int(n)) for o, n in zip(observed["observed"], observed["n"])]
        err = np.abs(np.array(ci).T - observed["observed"].to_numpy())
        ax.errorbar(observed.index, observed["observed"], yerr=err, fmt="o", color="C3",
                    label="synthetic (95 % CI)")
        ax.set_xticks(x, [f"{s}\nn={n}" for s, n in zip(part["score"], part["n"])], fontsize=8)
        ax.set_ylim(-0.05, 1.1)
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_roc(labels: np.ndarray, scores: dict[str, np.ndarray], title: str = "") -> plt.Figure:
    """ROC curves of several scores on the same labels, AUC in the legend."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, score in scores.items():
        fpr, tpr, _ = roc_curve(labels, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, score):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="gray")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_table_auc(table: pd.DataFrame, title: str) -> plt.Figure:
    """AUC per row of a results table (:func:`ichpro.experiments.summarize`): ours (mean over the
    training seeds, 95 % interval, range over the seeds) and the oracle ceiling on this cohort in one
    panel, the paper's AUC on its own cohort in another, each axis fitted to its numbers."""
    has_paper = table["paper_auc"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_paper else 1, sharey=True, squeeze=False,
                             figsize=(9.5 if has_paper else 7.5, 0.45 * len(table) + 1.6),
                             gridspec_kw={"width_ratios": [3, 1] if has_paper else [1]})
    ax = axes[0, 0]
    y = np.arange(len(table))[::-1]
    errors = [table["auc"] - table["auc_ci_low"], table["auc_ci_high"] - table["auc"]]
    seeded = (table["n_seeds"] > 1).to_numpy()
    ax.hlines(y[seeded], table["auc_seed_min"][seeded], table["auc_seed_max"][seeded], color="tab:orange",
              lw=7, alpha=0.4, zorder=1, label="range over training seeds")
    ax.errorbar(table["auc"], y, xerr=errors, fmt="o", color="tab:blue", capsize=3,
                label="mean over seeds (95 % CI)")
    ax.scatter(table["ceiling_auc"], y, marker="|", s=200, color="black", zorder=3, label="oracle ceiling")
    shown = pd.concat([table["auc_ci_low"], table["auc_ci_high"], table["ceiling_auc"]]).dropna()
    ax.set_xlim(shown.min() - 0.01, min(1.0, shown.max() + 0.01))
    ax.set_yticks(y, table["row"])
    ax.set_xlabel("ROC AUC on this synthetic cohort (out-of-fold)")
    ax.grid(axis="x", lw=0.4, alpha=0.5)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / len(table)), ncol=3, fontsize=8,
              frameon=False)
    if has_paper:
        right = axes[0, 1]
        right.scatter(table["paper_auc"], y, marker="x", color="tab:red", zorder=3)
        reported = table["paper_auc"].dropna()
        right.set_xlim(reported.min() - 0.02, min(1.0, reported.max() + 0.02))
        right.set_xlabel("paper's AUC\n(its own cohort)")
        right.grid(axis="x", lw=0.4, alpha=0.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_pipelines(pipelines: dict[str, list[list[str]]], title: str = "") -> plt.Figure:
    """A block diagram per system, one row each: columns of boxes (inputs, stages, outputs) joined by
    arrows: box to box between columns of the same length (parallel streams), else every box of a
    column to every box of the next."""
    n_columns = max(len(columns) for columns in pipelines.values())
    heights = [max(len(column) for column in columns) for columns in pipelines.values()]
    size = (2.3 * n_columns + 1.2, sum(0.5 * h + 0.5 for h in heights))
    fig, axes = plt.subplots(len(pipelines), 1, figsize=size,
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (name, columns), height in zip(axes[:, 0], pipelines.items(), heights):
        ax.set(xlim=(-0.5, n_columns - 0.5), ylim=(-0.5, height - 0.5))
        ax.axis("off")
        ax.set_title(name, loc="left", fontsize=9, fontweight="bold")
        centres = []
        for x, column in enumerate(columns):
            ys = (np.linspace(0, height - 1, len(column) + 2)[1:-1] if len(column) < height
                  else np.arange(height))
            centres.append([(x, y) for y in ys[::-1]])
            for (cx, cy), label in zip(centres[-1], column):
                colour = "#dbe9f6" if x == 0 else "#fde0c5" if x == len(columns) - 1 else "#e5e5e5"
                ax.text(cx, cy, label, ha="center", va="center", fontsize=7.5, wrap=True,
                        bbox={"boxstyle": "round,pad=0.3", "facecolor": colour, "edgecolor": "grey"})
        for left, right in zip(centres, centres[1:]):
            pairs = zip(left, right) if len(left) == len(right) else [(a, b) for a in left for b in right]
            for start, end in pairs:
                ax.annotate("", xy=(end[0] - 0.42, end[1]), xytext=(start[0] + 0.42, start[1]),
                            arrowprops={"arrowstyle": "->", "color": "grey", "lw": 0.8})
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
