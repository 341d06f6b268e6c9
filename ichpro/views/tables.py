"""What notebooks 07-09 show around their result tables: the rows' status and losses, readings of the
table printed from its numbers, late fusion over seeds, the Hospital Stay field and the text probe."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import combinations
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ichpro.config import Profile
from ichpro.errors import IchproError
from ichpro.experiments import Row, comparisons, fold_aucs, row_costs, row_folder, run_rows, summed_logits
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
    """The AUC columns of a results table (ours: mean over seeds), its comparison with the reference
    and each row's gap to its oracle ceiling (index: row)."""
    auc = table.set_index("row")[["paper_auc", "auc", "auc_ci_low", "auc_ci_high", "n_seeds", "auc_seed_min",
                                  "auc_seed_max", "difference", "p_holm", "call", "ceiling_auc"]]
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
                     seeds: Iterable[int], **run_options) -> dict[str, dict[int, pd.DataFrame]]:
    """The out-of-fold predictions (``row -> seed -> table``) of two single-modality rows, of the fused
    row and of the single rows' summed logits (:data:`SUMMED`; :func:`ichpro.experiments.summed_logits`),
    trained first where not finished (:func:`ichpro.experiments.run_rows`)."""
    runs: dict[str, dict[int, pd.DataFrame]] = {}
    for s in seeds:
        for name, oof in run_rows([*single, fused], profile, manifest, out, seed=s, **run_options).items():
            runs.setdefault(name, {})[s] = oof
        runs.setdefault(SUMMED, {})[s] = summed_logits([runs[single[0].name][s], runs[single[1].name][s]])
    return runs


def pooled_vs_per_fold(runs: dict[str, dict[int, pd.DataFrame]]) -> pd.DataFrame:
    """Per (row, seed): pooled AUC, recalibrated and uncalibrated (NaN without ``p_bad_uncalibrated``),
    the mean of the per-fold AUCs and the range of the folds' mean P(bad)."""
    lines = []
    for name, by_seed in runs.items():
        for seed, o in by_seed.items():
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


def versus_row(rows: list[Row], predictions: dict[str, dict[int, pd.DataFrame]], baseline: str
               ) -> pd.DataFrame:
    """Every other row against ``baseline`` (:func:`ichpro.experiments.comparisons`, Holm-adjusted over
    these comparisons; index: row)."""
    tested = [Row(r.name, versus=(baseline,)) for r in rows if r.name != baseline] + [Row(baseline)]
    return comparisons(tested, predictions).set_index("a")


def describe_versus(versus: pd.DataFrame, baseline: str) -> list[str]:
    """Readings of :func:`versus_row`: how many rows have a higher AUC than the baseline, the calls, and
    the range of the differences."""
    gain = versus["auc_a"] - versus["auc_b"]
    said = [f"{(gain > 0).sum()} of {len(versus)} rows have a higher mean AUC than {baseline} "
            f"({versus['auc_b'].iloc[0]:.3f})."]
    for call in ("real", "equivalent", "not established"):
        chosen = versus.index[versus["call"] == call]
        said.append(f"{call}: {len(chosen)}" + (" (" + "; ".join(f"{r} {versus.at[r, 'difference']:+.3f}"
                                                               for r in chosen) + ")" if len(chosen) else ""))
    return [said[0], f"Calls against {baseline} (Holm over these comparisons): {', '.join(said[1:])}.",
            f"The per-fold difference from {baseline} ranges from {versus['difference'].min():+.3f} "
            f"({versus['difference'].idxmin()}) to {versus['difference'].max():+.3f} "
            f"({versus['difference'].idxmax()})."]
