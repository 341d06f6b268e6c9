"""What notebooks 07-09 show around their result tables: the rows' status and losses, readings of the
table printed from its numbers, late fusion over seeds, the Hospital Stay field and the text probe."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ichpro.config import Profile
from ichpro.errors import IchproError
from ichpro.experiments import Row, fold_aucs, paired_auc, row_costs, row_folder, run_rows, summed_logits
from ichpro.metrics import classification_metrics
from ichpro.train import OOF_FILE

#: the row of Table 1 that sums the text-only and the vision-only models' logits
SUMMED = "Text + vision logits summed"
#: the outcome groups of the Hospital Stay figure, in order (GOS 1 here: died after day 30)
OUTCOME_ORDER = ("died by day 30", *(f"GOS {g}" for g in range(1, 6)))


def loss_label(terms: Iterable[tuple[str, float]]) -> str:
    """A loss as the tables write it: ``(("ce", 1), ("sdm", 0.5))`` -> "CE + 0.5·SDM"."""
    return " + ".join(t.upper() if w == 1 else f"{w:g}·{t.upper()}" for t, w in terms)


def finished_rows(rows: list[Row], profile: Profile, out: Path, seed: int) -> set[str]:
    """The rows whose run with ``seed`` has finished (its out-of-fold predictions exist)."""
    return {r.name for r in rows if (row_folder(out, profile, r, seed) / OOF_FILE).is_file()}


def row_status(rows: list[Row], profile: Profile, out: Path, seed: int, finished: set[str]) -> pd.DataFrame:
    """Per row: trained in this run or loaded (``finished`` before it), trainable parameters,
    training time per fold (:func:`ichpro.experiments.row_costs`) and run folder."""
    costs = row_costs(rows, profile, out, seed).set_index("row")
    return pd.DataFrame({
        "this run": {r.name: "loaded" if r.name in finished else "trained" for r in rows},
        "trainable parameters": costs["params"],
        "training time per fold (s)": costs["seconds_per_fold"].round(1),
        "run folder": {r.name: row_folder(out, profile, r, seed).name for r in rows}}).rename_axis("row")


def auc_versus_ceiling(table: pd.DataFrame) -> pd.DataFrame:
    """The AUC columns of a results table and each row's gap to its oracle ceiling (index: row)."""
    auc = table.set_index("row")[["paper_auc", "auc", "auc_ci_low", "auc_ci_high", "delong_p", "ceiling_auc"]]
    return auc.assign(gap=auc["ceiling_auc"] - auc["auc"])


def describe_spread(table: pd.DataFrame) -> str:
    """How far apart the rows' AUCs are against the width of their 95 % CIs."""
    t = table.set_index("row")
    width = t["auc_ci_high"] - t["auc_ci_low"]
    pairs = list(combinations(t.index, 2))
    overlap = sum(max(t.at[a, "auc_ci_low"], t.at[b, "auc_ci_low"]) <= min(t.at[a, "auc_ci_high"],
                                                                          t.at[b, "auc_ci_high"])
                  for a, b in pairs)
    return (f"The {len(t)} rows' AUCs span {t['auc'].min():.3f}-{t['auc'].max():.3f} "
            f"({t['auc'].max() - t['auc'].min():.3f}); their 95 % CIs are {width.min():.3f} to "
            f"{width.max():.3f} wide, and {overlap} of {len(pairs)} pairs of rows have overlapping CIs.")


def describe_ceilings(table: pd.DataFrame, fused: str, image: str, report: str) -> str:
    """The oracle ceilings of a fused, an image-only and a report-only row, and how far the fused
    ceiling lies above the better single-modality one."""
    ceiling = table.set_index("row")["ceiling_auc"]
    return (f"Oracle ceilings on these patients: all variables ({fused}) {ceiling[fused]:.3f}, image-visible "
            f"({image}) {ceiling[image]:.3f}, report-visible ({report}) {ceiling[report]:.3f}; the "
            f"all-variable ceiling is {ceiling[fused] - max(ceiling[image], ceiling[report]):+.3f} above the "
            "better single-modality ceiling.")


def late_fusion_runs(single: tuple[Row, Row], fused: Row, profile: Profile, manifest: pd.DataFrame, out: Path,
                     seeds: Iterable[int], **run_options) -> dict[int, dict[str, pd.DataFrame]]:
    """For each seed, the out-of-fold predictions of two single-modality rows, of the fused row
    and of the single rows' summed logits (:data:`SUMMED`; :func:`ichpro.experiments.summed_logits`),
    trained first where not finished (:func:`ichpro.experiments.run_rows`)."""
    runs = {}
    for s in seeds:
        runs[s] = run_rows([*single, fused], profile, manifest, out, seed=s, **run_options)
        runs[s][SUMMED] = summed_logits([runs[s][single[0].name], runs[s][single[1].name]])
    return runs


def pooled_vs_per_fold(runs: dict[int, dict[str, pd.DataFrame]]) -> pd.DataFrame:
    """Per (row, seed): pooled AUC, recalibrated and uncalibrated (NaN without ``p_bad_uncalibrated``),
    the mean of the per-fold AUCs and the range of the folds' mean P(bad)."""
    lines = []
    for seed, by_row in runs.items():
        for name, o in by_row.items():
            means = o.groupby("fold")["p_bad"].mean()
            raw = o.get("p_bad_uncalibrated")
            lines.append({"row": name, "seed": seed,
                          "pooled AUC": classification_metrics(o["label"], o["p_bad"])["auc"],
                          "pooled AUC, uncalibrated": (np.nan if raw is None
                                                       else classification_metrics(o["label"], raw)["auc"]),
                          "mean per-fold AUC": fold_aucs(o).mean(),
                          "folds' mean P(bad)": f"{means.min():.2f}-{means.max():.2f}"})
    return pd.DataFrame(lines).set_index(["row", "seed"]).sort_index()


def describe_seed_spans(late: pd.DataFrame) -> list[str]:
    """Per AUC column of :func:`pooled_vs_per_fold`: each row's range over the seeds."""
    n_seeds = late.index.get_level_values("seed").nunique()
    said = []
    for kind in ("pooled AUC", "pooled AUC, uncalibrated", "mean per-fold AUC"):
        spans = late[kind].dropna().groupby("row").agg(["min", "max"])
        said.append(f"{kind} over {n_seeds} seeds: "
                    + "; ".join(f"{r} {a:.3f}-{b:.3f}" for r, (a, b) in spans.iterrows()))
    return said


def outcome_groups(truth: pd.DataFrame) -> pd.Series:
    """Each patient's group in :data:`OUTCOME_ORDER`: "died by day 30", else "GOS <90-day GOS>"."""
    return ("GOS " + truth["gos"].astype(str)).where(truth["died_30d"] == 0, "died by day 30")


def plot_hospital_stay(truth: pd.DataFrame) -> plt.Figure:
    """Hospital stay by 90-day outcome group (box and patients), coloured by the outcome label."""
    stays = truth.assign(outcome=outcome_groups(truth), label=np.where(truth["label"] == 1, "bad", "good"))
    order = [g for g in OUTCOME_ORDER if g in set(stays["outcome"])]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    sns.boxplot(stays, x="outcome", y="hospital_stay_days", order=order, ax=ax, color="lightgray",
                fliersize=0)
    sns.stripplot(stays, x="outcome", y="hospital_stay_days", order=order, hue="label", ax=ax,
                  palette={"good": "C0", "bad": "C3"}, hue_order=["good", "bad"], size=3, alpha=0.7)
    ax.legend(title="outcome label", fontsize=8, title_fontsize=8)
    ax.set(xlabel="90-day outcome (GOS 1 here: died after day 30)", ylabel="hospital stay (days)",
           title="Hospital stay by 90-day outcome (synthetic cohort)")
    return fig


def describe_stay(truth: pd.DataFrame) -> str:
    """The median hospital stay of each outcome group."""
    medians = truth["hospital_stay_days"].groupby(outcome_groups(truth)).median()
    return "Median hospital stay in days: " + "; ".join(
        f"{g}: {medians[g]:.0f}" for g in OUTCOME_ORDER if g in medians) + "."


def describe_probe(layers: pd.DataFrame, used: int, row: pd.Series) -> list[str]:
    """Readings of :func:`ichpro.probes.probe_table`: the layer the model reads against the best one
    on inner validation, and that layer's out-of-fold probe against a table row (``auc``,
    ``ceiling_auc``) that reads the same reports."""
    if used not in layers.index:
        raise IchproError(f"layer {used} is not in the probe table (layers {list(layers.index)})")
    best, top = int(layers["inner_val_auc"].idxmax()), len(layers) - 1
    probe = layers.loc[used]
    low, high = probe["out_of_fold_auc_ci_low"], probe["out_of_fold_auc_ci_high"]
    where = "below" if row["auc"] < low else "above" if row["auc"] > high else "inside"
    same = " (the same)." if best == used else f" (not the same: this cohort's inner splits prefer {best})."
    return [f"The model reads layer {used} of {top}; the best layer on inner validation is {best}{same}",
            f"Probe on layer {used}: out-of-fold AUC {probe['out_of_fold_auc']:.3f} (95 % CI "
            f"{low:.3f}-{high:.3f}); the {row.name} model: {row['auc']:.3f}, {where} the probe's CI; "
            f"the ceiling: {row['ceiling_auc']:.3f}."]


def versus_row(predictions: dict[str, pd.DataFrame], baseline: str) -> pd.DataFrame:
    """Every other row against ``baseline`` on the same patients: ``auc``, ``baseline_auc``, the
    paired DeLong ``delong_p`` (:func:`ichpro.experiments.paired_auc`) and ``gain`` (index: row)."""
    lines = [(name, *paired_auc(predictions, name, baseline)) for name in predictions if name != baseline]
    versus = pd.DataFrame(lines, columns=["row", "auc", "baseline_auc", "delong_p"]).set_index("row")
    return versus.assign(gain=versus["auc"] - versus["baseline_auc"])


def describe_versus(versus: pd.DataFrame, baseline: str, reference: Sequence[str] = ()) -> list[str]:
    """Readings of :func:`versus_row`: how many rows beat the baseline, which differ at p < 0.05, the
    range of the gains, and one line per ``reference`` row."""
    gain, p = versus["gain"], versus["delong_p"]
    sig = gain[p < 0.05]
    listed = ": " + "; ".join(f"{n} {g:+.3f}" for n, g in sig.items()) if len(sig) else ""
    return [f"{(gain > 0).sum()} of {len(versus)} rows have a higher AUC than {baseline} "
            f"({versus['baseline_auc'].iloc[0]:.3f}); {len(sig)} differ from it at p < 0.05 (DeLong, "
            f"uncorrected){listed}.",
            f"The change over {baseline} ranges from {gain.min():+.3f} ({gain.idxmin()}) to "
            f"{gain.max():+.3f} ({gain.idxmax()}).",
            *(f"{r} vs {baseline}: {gain[r]:+.3f} AUC (DeLong p = {p[r]:.2g})." for r in reference)]
