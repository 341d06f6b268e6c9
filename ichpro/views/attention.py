"""Notebook 11: the maps of a trained ICHPro run drawn over the haematoma's slice, the words TRT reads,
the counterfactual report, and the localisation numbers read against their chance and ceiling."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.colorbar import Colorbar
from matplotlib.colors import LogNorm, Normalize
from sklearn.metrics import roc_auc_score

from ichpro.experiments import CEILINGS
from ichpro.explain import attention_in_mask, brain_of, patient_volumes
from ichpro.heatmaps import GRAD_CAM, GRADIENT_WEIGHTED
from ichpro.predict import TrainedRun
from ichpro.pretrain import pretrained_path
from ichpro.reports import field_status
from ichpro.views.fusion import attention_map_label

#: the log scale every map is shown on, relative to uniform (and the counterfactual's after ÷ before)
RATIO_RANGE = (0.25, 4.0)
RATIO_TICKS = {0.25: "≤ 0.25", 0.5: "0.5", 1: "1", 2: "2", 4: "≥ 4"}
OUTLINES = {0: "lime", 1: "cyan"}  # blood channel -> outline colour: parenchymal haematoma, IVH
CT_WINDOW = (0, 0.25)  # of the preprocessed CT: brain tissue and blood
FIELD_NAMES = {"gcs": "GCS"}  # report fields as a title names them (others: as they are)


def short(method: str) -> str:
    """The display name of a map: an attention map's stage, block and direction (× gradient when
    gradient-weighted), or Grad-CAM's."""
    if method == GRAD_CAM:
        return "Grad-CAM (bad)"
    if method.endswith(GRADIENT_WEIGHTED):
        return attention_map_label(method.removesuffix(GRADIENT_WEIGHTED)) + " × gradient"
    return attention_map_label(method)


@dataclass
class Patient:
    """One patient on the model grid, with the maps computed for them."""

    patient_id: str
    ct: torch.Tensor  # (1, D, H, W) the model input
    blood: np.ndarray  # (2, D, H, W) parenchymal haematoma and intraventricular blood shares
    brain: np.ndarray  # (D, H, W) bool
    report: str
    slice: int  # the axial slice shown: most haematoma (else most blood)
    maps: dict[str, np.ndarray] = field(default_factory=dict)


def load_patient(manifest: pd.DataFrame, patient_id: str, run: TrainedRun) -> Patient:
    """A manifest's patient on the run's model grid (:func:`ichpro.explain.patient_volumes`)."""
    record = manifest.set_index(manifest["patient_id"].astype(str), drop=False).loc[str(patient_id)]
    ct, blood = patient_volumes(record, run.profile.preprocess)
    blood = blood.numpy()
    area = blood[0].sum(axis=(1, 2)) if blood[0].any() else blood.sum(axis=(0, 2, 3))
    return Patient(str(patient_id), ct, blood, brain_of(ct[0]), record["report"], int(area.argmax()))


def gives(report: str, fields: Iterable[str]) -> bool:
    """Whether a report gives a readable value for every one of ``fields``."""
    status = field_status(report)
    return all(status[name] == "given" for name in fields)


def describe_edit(changes: Mapping[str, object], before: Mapping[str, object] | None = None) -> str:
    """A report edit in words: "GCS → 5, age → 85", or with the values before: "GCS 14 → 5, ..."."""
    parts = []
    for name, value in changes.items():
        was = f" {before[name]}" if before and name in before else ""
        parts.append(f"{FIELD_NAMES.get(name, name)}{was} → {value}")
    return ", ".join(parts)


def relative(heat: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """A map divided by its mean over the brain (1 = uniform); NaN (transparent) outside the brain."""
    return np.where(brain, heat / heat[brain].mean(), np.nan)


def ratio_norm() -> LogNorm:
    """The log colour scale of :data:`RATIO_RANGE`."""
    return LogNorm(*RATIO_RANGE)


def ratio_colorbar(fig: plt.Figure, mappable, axes, label: str, **kwargs) -> Colorbar:
    """A colour bar of the log ratio scale, ticks at halvings and doublings."""
    bar = fig.colorbar(mappable, ax=axes, **kwargs)
    bar.minorticks_off()
    bar.set_ticks(list(RATIO_TICKS), labels=list(RATIO_TICKS.values()))
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    return bar


def draw(ax: plt.Axes, patient: Patient, heat: np.ndarray | None = None, norm: Normalize | None = None,
         cmap: str = "coolwarm", title: str = ""):
    """The patient's slice, a map over it (clipped to a log ``norm``'s range) and the blood outlines;
    returns the map's image (None without a map)."""
    k = patient.slice
    ax.imshow(patient.ct[0, k].numpy(), cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1])
    shown = None
    if heat is not None:
        norm = norm or ratio_norm()
        layer = np.clip(heat[k], norm.vmin, norm.vmax) if isinstance(norm, LogNorm) else heat[k]
        shown = ax.imshow(layer, cmap=cmap, norm=norm, alpha=0.55)
    for channel, colour in OUTLINES.items():
        if (patient.blood[channel, k] >= 0.5).any():
            ax.contour(patient.blood[channel, k], levels=[0.5], colors=colour, linewidths=0.9)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return shown


def describe_run(run: TrainedRun, grids: Mapping[str, Sequence[int]]) -> list[str]:
    """The run's fold models, fusion, input and map grids, and its pretrained vision encoder's card."""
    profile, size = run.profile, run.profile.preprocess.spatial_size
    lines = [f"{len(run.models)} fold models; fusion {profile.model.fusion}, {profile.model.heads} heads; "
             f"input (D, H, W) {size}"]
    for name, grid in grids.items():
        cell = tuple(s // g for s, g in zip(size, grid))
        lines.append(f"  {name:28s} grid {tuple(grid)}: one cell = {cell} input voxels")
    if profile.model.vision_weights is None and profile.pretrain is not None:
        card = json.loads((pretrained_path(profile).parent / "card.json").read_text())
        held_out = card["held_out"]
        lines.append(f"vision encoder: pretrained on {card['train_patients']} synthetic CTs for "
                     f"{card['pretrain']['epochs']} epochs; held-out blood Dice "
                     f"{held_out['held_out_dice']:.3f}, volume MAE "
                     f"{held_out['held_out_volume_mae_ml']:.1f} mL; frozen: {profile.model.freeze_vision}")
    return lines


def plot_examples(examples: Mapping[str, Patient], shown: pd.DataFrame, title: str) -> plt.Figure:
    """One row per patient (``shown``: ``patient_id``, ``label``, ``p_bad``): the slice, then each map
    relative to uniform, titled with the patient's ratio over the whole volume."""
    methods = list(next(iter(examples.values())).maps)
    columns = len(methods) + 1
    fig, axes = plt.subplots(len(examples), columns, figsize=(2.3 * columns + 1, 2.5 * len(examples)),
                             squeeze=False, layout="constrained")
    for row_axes, info in zip(axes, shown.itertuples()):
        patient = examples[info.patient_id]
        outcome = "bad" if info.label == 1 else "good"
        draw(row_axes[0], patient, title=f"{info.patient_id} · {outcome} outcome\n"
                                         f"OOF P(bad) {info.p_bad:.2f} · slice {patient.slice}")
        for ax, method in zip(row_axes[1:], methods):
            heat = patient.maps[method]
            score = attention_in_mask(heat, patient.blood[0], patient.brain)
            image = draw(ax, patient, relative(heat, patient.brain),
                         title=f"{short(method)}\nratio {score['ratio']:.2f}")
    ratio_colorbar(fig, image, axes, "map ÷ its mean over the brain (1 = uniform; log scale)", shrink=0.6)
    fig.suptitle(title, fontsize=10)
    return fig


def percentile_lines(examples: Mapping[str, Patient]) -> list[str]:
    """Per map: the range of its 1st to 99th percentiles over the brain, relative to uniform."""
    lines = []
    for method in next(iter(examples.values())).maps:
        spread = [np.nanpercentile(relative(p.maps[method], p.brain), [1, 99]) for p in examples.values()]
        lines.append(f"{method:28s} 1st-99th percentile over the brain: {np.min(spread):.3f} to "
                     f"{np.max(spread):.3f} x uniform")
    return lines


def _word(key: str) -> str:
    return key.split(":", 1)[1]


def plot_words(readings: Mapping[str, pd.Series]) -> plt.Figure:
    """Each report's token attention (:func:`ichpro.explain.token_attention`) as bars, against 1/L."""
    fig, axes = plt.subplots(len(readings), 1, figsize=(15, 2.6 * len(readings)), squeeze=False,
                             layout="constrained")
    for ax, (pid, read) in zip(axes[:, 0], readings.items()):
        ax.bar(range(len(read)), read.to_numpy(), color="tab:blue")
        ax.axhline(1 / len(read), color="grey", ls="--", lw=1, label="uniform (1/L)")
        ax.set_xticks(range(len(read)), [_word(k) for k in read.index], rotation=90, fontsize=7)
        ax.set(ylabel="attention", xlim=(-0.6, len(read) - 0.4), title=f"{pid}: the words TRT reads")
        ax.legend(fontsize=8, loc="upper right")
    return fig


def top_words(readings: Mapping[str, pd.Series], n: int = 8) -> list[str]:
    """Per report, the ``n`` word pieces read most, against the uniform share."""
    return [f"{pid}: most read " + ", ".join(f"{_word(k)} {v:.3f}" for k, v in read.nlargest(n).items())
            + f" (uniform {1 / len(read):.3f})" for pid, read in readings.items()]


def change_factors(cf: Mapping, brain: np.ndarray) -> dict[str, np.ndarray]:
    """Per attention map of :func:`ichpro.explain.counterfactual`: after ÷ before of the maps relative
    to uniform, over the brain (NaN outside)."""
    return {name: relative(cf["attention_after"][name], brain) / relative(cf["attention_before"][name], brain)
            for name in cf["attention_before"]}


def largest_change(factors: np.ndarray) -> float:
    """The largest factor by which a map changes anywhere in the brain, up or down (1 = unchanged)."""
    return float(np.nanmax(np.maximum(factors, 1 / factors)))


def plot_counterfactual(cf: Mapping, patient: Patient, changes: Mapping[str, object], title: str
                        ) -> plt.Figure:
    """One row per attention map: before and after the report edit, relative to uniform, and after ÷
    before on the same log scale (white: unchanged)."""
    brain, factors = patient.brain, change_factors(cf, patient.brain)
    fig, axes = plt.subplots(len(factors), 3, figsize=(7.5, 2.6 * len(factors) + 1.2), squeeze=False,
                             layout="constrained")
    for row_axes, name in zip(axes, factors):
        ratios = [attention_in_mask(cf[f"attention_{w}"][name], patient.blood[0], brain)["ratio"]
                  for w in ("before", "after")]
        maps = draw(row_axes[0], patient, relative(cf["attention_before"][name], brain),
                    title=f"{short(name)}, before\nP(bad) {cf['p_bad_before']:.2f}, ratio {ratios[0]:.2f}")
        draw(row_axes[1], patient, relative(cf["attention_after"][name], brain),
             title=f"after ({describe_edit(changes)})\nP(bad) {cf['p_bad_after']:.2f}, ratio {ratios[1]:.2f}")
        change = draw(row_axes[2], patient, factors[name], cmap="PuOr_r",
                      title=f"after ÷ before\nlargest change ×{largest_change(factors[name]):.2f}")
    ratio_colorbar(fig, maps, axes[:, :2], "map ÷ its mean over the brain (1 = uniform; log scale)",
                   location="bottom", shrink=0.7, aspect=30)
    ratio_colorbar(fig, change, axes[:, 2], "after ÷ before (1 = unchanged;\nthe maps' log scale)",
                   location="bottom", shrink=0.95, aspect=15)
    fig.suptitle(title, fontsize=10)
    return fig


def good_outcomes_to_edit(manifest: pd.DataFrame, changes: Iterable[str]) -> list[str]:
    """The good-outcome patients whose reports state every field the edit changes, in manifest order."""
    return [pid for pid, label, report in zip(manifest["patient_id"], manifest["label"], manifest["report"])
            if label == 0 and gives(report, changes)]


def counterfactual_summary(cf_table: pd.DataFrame) -> pd.Series:
    """The edit's effect over patients (:func:`ichpro.explain.counterfactual_table`), with the oracle's
    where the table has it."""
    model = cf_table["p_after"] - cf_table["p_before"]
    summary = {"patients": len(cf_table), "model mean ΔP(bad)": model.mean(),
               "model ΔP(bad) > 0": (model > 0).mean()}
    if "oracle_p_after" in cf_table:
        oracle = cf_table["oracle_p_after"] - cf_table["oracle_p_before"]
        summary.update({"oracle mean ΔP(bad)": oracle.mean(),
                        "same sign as the oracle": (np.sign(model) == np.sign(oracle)).mean(),
                        "model mean / oracle mean": model.mean() / oracle.mean()})
    return pd.Series(summary, name="value")


def compare_counterfactuals(cf_tables: Mapping[str, pd.DataFrame]) -> str:
    """One sentence comparing the edit's effect on several runs' models (same patients, same edit)."""
    summaries = {name: counterfactual_summary(table) for name, table in cf_tables.items()}
    parts = []
    for name, summary in summaries.items():
        part = f"{name} {summary['model mean ΔP(bad)']:+.3f}"
        if "oracle mean ΔP(bad)" in summary:
            part += (f" ({summary['model mean / oracle mean']:.2f} of the oracle's, same sign for "
                     f"{summary['same sign as the oracle']:.0%})")
        parts.append(part)
    first = next(iter(summaries.values()))
    oracle = first.get("oracle mean ΔP(bad)")
    tail = "" if oracle is None else f"; the oracle moves it by {oracle:+.3f}"
    return (f"Mean change of P(bad) over the same {first['patients']:.0f} patients: " + "; ".join(parts)
            + tail + ".")


def plot_counterfactual_truth(cf_table: pd.DataFrame, title: str) -> plt.Figure:
    """The model's out-of-fold P(bad) before and after the edit against the oracle's, and the changes."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4), layout="constrained")
    for when, marker in (("before", "o"), ("after", "^")):
        axes[0].scatter(cf_table[f"oracle_p_{when}"], cf_table[f"p_{when}"], marker=marker, alpha=0.7,
                        label=f"{when} the edit")
    axes[0].plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    axes[0].set(xlabel="oracle P(bad) (true variables)", ylabel="model P(bad) (out-of-fold)",
                xlim=(0, 1), ylim=(0, 1), title="P(bad) before and after")
    axes[0].legend(fontsize=8)
    axes[1].scatter(cf_table["oracle_p_after"] - cf_table["oracle_p_before"],
                    cf_table["p_after"] - cf_table["p_before"], color="tab:purple", alpha=0.7)
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="model = oracle")
    axes[1].set(xlabel="oracle ΔP(bad)", ylabel="model ΔP(bad)", xlim=(-0.05, 1), ylim=(-0.5, 1),
                title="the change the edit makes")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_localisation(table: pd.DataFrame, summary: pd.DataFrame, title: str) -> plt.Figure:
    """Per map: each patient's ratio (log scale) with the mean and the median grid ceiling, and the
    pointing-game hit rate (95 % CI) against its chance level
    (:func:`ichpro.explain.localisation_statistics`)."""
    order = list(summary.index)
    labels = [short(m) for m in order]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9), gridspec_kw={"width_ratios": [1.5, 1]})
    plotted = table.assign(outcome=table["label"].map({0: "good", 1: "bad"}))
    sns.stripplot(plotted, x="method", y="ratio", hue="outcome", order=order, hue_order=["good", "bad"],
                  palette={"good": "tab:green", "bad": "tab:red"}, dodge=True, jitter=0.15, size=4,
                  alpha=0.7, ax=axes[0])
    axes[0].set_yscale("log")
    axes[0].axhline(1, color="black", lw=1, ls="--", label="uniform (1)")
    for i, method in enumerate(order):
        axes[0].plot([i - 0.4, i + 0.4], [summary.loc[method, "ratio"]] * 2, color="black", lw=2,
                     label="mean" if i == 0 else None)
        axes[0].plot([i - 0.4, i + 0.4], [summary.loc[method, "grid_ceiling"]] * 2, color="grey",
                     lw=1.5, ls=":", label="grid ceiling (median)" if i == 0 else None)
    axes[0].set_xticks(range(len(order)), labels, fontsize=8, rotation=20, ha="right")
    axes[0].set(xlabel="", ylabel="mass inside / volume share (log)",
                title="map mass on the haematoma, per patient")
    axes[0].legend(fontsize=7, loc="upper left")
    rate = summary["pointing_hit_rate"]
    errors = [rate - summary["pointing_ci_low"], summary["pointing_ci_high"] - rate]
    axes[1].errorbar(range(len(order)), rate, yerr=errors, fmt="o", color="tab:blue", capsize=3,
                     label="hit rate (95 % CI)")
    axes[1].scatter(range(len(order)), summary["pointing_chance"], marker="_", s=300, color="grey",
                    label="chance (random peak in the brain)")
    axes[1].set_xticks(range(len(order)), labels, fontsize=8, rotation=20, ha="right")
    axes[1].set(ylim=(-0.03, 1.03), ylabel="share of patients", title="pointing game")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def localisation_readings(summary: pd.DataFrame, table: pd.DataFrame, flat_within: float = 0.05) -> list[str]:
    """What the localisation numbers say, written from them: each map against its ceiling and chance,
    by outcome, the attention map with the most mass on the haematoma, and the maps within
    ``flat_within`` of uniform."""
    lines = [f"{short(m)} ({m}): mean ratio {s['ratio']:.2f} (median {s['median_ratio']:.2f}, "
             f"{s['share_above_1']:.0%} of patients above 1; grid ceiling {s['grid_ceiling']:.1f}); "
             f"pointing hit rate {s['pointing_hit_rate']:.0%} "
             f"(95 % CI {s['pointing_ci_low']:.0%}-{s['pointing_ci_high']:.0%}) "
             f"against {s['pointing_chance']:.0%} by chance." for m, s in summary.iterrows()]
    by_class = table.groupby(["method", "label"])["ratio"].mean().unstack()
    lines.append("\nmean ratio by outcome: " + "; ".join(
        f"{short(m)} good {by_class.loc[m, 0]:.2f}, bad {by_class.loc[m, 1]:.2f}" for m in summary.index))
    attention = summary.drop(index=GRAD_CAM, errors="ignore")["ratio"]
    weighted = attention.index.str.endswith(GRADIENT_WEIGHTED)
    grad_cam = (f"; Grad-CAM: {summary.loc[GRAD_CAM, 'ratio']:.2f}" if GRAD_CAM in summary.index else "")
    best = [f"{kind} {ratios.idxmax()}, {ratios.max():.2f} times uniform on average"
            for kind, ratios in (("as attended:", attention[~weighted]),
                                 ("weighted by its gradient:", attention[weighted])) if len(ratios)]
    lines.append(f"\nThe highest mean ratio of each kind of attention map, {'; '.join(best)}{grad_cam}.")
    low, high = 1 - flat_within, 1 + flat_within
    for label, chosen in ((f"Within {flat_within:.0%} of uniform (ratio {low:.2f}-{high:.2f}), not singling "
                           "out the blood", attention[(attention - 1).abs() < flat_within]),
                          (f"Below uniform (ratio under {low:.2f}), less mass on the haematoma than a "
                           "uniform map", attention[attention <= low]),
                          (f"Above uniform (ratio over {high:.2f})", attention[attention >= high])):
        lines.append(f"{label}: " + (", ".join(f"{m} {r:.2f}" for m, r in chosen.items()) or "none") + ".")
    return lines


def oracle_readings(truth: pd.DataFrame, good_auc: float = 0.75) -> list[str]:
    """The oracle AUCs of the cohort (``truth.csv``): how far each modality alone can go."""
    names = {"all": "all variables", "image": "image-visible variables", "report": "report fields",
             "report_no_stay": "report fields without the hospital stay"}
    auc = {names[key]: roc_auc_score(truth["label"], truth[column]) for key, column in CEILINGS.items()}
    lines = ["Oracle AUC on this cohort from " + "; ".join(f"{k} {v:.3f}" for k, v in auc.items()) + "."]
    if auc[names["report_no_stay"]] >= good_auc:
        lines.append(f"The report alone, even without the stay that leaks the outcome, reaches an oracle AUC "
                     f"of {auc[names['report_no_stay']]:.3f} (≥ {good_auc}): a model need not look at the "
                     "haematoma to score a good AUC.")
    return lines


def grids_label(grids: Mapping[str, Sequence[int]]) -> str:
    """The grid each block's maps are made on, as a figure says it ("maps on grids ..., up-sampled")."""
    by_block: dict[str, Sequence[int]] = {}
    for method, grid in grids.items():
        by_block.setdefault(short(method).split(":")[0], grid)
    listed = ", ".join(f"{block} {'×'.join(map(str, grid))}" for block, grid in by_block.items())
    return f"maps on grids {listed}, up-sampled"


def counterfactual_changes(cf: Mapping, brain: np.ndarray) -> dict[str, float]:
    """The largest change of any raw attention map and of any gradient-weighted one within the brain
    (:func:`largest_change`), and P(bad) before and after the edit."""
    factors = change_factors(cf, brain)
    raw = [largest_change(f) for name, f in factors.items()
           if not name.endswith(GRADIENT_WEIGHTED) and name != GRAD_CAM]
    weighted = [largest_change(f) for name, f in factors.items() if name.endswith(GRADIENT_WEIGHTED)]
    return {"largest_change": max(raw), "largest_change_x_gradient": max(weighted, default=np.nan),
            "p_bad_before": cf["p_bad_before"], "p_bad_after": cf["p_bad_after"]}
