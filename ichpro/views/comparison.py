"""Notebook 10 (Table 4): what each system sees and trains, their block diagrams, the volume head's
measurements and the Grad-CAM maps of the two ResNets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from ichpro.checkpoints import load_weights
from ichpro.clinical import clinical_scores
from ichpro.config import Profile
from ichpro.experiments import CEILINGS, Row
from ichpro.explain import brain_of, localisation_statistics
from ichpro.models.comparators import Comparator, build_comparator

#: what each system reads when it predicts (by comparator; None: ICHPro; missing: the CT alone)
SEES = {"slice2d": "CT", "small3dcnn": "CT", "image+gcs": "CT + GCS",
        "vdafm": "CT + clinical table + CT-derived text", "concat_late": "CT + report",
        "logistic_regression": "clinical fields", "ich_score": "clinical fields",
        "func_score": "clinical fields", None: "CT + report"}
#: what each system learns from (by comparator; missing: the outcome alone)
TARGETS = {"densenet+bin_age": "outcome, age ≥ 80", "densenet+bin_gcs": "outcome, GCS ≤ 8",
           "densenet+bin_gcs+bin_age": "outcome, GCS ≤ 8, age ≥ 80", "densenet+ord_gcs": "outcome, GCS class",
           "densenet+ord_gcs+bin_age": "outcome, GCS class, age ≥ 80", "quantification": "outcome, volume",
           "vdafm": "outcome + image-text and image-table alignment",
           None: "outcome (VTMF: + IMIMA, SDM, MLM)",
           "ich_score": "none (fixed formula)", "func_score": "none (fixed formula)"}
#: systems fitted as a logistic regression on fixed inputs
LOGISTIC = ("logistic_regression", "ich_score", "func_score")


def _trains(comparator: str | None, profile: Profile) -> str:
    """What of a system trains."""
    if comparator in LOGISTIC:
        return "logistic regression"
    if comparator == "concat_late" or (comparator is None and profile.model.freeze_vision):
        return "after the frozen encoders"
    return "end to end" if comparator is None else "whole network, from scratch"


def systems_table(rows: Sequence[Row], profile: Profile) -> pd.DataFrame:
    """One line per row of Table 4: the paper's row it stands for, what it sees at prediction, learns
    from and trains, and the oracle ceiling of its inputs (``truth.csv`` column)."""
    lines = []
    for row in rows:
        comparator = row.model.get("comparator")
        lines.append({"row": row.name, "paper's row": row.paper or "not in the paper",
                      "comparator": comparator or "ICHPro", "sees at prediction": SEES.get(comparator, "CT"),
                      "learns from": TARGETS.get(comparator, "outcome"),
                      "what trains": _trains(comparator, profile),
                      "ceiling (truth.csv)": CEILINGS[row.ceiling]})
    return pd.DataFrame(lines).set_index("row")


def system_pipelines(profile: Profile) -> dict[str, list[list[str]]]:
    """The systems as block diagrams for :func:`ichpro.plots.plot_pipelines`: columns of boxes, from the
    inputs (the CT at the size the comparators read it) to P(bad)."""
    ct = "CT " + "×".join(map(str, profile.model.comparator_input or profile.preprocess.spatial_size))
    return {
        "2D slice CNN (image-based 2D method)": [
            [ct], ["2D CNN per axial slice"], ["attention pooling over slices"], ["P(bad)"]],
        "Small 3D CNN (3D DL method)": [[ct], ["Conv3d 16-32-64-128"], ["global pooling"], ["P(bad)"]],
        "Image + GCS late fusion (GCS-ICHNet idea)": [
            [ct, "GCS"], ["3D CNN", "standardise"], ["concatenate → MLP"], ["P(bad)"]],
        "Multi-task DenseNet (Pérez del Barrio, Cobo et al.)": [
            [ct], ["3D DenseNet-121 (narrowed)"], ["pooled features"],
            ["P(bad)", "GCS ≤ 8 or ordinal GCS", "age ≥ 80"]],
        "Joint quantification (Gong et al.)": [
            [ct], ["shared 3D ResNet"], ["pooled features"], ["P(bad)", "log volume"]],
        "VDAFM (Chen et al.)": [
            [ct, "clinical table", "template text from CT"], ["3D ResNet", "feature tokens", "text encoder"],
            ["vision query attends to text and table", "image-text + image-table contrast (loss)"],
            ["P(bad)"]],
        "Concatenation late fusion": [
            ["CT", "report"], ["frozen 3D ResNet", "frozen text encoder"], ["pool + concatenate → MLP"],
            ["P(bad)"]],
        "ICHPro": [["CT", "report"], ["frozen 3D ResNet", "frozen text encoder"], ["VRT", "TRT"],
                   ["CMAF → MHSAF → DenseNet header"], ["P(bad)"]],
        "Clinical scores and logistic regression": [
            ["age, GCS, volume, IVH, location, ..."], ["ICH / FUNC score or all fields"],
            ["logistic regression"], ["P(bad)"]],
    }


FLOOR_ML = 0.5  # volumes are drawn on log axes from here


def plot_volume(true_ml: pd.Series, oof: pd.DataFrame) -> plt.Figure:
    """The volume head's out-of-fold estimate (``oof``: ``volume_ml_pred``, ``label``, indexed by
    patient) against the haematoma volume of the mask (``true_ml``, indexed by patient)."""
    predicted = oof["volume_ml_pred"].clip(lower=FLOOR_ML)
    true = true_ml.loc[predicted.index].clip(lower=FLOOR_ML)
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.scatter(true, predicted, s=8, alpha=0.6, c=oof["label"], cmap="coolwarm")
    low, top = FLOOR_ML * 0.8, max(true.max(), predicted.max()) * 1.3
    ax.plot([low, top], [low, top], color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlim=(low, top), ylim=(low, top),
           xlabel="true haematoma volume (mL, from the mask)", ylabel="predicted volume (mL, out of fold)",
           title=f"Joint quantification: volume head\n(log scales, values below {FLOOR_ML:g} mL drawn at it; "
                 "red: bad outcome)")
    ax.title.set_fontsize(9)
    return fig


def fold_model(folder: Path, row: Row, profile: Profile, fold: int = 0) -> Comparator:
    """The selected checkpoint of one fold of a comparator row's run, in eval mode."""
    model = build_comparator(row.model["comparator"], profile.model)
    load_weights(Path(folder) / f"fold{fold}" / "best.safetensors", model)
    return model.eval()


def grad_cam_summary(localisation: pd.DataFrame) -> pd.DataFrame:
    """Per system (the localisation table's ``method``): the columns of
    :func:`ichpro.explain.localisation_statistics`, ``nonzero_maps`` (patients whose map has mass in the
    brain, the ones a ratio is defined for) and ``pointing_hits`` (patients)."""
    counts = localisation.groupby("method", sort=False).agg(nonzero_maps=("ratio", "count"),
                                                            pointing_hits=("pointing_hit", "sum"))
    return localisation_statistics(localisation).join(counts).rename_axis("system").reset_index()


def plot_grad_cam(cts: torch.Tensor, blood_share: torch.Tensor, cams: Mapping[str, torch.Tensor],
                  localisation: pd.DataFrame, patient_ids: Sequence[str],
                  grids: Mapping[str, tuple[int, ...]], n: int = 3) -> plt.Figure:
    """The ``n`` patients with the most haematoma: their CT (B, 1, D, H, W) on the slice with the most
    haematoma (share (B, D, H, W), outlined), and each system's Grad-CAM (B, D, H, W) where it is
    positive in the brain, titled with its ratio from ``localisation``
    (:func:`ichpro.explain.maps_in_mask`) and the feature grid it was computed on (``grids``), from
    which it is up-sampled to the CT."""
    ratio = localisation.set_index(["method", "patient_id"])["ratio"]
    shown = np.argsort(-blood_share.sum(dim=(1, 2, 3)).numpy(), kind="stable")[:n]
    columns = 1 + len(cams)
    fig, axes = plt.subplots(len(shown), columns, figsize=(2.5 * columns + 0.8, 2.6 * len(shown)),
                             squeeze=False, layout="constrained")
    for row_axes, j in zip(axes, shown):
        z, ct = int(blood_share[j].sum(dim=(1, 2)).argmax()), cts[j, 0].numpy()
        outline = blood_share[j, z].numpy()
        brain = brain_of(ct)
        row_axes[0].set_title(f"{patient_ids[j]}, slice {z}", fontsize=8)
        for ax, (name, cam) in zip(row_axes, [(None, None), *cams.items()]):
            ax.imshow(ct[z], cmap="gray", vmin=0, vmax=0.25)
            if name is not None:
                heat = cam[j, z].numpy()
                shown_map = ax.imshow(np.where(brain[z] & (heat > 0), heat, np.nan), cmap="inferno", vmin=0,
                                      vmax=1, alpha=0.6)  # zero (and outside the brain): the CT alone
                score = ratio[name, patient_ids[j]]
                said = f"ratio {score:.2f}" if np.isfinite(score) else "no mass in the brain"
                grid = "×".join(map(str, grids[name]))
                ax.set_title(f"{name}\n{grid} grid, up-sampled; {said}", fontsize=7)
            ax.contour(outline, levels=[0.5], colors="red" if name is None else "cyan", linewidths=0.8)
            ax.axis("off")
    fig.colorbar(shown_map, ax=axes, shrink=0.6, label="Grad-CAM ÷ the patient's maximum")
    fig.suptitle("Grad-CAM of the bad-outcome logit over the brain (haematoma outlined); each map is "
                 "computed on its network's coarse feature grid\nand up-sampled, so detail finer than a "
                 "grid cell is interpolation, not evidence", fontsize=8)
    return fig


def grad_cam_readings(summary: pd.DataFrame) -> list[str]:
    """One sentence per system of :func:`grad_cam_summary`, written from its numbers."""
    lines = []
    for _, s in summary.iterrows():
        if s["nonzero_maps"] == 0:
            lines.append(f"{s['system']}: none of the {s['n']} maps has mass in the brain (Grad-CAM's "
                         "ReLU left nothing: nowhere do the gradient-weighted features raise the bad-outcome "
                         "logit).")
            continue
        lines.append(f"{s['system']}: {s['nonzero_maps']} of {s['n']} maps have mass in the brain; "
                     f"mean ratio {s['ratio']:.2f} (median {s['median_ratio']:.2f}, "
                     f"grid ceiling {s['grid_ceiling']:.1f}); the peak falls on the haematoma for "
                     f"{s['pointing_hits']} of {s['n']} patients "
                     f"(95 % CI {s['pointing_ci_low']:.0%}-{s['pointing_ci_high']:.0%}) against "
                     f"{s['pointing_chance']:.0%} by chance.")
    return lines


def describe_score_aucs(manifest: pd.DataFrame, truth: pd.DataFrame, predictions: Mapping[str, pd.DataFrame]
                        ) -> list[str]:
    """The AUCs of each clinical score on the same patients, from notebook 01's number to Table 4's:
    the formula on the cohort's true variables (``truth.csv``), the formula on the manifest's fields
    (what a site records: no pre-ICH cognitive impairment column, so FUNC takes it as absent), and
    the pooled out-of-fold AUC of the per-fold logistic maps (``predictions``: the "ICH score" and
    "FUNC score" rows of a table, one seed)."""
    risks = clinical_scores(manifest).set_index(manifest["patient_id"].astype(str))
    true = truth.assign(patient_id=truth["patient_id"].astype(str)).set_index("patient_id")
    said = []
    for name, column, sign in (("ICH score", "ich_score", 1), ("FUNC score", "func_score", -1)):
        oof = predictions[name].assign(patient_id=lambda o: o["patient_id"].astype(str))
        ids = oof["patient_id"]
        on_truth = roc_auc_score(oof["label"], sign * true.loc[ids, column])
        recorded = risks.loc[ids, f"{column}_risk"]
        known = recorded.notna().to_numpy()
        on_manifest = roc_auc_score(oof["label"][known], recorded[known])
        pooled = roc_auc_score(oof["label"], oof["p_bad"])
        said.append(f"{name}: AUC of the formula on the true variables {on_truth:.3f} (notebook 01), on the "
                    f"manifest's fields {on_manifest:.3f} ({known.sum()} patients with every input), pooled "
                    f"out-of-fold AUC of its per-fold logistic maps {pooled:.3f} (Table 4): each fold's map "
                    "keeps the score's ranking, but pooling five maps fitted on different patients reorders "
                    "scores across folds.")
    return said
