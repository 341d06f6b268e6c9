"""Notebook 12 (judged as a clinical prediction model): the figures and the readings of calibration,
decision curves, subgroups and sample size, each reading computed from the tables it sits beside."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ichpro.decision_curve import TABULATED, TREAT_ALL, TREAT_NONE, useful_models
from ichpro.heatmaps import DEFAULT_HEATMAP
from ichpro.tripod import AFTER, BEFORE, FITTED, JUDGED

#: the clinical baselines among the judged models (fitted logistic maps, no network)
FITTED_MODELS = JUDGED["table4_comparison"]

_LINE = {AFTER: "-", FITTED: "-", BEFORE: "--"}


def _includes(low: float, high: float, value: float) -> bool:
    return low <= value <= high


def plot_calibration_curves(curves: pd.DataFrame, summary: pd.DataFrame) -> plt.Figure:
    """One panel per model: the smoothed calibration curve before (dashed) and after Platt scaling
    (or the fitted map of a clinical baseline) with its 95 % band, the diagonal, and the slope."""
    models = list(dict.fromkeys(curves["model"]))
    cols = 4
    fig, axes = plt.subplots(int(np.ceil(len(models) / cols)), cols, figsize=(3.2 * cols, 3.2 * np.ceil(
        len(models) / cols)), sharex=True, sharey=True, squeeze=False)
    for ax, model in zip(axes.flat, models):
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8)
        notes = []
        for recalibration, c in curves[curves["model"] == model].groupby("recalibration", sort=False):
            colour = {BEFORE: "0.45", AFTER: "C0", FITTED: "C1"}[recalibration]
            ax.plot(c["predicted"], c["observed"], _LINE[recalibration], color=colour, label=recalibration)
            ax.fill_between(c["predicted"], c["ci_low"], c["ci_high"], color=colour, alpha=0.15, lw=0)
            s = summary[(summary["model"] == model) & (summary["recalibration"] == recalibration)].iloc[0]
            notes.append(f"slope {s['slope']:.2f} ({recalibration})")
        ax.set_title(model, fontsize=8)
        ax.text(0.03, 0.97, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("predicted P(bad)")
    for ax in axes[:, 0]:
        ax.set_ylabel("observed rate (smoothed)")
    handles, labels = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Calibration: out-of-fold predictions over the seeds (95 % bands from patient resamples)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    return fig


def plot_decision_curves(curves: pd.DataFrame, models: list[str]) -> plt.Figure:
    """Net benefit against the threshold for ``models`` (the clinical baselines dash-dotted), treat all
    and treat none."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, model in enumerate([*models, TREAT_ALL, TREAT_NONE]):
        c = curves[curves["model"] == model]
        style = ({"color": "black", "ls": "--"} if model == TREAT_ALL else {"color": "black", "ls": ":"}
                 if model == TREAT_NONE else {"color": f"C{i}", "ls": "-." if model in FITTED_MODELS
                                              else "-"})
        ax.plot(c["threshold"], c["net_benefit"], label=model, lw=1.4, **style)
    top = curves[curves["model"].isin(models)]["net_benefit"].max()
    ax.set_ylim(-0.05, top + 0.03)
    ax.set_xlabel("threshold P(bad) at which one acts")
    ax.set_ylabel("net benefit")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Decision curves (mean over the seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_subgroups(table: pd.DataFrame, models: list[str]) -> plt.Figure:
    """Forest plot of the AUC (95 % CI) per subgroup, one column per model, with the patients."""
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 5.2), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        t = table[table["model"] == model].reset_index(drop=True)
        y = np.arange(len(t))[::-1]
        worse = (t["auc_gap_clear"] & (t["auc_gap"] < 0)).to_numpy()
        ax.errorbar(t["auc"], y, xerr=[t["auc"] - t["auc_ci_low"], t["auc_ci_high"] - t["auc"]], fmt="none",
                    ecolor="0.5", lw=1)
        ax.scatter(t["auc"], y, c=np.where(worse, "C3", "C0"), zorder=3, s=18)
        ax.set_title(model, fontsize=8)
        ax.set_xlabel("AUC")
        ax.set_xlim(0.4, 1.0)
    labels = [f"{r.grouping}: {r.group} (n={r.n})" for r in table[table["model"] == models[0]].itertuples()]
    axes[0, 0].set_yticks(np.arange(len(labels))[::-1], labels, fontsize=7)
    fig.suptitle("AUC per subgroup (red: below the other patients, the gap's 95 % interval excluding 0)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def describe_calibration(summary: pd.DataFrame) -> list[str]:
    """One sentence per model: its final calibration slope and CITL with intervals, whether they
    hold 1 and 0, and the slope before Platt scaling where there was one."""
    said = []
    for model, s in summary.groupby("model", sort=False):
        final = s[s["recalibration"] != BEFORE].iloc[0]
        ok_slope = _includes(final["slope_ci_low"], final["slope_ci_high"], 1.0)
        ok_citl = _includes(final["citl_ci_low"], final["citl_ci_high"], 0.0)
        line = (f"{model}: slope {final['slope']:.2f} "
                f"({final['slope_ci_low']:.2f} to {final['slope_ci_high']:.2f}), "
                f"calibration-in-the-large {final['citl']:+.2f} ({final['citl_ci_low']:+.2f} to "
                f"{final['citl_ci_high']:+.2f}), scaled Brier {final['scaled_brier']:.2f}: "
                + ("slope and mean risk consistent with good calibration" if ok_slope and ok_citl else
                   ", ".join(part for part, bad in (("predictions too extreme (slope below 1)",
                                                     final["slope_ci_high"] < 1),
                                                    ("predictions too moderate (slope above 1)",
                                                     final["slope_ci_low"] > 1),
                                                    ("mean risk off", not ok_citl)) if bad)))
        before = s[s["recalibration"] == BEFORE]
        if len(before):
            b = before.iloc[0]
            line += (f"; before Platt scaling the slope was {b['slope']:.2f} ({b['slope_ci_low']:.2f} to "
                     f"{b['slope_ci_high']:.2f})")
        said.append(line + ".")
    return said


def describe_decisions(curves: pd.DataFrame, thresholds=TABULATED) -> list[str]:
    """At each tabulated threshold: the models above the better default (treat all or treat none)
    with a paired interval above 0, and the model with the highest net benefit."""
    said = []
    for t in thresholds:
        at = curves[np.isclose(curves["threshold"], t)].set_index("model")
        models = at.drop([TREAT_ALL, TREAT_NONE])
        best = models["net_benefit"].idxmax()
        useful = useful_models(curves, t)
        others = [m for m in models.index if m not in useful]
        said.append(f"At {t:.0%}: treat all {at.at[TREAT_ALL, 'net_benefit']:+.3f}; {len(useful)} of "
                    f"{len(models)} models clearly above the better default"
                    + (f" (not: {', '.join(others)})" if useful and others else "")
                    + f"; highest: {best} ({models.at[best, 'net_benefit']:+.3f}, "
                    f"{models.at[best, 'advantage']:+.3f} over the better default).")
    return said


def describe_subgroups(table: pd.DataFrame) -> list[str]:
    """Per model, the subgroups where it discriminates worse than in the other patients (the AUC
    gap's interval below 0), and those whose calibration slope's interval excludes 1."""
    said = []
    for model, t in table.groupby("model", sort=False):
        worse = [f"{r.grouping}: {r.group} (AUC {r.auc:.3f}, {-r.auc_gap:.3f} below the rest)"
                 for r in t.itertuples() if r.auc_gap_clear and r.auc_gap < 0]
        slope = [f"{r.grouping}: {r.group} ({r.slope:.2f}, {r.slope_ci_low:.2f}-{r.slope_ci_high:.2f})"
                 for r in t.itertuples() if not r.slope_ci_low <= 1 <= r.slope_ci_high]
        said.append(f"{model}: discriminates worse in {'; '.join(worse) or 'no subgroup'}. "
                    f"Calibration slope excludes 1 in {'; '.join(slope) or 'no subgroup'}.")
    return said


_CRITERIA = {"n_overall_risk": "overall risk", "n_mape": "prediction error", "n_shrinkage": "shrinkage",
             "n_optimism": "optimism"}


def describe_sample_size(table: pd.DataFrame) -> list[str]:
    """For each parameter count and anticipated C (:func:`ichpro.tripod.sample_size_table`): the
    minimum n, the criterion that sets it, and which criteria a training fold meets."""
    said = []
    for r in table.to_dict("records"):
        binding = max(_CRITERIA, key=lambda k: r[k])
        met = [f"{name} ({r[k]:,})" for k, name in _CRITERIA.items() if r[k] <= r["development"]]
        verdict = ("met by each training fold" if r["development"] >= r["n_minimum"] else
                   "met by the whole cohort only" if r["patients"] >= r["n_minimum"] else "not met")
        said.append(f"{r['counted']} ({r['parameters']:,} parameters), C {r['c']:.3f} from "
                    f"{r['c_from']} (Cox-Snell R² {r['r2_cox_snell']:.3f}): at least {r['n_minimum']:,} "
                    f"patients, set by the {_CRITERIA[binding]} criterion: {verdict} ({r['development']} per "
                    f"training fold, {r['patients']} in all); a training fold meets "
                    + (", ".join(met) if met else "none of the four") + ".")
    return said


def best_localising_map(localisation: pd.DataFrame) -> str:
    """The map of a localisation summary (notebook 11) with the largest mass ratio to a uniform map
    among those whose pointing rate's lower bound is above chance."""
    s = localisation.set_index("method") if "method" in localisation else localisation
    pointing = s[s["pointing_ci_low"] > s["pointing_chance"]]
    return str(pointing["ratio"].idxmax())


def describe_default_heatmap(path: Path) -> str:
    """The default heat map beside the best localising map of notebook 11's summary at ``path``."""
    if not Path(path).is_file():
        return (f"default heat map: {DEFAULT_HEATMAP}; "
                "notebook 11's localisation table is not in this figures folder")
    s = pd.read_csv(path).set_index("method")
    best = best_localising_map(s)
    return (f"default heat map: {DEFAULT_HEATMAP}; notebook 11's best localising map: {best} "
            f"({s.at[best, 'ratio']:.2f} times a uniform map's mass on the haematoma, pointing at it in "
            f"{s.at[best, 'pointing_hit_rate']:.0%} of patients, chance {s.at[best, 'pointing_chance']:.0%})")
