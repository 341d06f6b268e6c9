"""Predict one patient with a trained run: the average of its fold models, plus a heat map.

A run folder (written by ``ichpro train``) is self-contained: ``run.json`` holds the config and
seed, ``text_encoder/`` the tiny encoder when one was used, ``fold{k}/best.safetensors`` each fold's
selected weights (with what the model fitted on its training patients, such as a comparator's
clinical standardization) and ``fold{k}/calibration.json`` its recalibration
(:mod:`ichpro.calibration`). Frozen encoders are rebuilt exactly as in training (same seed, same
weights file). Every trainable model predicts: ICHPro and the comparators alike.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd
import torch

from ichpro.batches import BatchSource
from ichpro.calibration import IDENTITY, PlattScaling, margin
from ichpro.checkpoints import load_weights
from ichpro.clinical import CLINICAL_BASELINES
from ichpro.config import Profile, profile_from_dict
from ichpro.errors import IchproError
from ichpro.heatmaps import GRAD_CAM, choose_heatmap, describe_heatmap, heatmap
from ichpro.manifest import ct_problem, normalised, report_problem, report_text
from ichpro.models import ICHPro, ModelOutput, PrognosisModel
from ichpro.plots import save_figure
from ichpro.reports import field_status
from ichpro.text import TextBackbone, load_text_backbone
from ichpro.train import CALIBRATION_FILE, encoders_profile, fresh_model

REPORT_SUFFIXES = (".txt", ".md", ".rtf", ".text", ".doc", ".docx")


@dataclass
class TrainedRun:
    """A run's profile, its text encoder and one model per fold (in eval mode), each with the
    recalibration of its P(bad) (none given: the softmax), and the run's seed."""

    profile: Profile
    text: TextBackbone
    models: list[PrognosisModel]
    calibrations: list[PlattScaling] = field(default_factory=list)
    seed: int = 0

    def fold(self, k: int) -> TrainedRun:
        """The run reduced to its ``k``-th fold model."""
        return replace(self, models=self.models[k:k + 1], calibrations=self.calibrations[k:k + 1])

    def p_bad_per_fold(self, outputs: Sequence[ModelOutput]) -> list[float]:
        """P(bad outcome) of the first patient from each fold model's output (in fold order)."""
        scalings = self.calibrations or [IDENTITY] * len(self.models)
        return [float(s.p_bad(margin(out.logits[:1]).numpy())[0])
                for out, s in zip(outputs, scalings, strict=True)]


@dataclass
class Prediction:
    """One patient's prediction."""

    p_bad: float  # mean over the fold models
    p_bad_per_fold: list[float]
    ct: np.ndarray  # the preprocessed model input (D, H, W)
    heatmap: np.ndarray | None  # on the input grid (D, H, W), mean over the fold models; None if not asked
    heatmap_name: str  # its kind (:func:`ichpro.heatmaps.heatmap_kinds`), or "" when none was drawn
    report_fields: dict[str, str]  # each expected report field: "given", "missing" or "unreadable"


def load_run(run_dir: str | Path) -> TrainedRun:
    """Load a finished (or partly finished) run: every fold with a selected checkpoint."""
    run_dir = Path(run_dir)
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        raise IchproError(f"{run_dir} is not a run folder (no run.json); train one with ichpro train")
    record = json.loads(record_path.read_text())
    profile, seed = profile_from_dict(record["config"]), record["seed"]
    if profile.model.comparator in CLINICAL_BASELINES:
        raise IchproError(f"{run_dir} holds the clinical baseline {profile.model.comparator!r}: its "
                          "out-of-fold predictions are all there is (no model to load)")
    text = load_text_backbone(profile.model.text_encoder, save_dir=run_dir / "text_encoder", seed=seed)
    checkpoints = sorted(run_dir.glob("fold*/best.safetensors"))
    if not checkpoints:
        raise IchproError(f"{run_dir} has no trained fold yet (no fold*/best.safetensors)")
    models = []
    for path in checkpoints:
        model = fresh_model(profile, text, seed)
        load_weights(path, model)
        models.append(model.eval())
    calibrations = [PlattScaling.load(path.with_name(CALIBRATION_FILE)) for path in checkpoints]
    return TrainedRun(profile, text, models, calibrations, seed)


def _report_record(report: str) -> dict[str, str]:
    """``{"report": text}`` or ``{"report_path": file}``: a file that exists, or a single word that
    looks like a file name (a folder separator or a suffix such as ``.txt``), is a report file."""
    looks_like_path = len(report.split()) == 1 and ("/" in report or "\\" in report
                                                     or Path(report).suffix.lower() in REPORT_SUFFIXES)
    is_file = len(report) < 4096 and Path(report).is_file()
    return {"report_path" if is_file or looks_like_path else "report": report}


def read_report(report: str) -> str:
    """The report text: ``report`` itself or the file it names, checked as ``ichpro validate`` checks it."""
    record = _report_record(report)
    problem = _report_problem(record)
    if problem:
        raise IchproError(problem)
    return report_text(record, Path.cwd())


def _report_problem(record: dict[str, str]) -> str | None:
    if not next(iter(record.values())).strip():
        return "the report is empty: give the report's text, or a text file holding it."
    return report_problem(record, Path.cwd())


def patient_manifest(ct_path: str | Path, report: str) -> pd.DataFrame:
    """The one-row manifest of a patient to predict, checked as ``ichpro validate`` checks a manifest."""
    report_fields = _report_record(report)
    problems = [p for p in (ct_problem(ct_path, Path.cwd()), _report_problem(report_fields)) if p]
    record = {"patient_id": "patient", "ct_path": str(ct_path), "label": "0", **report_fields}
    if problems:
        raise IchproError("cannot predict: " + " ".join(problems))
    return normalised(pd.DataFrame([record]), Path.cwd())


def patient_batch(run: TrainedRun, manifest: pd.DataFrame) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The batch of a :func:`patient_manifest` as the run's models read it, made as in training
    (:class:`~ichpro.batches.BatchSource`), and the preprocessed CT (1, 1, D, H, W)."""
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="ichpro-predict-") as cache:  # the CT is preprocessed once
        source = BatchSource(manifest, run.profile, run.text, cache_dir=Path(cache))
        source.prepare(run.models[0], lambda: fresh_model(encoders_profile(run.profile), run.text, run.seed),
                       cpu, run.seed, with_targets=False, quiet=True)
        return source.batch([0], cpu), source.cts([0])


@torch.no_grad()
def predict_patient(run: TrainedRun, ct_path: str | Path, report: str, with_heatmap: bool = True,
                    heatmap_kind: str | None = None) -> Prediction:
    """P(bad outcome) of one patient (CT file or DICOM folder + report text or file) and, with
    ``with_heatmap``, the heat map ``heatmap_kind`` (:mod:`ichpro.heatmaps`; None: the model's
    default) averaged over the fold models."""
    manifest = patient_manifest(ct_path, report)
    batch, ct = patient_batch(run, manifest)
    outputs = [model(batch) for model in run.models]
    volume, kind = None, ""
    if with_heatmap:
        # from the CT, not its cached features: Grad-CAM weighs the encoder
        if isinstance(run.models[0], ICHPro):
            batch = {**{k: v for k, v in batch.items() if k != "vision_features"}, "ct": ct}
        kind = choose_heatmap(run.models[0], batch, heatmap_kind)
        with torch.enable_grad():
            volume = np.mean([heatmap(model, batch, kind, tuple(ct.shape[2:]))[0].numpy()
                              for model in run.models], axis=0)
    per_fold = run.p_bad_per_fold(outputs)
    return Prediction(float(np.mean(per_fold)), per_fold, ct[0, 0].numpy(), volume, kind,
                      field_status(manifest["report"].iloc[0]))


def save_heatmap(prediction: Prediction, out_prefix: Path) -> tuple[Path, Path]:
    """Write the heat map as NIfTI (model-input grid, 1 mm voxels) and a PNG overlay of its strongest
    slice, titled with the map's kind: ``<prefix>_<kind>.nii.gz`` and ``.png``."""
    if prediction.heatmap is None:
        raise IchproError("no heat map to save: predict with a heat map kind")
    kind = prediction.heatmap_name
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    nifti = out_prefix.with_name(f"{out_prefix.name}_{kind}.nii.gz")
    # model axes (D, H, W) = (superior, posterior, left): store as (x, y, z) = (W, H, D)
    nib.save(nib.Nifti1Image(prediction.heatmap.transpose(2, 1, 0).astype(np.float32), np.eye(4)), nifti)
    k = int(prediction.heatmap.sum(axis=(1, 2)).argmax())
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(prediction.ct[k], cmap="gray", vmin=0, vmax=0.25)
    if kind == GRAD_CAM:  # in [0, 1], 1 at the patient's maximum
        ax.imshow(prediction.heatmap[k], cmap="inferno", vmin=0, vmax=1, alpha=0.5)
        scale = "1 = its maximum"
    else:  # shares of attention: 1 = uniform
        ax.imshow(prediction.heatmap[k] / prediction.heatmap.mean(), cmap="coolwarm", vmin=0, vmax=2,
                  alpha=0.5)
        scale = "1 = uniform"
    ax.set_title(f"P(bad) {prediction.p_bad:.2f}; {describe_heatmap(kind)}\n(slice {k}; {scale})", fontsize=8)
    ax.axis("off")
    png = save_figure(fig, out_prefix.with_name(f"{out_prefix.name}_{kind}.png"))
    return nifti, png
