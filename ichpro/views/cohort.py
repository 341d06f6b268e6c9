"""The synthetic cohort as notebook 01 shows it: distributions of its latent variables
(``truth.csv``, :mod:`ichpro.cohort`) and the AUC of its oracle probabilities and clinical scores."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_auc_score

from ichpro.experiments import CEILINGS

#: how the figures name the two outcome classes of ``label``
OUTCOMES = {0: "good (GOS 4-5)", 1: "bad (GOS 1-3)"}
#: how the figures name each oracle probability (:data:`ichpro.experiments.CEILINGS`), by its column
ORACLES = {CEILINGS["all"]: "all variables", CEILINGS["image"]: "image only",
           CEILINGS["report"]: "report only", CEILINGS["report_no_stay"]: "report without stay"}


def plot_distributions(truth: pd.DataFrame) -> plt.Figure:
    """Six panels of a cohort's ``truth.csv``: age, GCS, ICH score and GOS by outcome (one legend above
    them all), haematoma volume by location, and the hospital stay by GOS (the stay leaks the outcome
    into the report)."""
    data = truth.assign(outcome=truth["label"].map(OUTCOMES))
    by_outcome = {"hue": "outcome", "hue_order": list(OUTCOMES.values())}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    sns.histplot(data, x="age", multiple="stack", bins=20, ax=axes[0, 0], **by_outcome)
    sns.countplot(data, x="gcs", ax=axes[0, 1], **by_outcome)
    sns.boxplot(data, x="location", y="volume_ml", ax=axes[0, 2], log_scale=True)
    sns.countplot(data, x="gos", dodge=False, ax=axes[1, 0], **by_outcome)
    sns.countplot(data, x="ich_score", ax=axes[1, 1], **by_outcome)
    sns.boxplot(data, x="gos", y="hospital_stay_days", ax=axes[1, 2], dodge=False, **by_outcome)
    labels = [("age (years)", "patients"), ("admission GCS", "patients"),
              ("haematoma location", "haematoma volume (mL, log scale)"), ("90-day GOS", "patients"),
              ("ICH score", "patients"), ("90-day GOS", "hospital stay (days)")]
    for ax, (xlabel, ylabel) in zip(axes.flat, labels):
        ax.set(xlabel=xlabel, ylabel=ylabel)
        if ylabel == "patients":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1, 2].set_title("hospital stay depends on the outcome", fontsize=9)
    legend = axes[0, 0].get_legend()
    handles, names = legend.legend_handles, [text.get_text() for text in legend.get_texts()]
    for ax in axes.flat:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legend(handles, names, title="90-day outcome", loc="lower center", ncol=2, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return fig


def oracle_auc_table(cohorts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """ROC AUC of each oracle probability (:data:`ORACLES`) and of the two clinical scores in each
    cohort's ``truth.csv`` table: one row per (cohort, oracle). The FUNC score is negated (a higher
    FUNC score predicts a good outcome)."""
    rows = []
    for cohort, truth in cohorts.items():
        scores = {name: truth[column] for column, name in ORACLES.items()}
        scores |= {"ICH score": truth["ich_score"], "FUNC score (negated)": -truth["func_score"]}
        rows += [{"cohort": cohort, "oracle": name, "auc": roc_auc_score(truth["label"], score)}
                 for name, score in scores.items()]
    return pd.DataFrame(rows)
