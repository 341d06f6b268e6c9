"""Training runs as notebooks 06 and 09 show them: learning curves with each fold's kept epoch, loss
terms relative to their first epoch, and each fold's recalibration (``metrics.csv`` and the fold
folders of a run, :mod:`ichpro.train`)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix

from ichpro.calibration import PlattScaling
from ichpro.errors import IchproError
from ichpro.files import read_json
from ichpro.metrics import calibration_curve_table, classification_metrics
from ichpro.train import CALIBRATION_FILE, STATE_FILE

#: how the figures name the loss terms (:data:`ichpro.config.LOSS_TERMS`) and the run's total
LOSS_NAMES = {"ce": "CE", "imima": "IMIMA", "sdm": "SDM", "mlm": "MLM", "blend": "blend", "cmpm": "CMPM",
              "cmfa": "CMFA", "numbers": "age and GCS", "total": "total (weighted sum)"}
_VALIDATION = {"val_auc": "inner-validation AUC", "val_loss": "inner-validation loss (cross-entropy)"}
KEPT = "kept epoch (best inner-validation AUC)"


def term_name(column: str) -> str:
    """The name of the loss term of a ``train_*`` column: ``train_sdm`` -> "SDM"."""
    term = column.removeprefix("train_")
    return LOSS_NAMES.get(term, term.upper())


def column_label(column: str) -> str:
    """The human name of a ``metrics.csv`` column: ``train_sdm`` -> "training loss: SDM"."""
    if column.startswith("train_"):
        return f"training loss: {term_name(column)}"
    if column not in _VALIDATION:
        raise IchproError(f"{column!r} is not a loss or validation column of metrics.csv")
    return _VALIDATION[column]


def loss_columns(history: pd.DataFrame) -> list[str]:
    """The training loss terms of a ``metrics.csv`` (``train_*``, without their weighted total)."""
    return [c for c in history.columns if c.startswith("train_") and c != "train_total"]


def kept_epochs(run_dir: Path) -> pd.Series:
    """The epoch each fold kept: the one its ``state.json`` names as ``best-<epoch>.safetensors``
    (index: fold; NaN for a fold that never improved)."""
    states = sorted(Path(run_dir).glob(f"fold*/{STATE_FILE}"))
    if not states:
        raise IchproError(f"{run_dir} holds no fold{{k}}/{STATE_FILE}: it is not a trained run folder")
    kept = {}
    for path in states:
        best = read_json(path, "the fold's training state")["files"].get("best") or ""
        found = re.fullmatch(r"best-(\d+)\.safetensors", best)
        kept[int(path.parent.name.removeprefix("fold"))] = int(found.group(1)) if found else np.nan
    return pd.Series(kept, name="kept epoch").rename_axis("fold").sort_index()


def plot_training_curves(history: pd.DataFrame, kept: pd.Series, title: str = "") -> plt.Figure:
    """Every fold's training loss terms, inner-validation loss and AUC per epoch, a star on the epoch
    each fold kept (:func:`kept_epochs`)."""
    columns = [*loss_columns(history), "val_loss", "val_auc"]
    n_cols = min(3, len(columns))
    n_rows = -(-len(columns) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.0 * n_rows + 0.6), squeeze=False)
    folds = sorted(history["fold"].unique())
    for ax, column in zip(axes.flat, columns):
        for k, fold in enumerate(folds):
            h = history[history["fold"] == fold].sort_values("epoch")
            ax.plot(h["epoch"], h[column], color=f"C{k}", lw=1.3)
            at = h[h["epoch"] == kept.get(fold)]
            ax.scatter(at["epoch"], at[column], color=f"C{k}", marker="*", s=110, edgecolor="black", zorder=3)
        ax.set(xlabel="epoch", ylabel=column_label(column))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(columns):]:
        ax.axis("off")
    handles = [Line2D([], [], color=f"C{k}", label=f"fold {fold}") for k, fold in enumerate(folds)]
    handles.append(Line2D([], [], color="gray", marker="*", ms=11, mec="black", ls="", label=KEPT))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def relative_losses(history: pd.DataFrame) -> pd.DataFrame:
    """Each training loss term divided by its epoch-1 value in the same fold, averaged over the folds,
    on the epochs every fold ran (index: epoch; columns: the ``train_*`` terms)."""
    terms = loss_columns(history)
    h = history.sort_values(["fold", "epoch"])
    relative = h[terms] / h.groupby("fold")[terms].transform("first")
    folds_per_epoch = h.groupby("epoch")["fold"].nunique()
    shared = folds_per_epoch.index[folds_per_epoch == h["fold"].nunique()]
    return relative[h["epoch"].isin(shared)].groupby(h["epoch"]).mean()


def plot_relative_losses(histories: dict[str, pd.DataFrame]) -> plt.Figure:
    """One panel per run: :func:`relative_losses` of each term (1 = its first-epoch value), each term
    in one colour across the panels."""
    fig, axes = plt.subplots(1, len(histories), figsize=(4.3 * len(histories), 3.6), sharey=True,
                             squeeze=False)
    curves_by_run = {name: relative_losses(history) for name, history in histories.items()}
    terms = list(dict.fromkeys(term for curves in curves_by_run.values() for term in curves))
    colours = {term: f"C{i % 10}" for i, term in enumerate(terms)}
    for ax, (name, history) in zip(axes[0], histories.items()):
        curves = curves_by_run[name]
        for term in curves:
            ax.plot(curves.index, curves[term], marker="o", ms=3, color=colours[term], label=term_name(term))
        ax.axhline(1, color="gray", lw=0.8, ls=":")
        n_folds = history["fold"].nunique()
        ax.set(title=name, xlabel=f"epoch (mean over {n_folds} folds; epochs every fold ran)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, title="training loss", title_fontsize=8)
    axes[0, 0].set_ylabel("training loss / its epoch-1 value")
    fig.tight_layout()
    return fig


def describe_loss_changes(name: str, history: pd.DataFrame) -> str:
    """One sentence: in how many folds each loss term fell from its first to its last epoch."""
    said = []
    for term in loss_columns(history):
        ends = history.sort_values("epoch").groupby("fold")[term].agg(["first", "last"])
        change = (ends["last"] / ends["first"] - 1).median()
        said.append(f"{term_name(term)} fell in {(ends['last'] < ends['first']).sum()} "
                    f"of {len(ends)} folds (median change {change:+.1%})")
    return f"{name}, each fold's first to last epoch: " + "; ".join(said) + "."


def recalibration_table(run_dir: Path, oof: pd.DataFrame) -> pd.DataFrame:
    """Each fold's Platt scaling (``calibration.json``) and its test patients' mean P(bad) before
    and after it (index: fold)."""
    means = oof.groupby("fold")[["p_bad_uncalibrated", "p_bad"]].mean()
    scalings = [vars(PlattScaling.load(Path(run_dir) / f"fold{k}" / CALIBRATION_FILE)) for k in means.index]
    return pd.DataFrame(scalings, index=means.index).assign(**{
        "mean P(bad) before": means["p_bad_uncalibrated"], "after": means["p_bad"]})


def describe_recalibration(oof: pd.DataFrame) -> str:
    """The pooled AUC of the fold models' own probabilities and of the recalibrated ones."""
    before, after = (classification_metrics(oof["label"], oof[c])["auc"]
                     for c in ("p_bad_uncalibrated", "p_bad"))
    return (f"pooled AUC {before:.3f} with the fold models' own probabilities, {after:.3f} recalibrated "
            f"(share of bad outcomes {oof['label'].mean():.2f})")


def plot_calibration_confusion(oof: pd.DataFrame, threshold: float = 0.5) -> plt.Figure:
    """Reliability of P(bad) (recalibrated, and the fold models' own where the run has them; marker
    area grows with the patients in a bin) and the confusion matrix at ``threshold``."""
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.8))
    axes[0].plot([0, 1], [0, 1], ls=":", color="gray")
    kinds = {"p_bad": ("recalibrated", "C3", 1.0), "p_bad_uncalibrated": ("fold models' own", "C0", 0.5)}
    for column, (label, colour, alpha) in kinds.items():
        if column in oof:
            curve = calibration_curve_table(oof["label"], oof[column]).dropna()
            axes[0].scatter(curve["mean_predicted"], curve["observed_rate"], s=10 + curve["n"], color=colour,
                            alpha=alpha, label=label)
    axes[0].legend(fontsize=8, title="P(bad)", title_fontsize=8)
    axes[0].set(xlabel="predicted P(bad)", ylabel="observed share with a bad outcome", title="calibration")
    matrix = confusion_matrix(oof["label"], (oof["p_bad"] > threshold).astype(int), labels=[0, 1])
    sns.heatmap(matrix, annot=True, fmt="d", cmap="Blues", cbar=False, ax=axes[1],
                xticklabels=["good", "bad"], yticklabels=["good", "bad"])
    axes[1].set(xlabel=f"predicted outcome (P(bad) > {threshold:g})", ylabel="true outcome",
                title="confusion matrix")
    fig.tight_layout()
    return fig
