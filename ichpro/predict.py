"""Predict one patient with a trained run: the average of its fold models, plus an attention map.

A run folder (written by ``ichpro train``) is self-contained: ``run.json`` holds the config and
seed, ``text_encoder/`` the tiny encoder when one was used, ``fold{k}/best.safetensors`` each fold's
selected weights and ``fold{k}/calibration.json`` its recalibration (:mod:`ichpro.calibration`).
Frozen encoders are rebuilt exactly as in training (same seed, same weights file).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ichpro.calibration import IDENTITY, PlattScaling, margin
from ichpro.config import Profile, profile_from_dict
from ichpro.data import preprocess_transforms
from ichpro.errors import IchproError
from ichpro.models import ICHPro
from ichpro.models.ichpro import ICHProOutput
from ichpro.text import TextBackbone, load_text_backbone, tokenize
from ichpro.train import CALIBRATION_FILE, fresh_model, load_weights


@dataclass
class TrainedRun:
    """A run's profile, its text encoder and one model per fold (in eval mode), each with the
    recalibration of its P(bad) (none given: the softmax)."""

    profile: Profile
    text: TextBackbone
    models: list[ICHPro]
    calibrations: list[PlattScaling] = field(default_factory=list)

    def fold(self, k: int) -> TrainedRun:
        """The run reduced to its ``k``-th fold model."""
        return replace(self, models=self.models[k:k + 1], calibrations=self.calibrations[k:k + 1])

    def p_bad_per_fold(self, outputs: Sequence[ICHProOutput]) -> list[float]:
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
    attention: np.ndarray | None  # each voxel's grid-cell share of attention, on the input grid (D, H, W)


def load_run(run_dir: str | Path) -> TrainedRun:
    """Load a finished (or partly finished) run: every fold with a selected checkpoint."""
    run_dir = Path(run_dir)
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        raise IchproError(f"{run_dir} is not a run folder (no run.json); train one with ichpro train")
    record = json.loads(record_path.read_text())
    profile, seed = profile_from_dict(record["config"]), record["seed"]
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
    return TrainedRun(profile, text, models, calibrations)


def read_report(report: str) -> str:
    """The report text: the argument itself, or the contents of the file it names."""
    path = Path(report)
    text = path.read_text() if len(report) < 4096 and path.is_file() else report
    if not text.strip():
        raise IchproError("the report is empty; pass the report text or a file holding it")
    return text


@torch.no_grad()
def predict_patient(run: TrainedRun, ct_path: str | Path, report: str,
                    attention_map: str = "stage1_cmaf_text_to_vision") -> Prediction:
    """P(bad outcome) of one patient (CT file or DICOM folder + report text or file)."""
    if not Path(ct_path).exists():
        raise IchproError(f"CT {ct_path} not found; give a NIfTI file or a DICOM series folder")
    ct = preprocess_transforms(run.profile.preprocess)({"ct": str(ct_path)})["ct"]
    batch = tokenize(run.text.tokenizer, [read_report(report)], run.profile.model.max_tokens)
    batch["ct"] = ct[None]
    outputs = [model(**batch) for model in run.models]
    per_fold = run.p_bad_per_fold(outputs)
    attention = None
    if attention_map in outputs[0].attentions:
        size = tuple(ct.shape[1:])
        attention = np.mean([out.attention_volume(attention_map, size)[0].numpy() for out in outputs],
                            axis=0)
    return Prediction(float(np.mean(per_fold)), per_fold, ct[0].numpy(), attention)


def save_heatmap(prediction: Prediction, out_prefix: Path) -> tuple[Path, Path]:
    """Write the attention map as NIfTI (model-input grid, 1 mm voxels) and a PNG overlay."""
    import matplotlib.pyplot as plt
    import nibabel as nib

    from ichpro.plots import save_figure

    if prediction.attention is None:
        raise IchproError("this model has no such attention map; choose one of the fusion's maps")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    nifti = out_prefix.with_name(out_prefix.name + "_attention.nii.gz")
    # model axes (D, H, W) = (superior, posterior, left): store as (x, y, z) = (W, H, D)
    nib.save(nib.Nifti1Image(prediction.attention.transpose(2, 1, 0).astype(np.float32), np.eye(4)),
             nifti)
    k = int(prediction.attention.sum(axis=(1, 2)).argmax())
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(prediction.ct[k], cmap="gray", vmin=0, vmax=0.25)
    attention = prediction.attention[k] / prediction.attention.mean()
    ax.imshow(attention, cmap="coolwarm", vmin=0, vmax=2, alpha=0.5)
    ax.set_title(f"P(bad) {prediction.p_bad:.2f}; attention / uniform, slice {k}", fontsize=9)
    ax.axis("off")
    png = save_figure(fig, out_prefix.with_name(out_prefix.name + "_attention.png"))
    return nifti, png
