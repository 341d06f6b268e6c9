"""Explanations of a trained ICHPro model: its maps per patient (from :mod:`ichpro.heatmaps`),
TRT's token attention, their overlap with the haematoma (read against the pointing game's chance and
the ceiling a map's grid allows; for the comparators' Grad-CAM too), counterfactual reports, and maps
moved back onto the original CT's voxels.

Every map lives on the model input's voxel grid (D, H, W) (see ``ichpro.data``) unless
:func:`to_original_grid` moves it. The functions put the model in eval mode while they work and
leave it as they found it: train/eval mode, ``requires_grad`` flags and parameter gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, Resize
from monai.utils import TraceKeys
from scipy import ndimage

from ichpro.cohort import OUTCOME_MODEL
from ichpro.config import PreprocessConfig
from ichpro.data import preprocess_steps, preprocess_transforms
from ichpro.errors import IchproError
from ichpro.gradcam import feature_grid, grad_cam
from ichpro.heatmaps import (
    GRAD_CAM,
    GRADIENT_WEIGHTED,
    attention_volumes,
    forward,
    gradient_weighted_attention,
)
from ichpro.manifest import load_manifest
from ichpro.plots import binomial_ci
from ichpro.predict import TrainedRun, read_report
from ichpro.reports import Report, parse, render
from ichpro.text import tokenize

MEASURES = ("mass_inside", "volume_share", "ratio", "pointing_hit")


# --------------------------------------------------------------------------------------------
# Grad-CAM and attention maps


# --------------------------------------------------------------------------------------------
# Localisation


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def attention_in_mask(heatmap: np.ndarray | torch.Tensor, blood_share: np.ndarray | torch.Tensor,
                      brain: np.ndarray | torch.Tensor) -> dict[str, float | bool]:
    """How much of a non-negative map (D, H, W) falls in the haematoma, within the brain.

    ``mass_inside``: the share of the map's mass in the brain that lies in the haematoma, each voxel
    weighted by its haematoma share; ``volume_share``: haematoma volume / brain volume, what a
    uniform map would score; ``ratio`` = mass_inside / volume_share (1 = no better than uniform);
    ``pointing_hit``: the map's maximum within the brain lies in a voxel holding haematoma or in one
    of its 26 neighbours (tolerance: 1 voxel of the model grid along each axis, diagonals included).
    Undefined shares (no mass or no haematoma) are NaN.
    """
    share, brain = _in_brain(blood_share, brain)
    heat = np.where(brain, _numpy(heatmap).astype(np.float64), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mass_inside = float((heat * share).sum() / heat.sum())
        volume_share = float(share.sum() / brain.sum())
        ratio = mass_inside / volume_share if volume_share > 0 else float("nan")
    peak = np.unravel_index(np.argmax(np.where(brain, heat, -np.inf)), heat.shape)
    return {"mass_inside": mass_inside, "volume_share": volume_share, "ratio": ratio,
            "pointing_hit": bool(_near_blood(share)[peak])}


def _near_blood(share: np.ndarray) -> np.ndarray:
    """The voxels that count as a pointing-game hit: haematoma or one of its 26 neighbours."""
    return ndimage.binary_dilation(share > 0, structure=np.ones((3, 3, 3), dtype=bool))


def _in_brain(blood_share: np.ndarray | torch.Tensor, brain: np.ndarray | torch.Tensor
              ) -> tuple[np.ndarray, np.ndarray]:
    """The haematoma share within the brain (float64) and the brain (bool)."""
    brain = _numpy(brain).astype(bool)
    return np.where(brain, _numpy(blood_share).astype(np.float64), 0.0), brain


def pointing_chance(blood_share: np.ndarray | torch.Tensor, brain: np.ndarray | torch.Tensor) -> float:
    """The pointing game's chance level: the share of brain voxels that count as a hit in
    :func:`attention_in_mask` (haematoma or one of its neighbours), what a map whose peak falls
    anywhere in the brain with equal probability scores."""
    share, brain = _in_brain(blood_share, brain)
    return float((_near_blood(share) & brain).sum() / brain.sum())


def grid_ceiling(blood_share: np.ndarray | torch.Tensor, brain: np.ndarray | torch.Tensor,
                 grid: Sequence[int]) -> float:
    """The highest ``ratio`` of :func:`attention_in_mask` a map made on a coarser ``grid`` can
    score: all its mass on the one cell whose brain voxels hold the largest mean haematoma share.

    The cells split the input grid as adaptive average pooling does (every map's grid covers the
    whole input); a cell without brain holds no share.
    """
    share, brain = _in_brain(blood_share, brain)
    both = torch.as_tensor(np.stack([share, brain]), dtype=torch.float64)[None]
    cells = torch.nn.functional.adaptive_avg_pool3d(both, tuple(grid))[0]
    best_cell = float((cells[0] / cells[1].clamp_min(1e-12)).max())
    return best_cell / float(share.sum() / brain.sum())


def brain_of(ct: np.ndarray | torch.Tensor) -> np.ndarray:
    """The brain on the model grid: the skull-stripped input's non-zero voxels, holes (CSF) filled."""
    return ndimage.binary_fill_holes(_numpy(ct) > 0)


def report_batch(run: TrainedRun, ct: torch.Tensor, report: str) -> dict[str, torch.Tensor]:
    """A one-patient model batch from a preprocessed CT (1, D, H, W) and a report text."""
    batch = tokenize(run.text.tokenizer, [report], run.profile.model.max_tokens)
    batch["ct"] = ct[None]
    return batch


def patient_maps(run: TrainedRun, batch: Mapping[str, torch.Tensor], with_gradients: bool = True
                 ) -> dict[str, np.ndarray]:
    """Every map of one patient's batch, averaged over the run's fold models: name -> (D, H, W).
    ``with_gradients`` adds the maps a backward pass makes: the gradient-weighted attention maps
    (:func:`ichpro.heatmaps.gradient_weighted_attention`) and Grad-CAM."""
    size = tuple(batch["ct"].shape[2:])
    per_model = []
    for model in run.models:
        maps = {name: v[0] for name, v in attention_volumes(forward(model, batch), size, None).items()}
        if with_gradients:
            maps.update({name: v[0] for name, v in gradient_weighted_attention(model, batch).items()})
            maps[GRAD_CAM] = grad_cam(model, batch)[0]
        per_model.append(maps)
    return {name: np.mean([_numpy(maps[name]) for maps in per_model], axis=0) for name in per_model[0]}


def localisation_table(run: TrainedRun, manifest: str | Path, patient_ids: Sequence[str] | None = None
                       ) -> pd.DataFrame:
    """:func:`attention_in_mask` of every map (each fusion attention map and Grad-CAM) of each patient.

    ``manifest`` needs a ``mask_path`` column (label mask: 1 haematoma, 2 intraventricular blood);
    the haematoma is its parenchymal part. One row per (patient_id, method) with the label and
    the four numbers; ``patient_ids`` picks patients (default: all).
    """
    manifest = Path(manifest)
    rows = load_manifest(manifest).set_index("patient_id", drop=False)
    if "mask_path" not in rows.columns:
        raise IchproError(f"manifest {manifest} has no mask_path column: localisation needs each "
                          "patient's haematoma mask")
    ids = list(rows.index if patient_ids is None else patient_ids)
    unknown = [pid for pid in ids if pid not in rows.index]
    if unknown:
        raise IchproError(f"patient {unknown[0]!r} is not in manifest {manifest}")
    records = []
    for pid in ids:
        row = rows.loc[pid]
        ct, blood = patient_volumes(row, run.profile.preprocess)
        brain = brain_of(ct[0])
        for method, heatmap in patient_maps(run, report_batch(run, ct, row["report"])).items():
            records.append({"patient_id": pid, "label": int(row["label"]), "method": method,
                            **attention_in_mask(heatmap, blood[0], brain)})
    return pd.DataFrame.from_records(records)


def localisation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of each measure per method (pointing_hit becomes the pointing-game hit rate)."""
    numbers = table.astype({"pointing_hit": float})
    return numbers.groupby("method")[list(MEASURES)].mean()


def localisation_statistics(table: pd.DataFrame) -> pd.DataFrame:
    """Per method, in the table's order: :func:`localisation_summary`'s means (``ratio``: the mean
    ratio; NaN ratios, of maps without mass in the brain, left out), ``pointing_hit_rate`` with its
    Clopper-Pearson 95 % CI (``pointing_ci_low``, ``pointing_ci_high``), ``n`` patients, the
    ``median_ratio``, the ``share_above_1`` of patients whose ratio beats a uniform map, and, where the
    table has them (:func:`localisation_baselines`), the median ``grid_ceiling`` and the mean
    ``pointing_chance``."""
    methods = list(dict.fromkeys(table["method"]))
    by_method = table.groupby("method", sort=False)
    extra = by_method.agg(n=("patient_id", "nunique"), median_ratio=("ratio", "median"),
                          share_above_1=("ratio", lambda r: float((r > 1).mean())))
    if {"grid_ceiling", "pointing_chance"} <= set(table.columns):
        extra = extra.join(by_method.agg(grid_ceiling=("grid_ceiling", "median"),
                                         pointing_chance=("pointing_chance", "mean")))
    hits = by_method["pointing_hit"].agg(["sum", "count"])
    ci = pd.DataFrame([binomial_ci(int(s), int(c)) for s, c in zip(hits["sum"], hits["count"])],
                      index=hits.index, columns=["pointing_ci_low", "pointing_ci_high"])
    summary = localisation_summary(table).join(extra).join(ci)
    return summary.rename(columns={"pointing_hit": "pointing_hit_rate"}).loc[methods]


def patient_volumes(record: Mapping, preprocess: PreprocessConfig, size: Sequence[int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A manifest record's CT (1, D, H, W) and blood shares (2, D, H, W: parenchymal haematoma,
    intraventricular blood) on a model's grid: the preprocessing with its label mask (``mask_path``),
    then, for a model that reads its CT at ``size`` (its ``ct_size``), the area resize that training
    applies after the preprocessing (:class:`ichpro.batches.BatchSource`)."""
    if pd.isna(record.get("mask_path")):
        raise IchproError(f"patient {record.get('patient_id')} has no mask_path: outlining and measuring "
                          "the haematoma needs each patient's label mask")
    data = preprocess_transforms(preprocess, with_blood=True)(
        {"ct": str(record["ct_path"]), "blood": str(record["mask_path"])})
    if size is None:
        return data["ct"], data["blood"]
    resize = Resize(tuple(size), mode="area")
    return tuple(torch.as_tensor(_numpy(resize(data[key]))) for key in ("ct", "blood"))


def patients_on_grid(manifest: pd.DataFrame, patient_ids: Sequence[str], preprocess: PreprocessConfig,
                     size: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`patient_volumes` of several patients of a manifest: CTs (B, 1, D, H, W) and blood shares
    (B, 2, D, H, W)."""
    rows = manifest.set_index(manifest["patient_id"].astype(str), drop=False)
    volumes = [patient_volumes(rows.loc[str(pid)], preprocess, size) for pid in patient_ids]
    return torch.stack([ct for ct, _ in volumes]), torch.stack([blood for _, blood in volumes])


def maps_in_mask(maps: Mapping[str, np.ndarray | torch.Tensor], cts: torch.Tensor, blood_share: torch.Tensor,
                 patient_ids: Sequence[str]) -> pd.DataFrame:
    """:func:`attention_in_mask` of each method's map of each patient, one row per (patient_id,
    method): ``maps`` method -> (B, D, H, W), on the grid of the CTs (B, 1, D, H, W) and of the
    haematoma shares (B, D, H, W). A map without mass in the brain (such as a Grad-CAM whose ReLU
    left nothing) has no peak: its ``pointing_hit`` is False, its ratio NaN."""
    brains = [brain_of(ct[0]) for ct in cts]
    records = []
    for method, heat in maps.items():
        for j, pid in enumerate(patient_ids):
            found = attention_in_mask(heat[j], blood_share[j], brains[j])
            found["pointing_hit"] = found["pointing_hit"] and not np.isnan(found["mass_inside"])
            records.append({"patient_id": pid, "method": method, **found})
    return pd.DataFrame.from_records(records)


def localisation_baselines(cts: torch.Tensor, blood_share: torch.Tensor, patient_ids: Sequence[str],
                           grids: Mapping[str, Sequence[int]]) -> pd.DataFrame:
    """What each method's map of each patient is read against, one row per (patient_id, method):
    :func:`pointing_chance` and the :func:`grid_ceiling` of the grid ``grids[method]`` the map is
    made on (:func:`map_grids`), on the grid of the CTs (B, 1, D, H, W) and haematoma shares
    (B, D, H, W) of :func:`patients_on_grid`."""
    records = []
    for ct, share, pid in zip(cts, blood_share, patient_ids):
        brain = brain_of(ct[0])
        chance = pointing_chance(share, brain)
        records += [{"patient_id": pid, "method": method, "pointing_chance": chance,
                     "grid_ceiling": grid_ceiling(share, brain, grid)} for method, grid in grids.items()]
    return pd.DataFrame.from_records(records)


def _blank_ct_batch(run: TrainedRun, report: str) -> dict[str, torch.Tensor]:
    """A model batch of a report with an all-zero CT of the run's input size."""
    return report_batch(run, torch.zeros(1, *run.profile.preprocess.spatial_size), report)


def map_grids(run: TrainedRun) -> dict[str, tuple[int, ...]]:
    """The grid each map of :func:`patient_maps` is made on before it is up-sampled to the input:
    each fusion attention map's key grid (its gradient-weighted map's too), and Grad-CAM's, the vision
    encoder's feature grid."""
    model = run.models[0]
    return {**model.fusion.map_grids,
            **{name + GRADIENT_WEIGHTED: grid for name, grid in model.fusion.map_grids.items()},
            GRAD_CAM: feature_grid(model, _blank_ct_batch(run, ""))}


def token_attention(run: TrainedRun, report: str) -> pd.Series:
    """The attention TRT's grid queries pay each token of a report, averaged over heads, grid cells
    and the run's fold models; index ``position:token``. It sums to 1: a token read no more than
    any other gets 1 / tokens."""
    batch = _blank_ct_batch(run, report)  # TRT reads only the report
    outputs = [forward(model, batch) for model in run.models]
    if outputs[0].token_attention is None:
        raise IchproError("this run's TRT has no token attention (positional TRT or a vision-only model)")
    read = torch.stack([out.token_attention[0].mean(dim=(0, 1)) for out in outputs]).mean(0)
    pieces = run.text.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    return pd.Series(read.numpy(), index=[f"{i}:{t}" for i, t in enumerate(pieces)])


# --------------------------------------------------------------------------------------------
# Counterfactual reports


def edit_report(report_text: str, **changes: object) -> str:
    """The report with some fields replaced (e.g. ``gcs=5``; ``None`` removes a field).

    The report is parsed and rendered back in the canonical style: other fields keep their values,
    unknown lines and the layout do not survive.
    """
    names = [f.name for f in fields(Report)]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise IchproError(f"unknown report field(s) {', '.join(unknown)}: use {', '.join(names)}")
    text = render(replace(parse(report_text), **changes))
    parse(text)
    return text


def _model_input(run: TrainedRun, ct: str | Path | torch.Tensor) -> torch.Tensor:
    """A preprocessed CT (1, D, H, W): given as such, or read from a path."""
    if isinstance(ct, torch.Tensor):
        return ct
    if not Path(ct).exists():
        raise IchproError(f"CT {ct} not found; give a NIfTI file, a DICOM series folder or the model input")
    return preprocess_transforms(run.profile.preprocess)({"ct": str(ct)})["ct"]


def _p_bad(run: TrainedRun, batch: Mapping[str, torch.Tensor]) -> float:
    """P(bad outcome), the mean over the run's fold models."""
    return float(np.mean(run.p_bad_per_fold([forward(m, batch) for m in run.models])))


def counterfactual(run: TrainedRun, ct: str | Path | torch.Tensor, report: str,
                   changes: Mapping[str, object], with_gradients: bool = False) -> dict[str, object]:
    """P(bad) and attention maps of one CT with its report before and after :func:`edit_report`.

    ``ct`` is a CT path or the preprocessed input (1, D, H, W); ``report`` the text or a file. The
    "before" report is the original re-rendered canonically, so only ``changes`` differ. Returns
    report_before/after, p_bad_before/after, attention_before/after (name -> (D, H, W); with the
    gradient-weighted maps and Grad-CAM when ``with_gradients``, :func:`patient_maps`).
    """
    image = _model_input(run, ct)
    before = edit_report(read_report(report))
    after = edit_report(before, **changes)
    result: dict[str, object] = {"report_before": before, "report_after": after}
    for when, text in (("before", before), ("after", after)):
        batch = report_batch(run, image, text)
        result[f"p_bad_{when}"] = _p_bad(run, batch)
        result[f"attention_{when}"] = patient_maps(run, batch, with_gradients=with_gradients)
    return result


def counterfactual_table(run: TrainedRun, manifest: pd.DataFrame, oof: pd.DataFrame,
                         patient_ids: Sequence[str], changes: Mapping[str, object],
                         truth: pd.DataFrame | None = None) -> pd.DataFrame:
    """P(bad) before and after editing each patient's report, from that patient's own out-of-fold model.

    ``oof`` (a run's ``oof_predictions.csv``) gives each patient's test fold, whose model never saw
    the patient; ``run.models`` are in fold order. With the cohort's ``truth`` (synthetic data),
    ``oracle_p_before`` / ``oracle_p_after`` are the generator's exact P(bad) from the patient's true
    variables, then with ``changes`` applied to them (:data:`ichpro.cohort.OUTCOME_MODEL`).
    """
    fold_of = oof.assign(patient_id=oof["patient_id"].astype(str)).set_index("patient_id")["fold"]
    rows = manifest.assign(patient_id=manifest["patient_id"].astype(str)).set_index("patient_id")
    records = []
    for pid in patient_ids:
        own = run.fold(int(fold_of[pid]))
        result = counterfactual(own, rows.loc[pid, "ct_path"], rows.loc[pid, "report"], changes)
        records.append({"patient_id": pid, "fold": int(fold_of[pid]), "p_before": result["p_bad_before"],
                        "p_after": result["p_bad_after"]})
    table = pd.DataFrame(records)
    if truth is not None:
        true = truth.assign(patient_id=truth["patient_id"].astype(str)).set_index("patient_id")
        true = true.loc[table["patient_id"]]
        table["oracle_p_before"] = OUTCOME_MODEL.p_bad(true)
        table["oracle_p_after"] = OUTCOME_MODEL.p_bad(true.assign(**changes))
    return table


# --------------------------------------------------------------------------------------------
# Back to the original CT


def to_original_grid(volume: np.ndarray | torch.Tensor, ct_path: str | Path,
                     preprocess: PreprocessConfig) -> np.ndarray:
    """A map on the model grid (D, H, W) moved onto the CT's own voxel grid (the array as read from
    the file, before any reorientation).

    The CT is preprocessed again, keeping MONAI's record of its spatial steps; the map then goes
    through their inverses in reverse order (resize back with the forward's area mode, model axes
    back to RAS, zero padding where the crop to the brain cut, the stored orientation).
    """
    steps = preprocess_steps(preprocess)
    data: dict = {"ct": str(ct_path)}
    for name, step in steps.items():
        if name != "to_tensor":
            data = step(data)
    image = data["ct"]
    volume = torch.as_tensor(_numpy(volume), dtype=torch.float32)
    if tuple(volume.shape) != tuple(image.shape[1:]):
        raise IchproError(f"the map has shape {tuple(volume.shape)}, not the model grid "
                          f"{tuple(image.shape[1:])} of this preprocessing")
    # each operation is recorded by the array transform inside a dictionary step
    recorded = {id(t): t for step in steps.values() for t in vars(step).values()
                if isinstance(t, InvertibleTransform)}
    moved = MetaTensor(volume[None], affine=image.affine, applied_operations=list(image.applied_operations))
    for operation in reversed(image.applied_operations):
        moved = recorded[operation[TraceKeys.ID]].inverse(moved)
    return moved[0].numpy()
