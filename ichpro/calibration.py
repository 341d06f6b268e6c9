"""P(bad outcome) from a model's two logits, optionally recalibrated per fold (Platt scaling), and
how well calibrated a model's probabilities are.

Every table's AUC is *pooled*: the five test folds' predictions, each from its own fold model, are
ranked together. A fold model whose probabilities are shifted as a whole then loses AUC even when it
ranks its own patients well. Platt scaling (Platt 1999) maps a fold model's margin
``m = logit_bad - logit_good`` to ``P(bad) = sigmoid(slope * m + intercept)``, the two numbers
fitted on the fold's inner validation split (never on its test fold), so that every fold's
probabilities mean the same. The slope is kept non-negative: a recalibration never reverses a
model's ranking. Without recalibration (:data:`IDENTITY`), ``P(bad) = sigmoid(m)``, the softmax.

Calibration is measured as Van Calster et al. (J Clin Epidemiol 2016; BMC Med 2019) describe it, on
``z = logit(P(bad))`` (probabilities clipped to [1e-6, 1 - 1e-6]):

* **calibration-in-the-large** (CITL): ``a`` of ``logit P(y = 1) = a + z`` (z an offset); 0 when the
  mean risk is right, > 0 when the model under-predicts;
* **calibration slope and intercept**: ``b`` and ``a`` of the logistic recalibration
  ``logit P(y = 1) = a + b z``; a slope below 1 means predictions too extreme (overfitting);
* **Brier** ``mean((p - y)²)`` and the **scaled Brier** ``1 - Brier / (φ (1 - φ))`` (φ the
  observed rate: 0 for a model that predicts φ for everyone, 1 for a perfect one);
* the **smoothed calibration curve**: a logistic regression of the outcome on a cubic B-spline of
  ``z`` (scikit-learn's ``SplineTransformer``, knots at quantiles), read on a grid of predicted risks.

For r runs on the same patients (seeds of repeated cross-validation) each measure is the mean over
the runs, with a percentile interval over patient resamples shared by every run, as
:func:`ichpro.metrics.metrics_over_seeds` does for discrimination; the resamples are not stratified,
so that the outcome rate, which calibration-in-the-large depends on, varies between them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize
from scipy.special import expit, log_expit, logit
from sklearn.preprocessing import SplineTransformer

from ichpro.metrics import bootstrap_indices, percentile_ci, runs_on_patients


def margin(logits: torch.Tensor) -> torch.Tensor:
    """``logit_bad - logit_good`` of (B, 2) logits: the log-odds of a bad outcome, in at least
    float32 (autocast logits may be bf16)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits[:, 1] - logits[:, 0]


@dataclass(frozen=True)
class PlattScaling:
    """``P(bad) = sigmoid(slope * margin + intercept)``."""

    slope: float = 1.0
    intercept: float = 0.0

    @classmethod
    def fit(cls, margins: np.ndarray, labels: np.ndarray) -> PlattScaling:
        """Maximum likelihood on (margin, label) pairs with Platt's smoothed targets
        ``(n_bad + 1) / (n_bad + 2)`` and ``1 / (n_good + 2)``, which keep the fit finite when the
        margins separate the labels; slope constrained to ``>= 0``."""
        m = np.asarray(margins, dtype=float)
        y = np.asarray(labels, dtype=float)
        n_bad = y.sum()
        target = np.where(y == 1, (n_bad + 1) / (n_bad + 2), 1 / (y.size - n_bad + 2))

        def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
            z = params[0] * m + params[1]
            value = -np.sum(target * log_expit(z) + (1 - target) * log_expit(-z))
            residual = expit(z) - target
            return value, np.array([residual @ m, residual.sum()])

        fitted = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                          bounds=[(0.0, None), (None, None)])
        return cls(float(fitted.x[0]), float(fitted.x[1]))

    def p_bad(self, margins: np.ndarray) -> np.ndarray:
        """P(bad outcome) of margins (:func:`margin`)."""
        return expit(self.slope * np.asarray(margins, dtype=float) + self.intercept)

    @classmethod
    def load(cls, path: Path) -> PlattScaling:
        """The scaling saved at ``path``; :data:`IDENTITY` when the run was not recalibrated."""
        path = Path(path)
        return cls(**json.loads(path.read_text())) if path.is_file() else IDENTITY


IDENTITY = PlattScaling()


# --------------------------------------------------------------------------- measuring calibration
CALIBRATION_MEASURES = ("citl", "slope", "intercept", "brier", "scaled_brier", "mean_predicted", "observed")
_CLIP = 1e-6


def _logistic_fit(x: np.ndarray, y: np.ndarray, offset: np.ndarray | float = 0.0, iterations: int = 50,
                  ridge: float = 1e-8, tolerance: float = 1e-10) -> np.ndarray:
    """Maximum-likelihood coefficients (r, k) of r logistic regressions at once: ``x`` (r, n, k),
    ``y`` and ``offset`` (r, n); Newton-Raphson with a vanishing ridge that keeps it finite."""
    beta = np.zeros(x.shape[::2])
    eye = ridge * np.eye(x.shape[2])
    xt = x.transpose(0, 2, 1)
    for _ in range(iterations):
        mu = expit((x @ beta[..., None])[..., 0] + offset)
        grad = (xt @ (y - mu)[..., None])[..., 0] - ridge * beta
        hess = (xt * (mu * (1 - mu))[:, None, :]) @ x + eye
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        beta = beta + step
        if np.abs(step).max() < tolerance:
            break
    return beta


def calibration_rows(y: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """:data:`CALIBRATION_MEASURES` of each row of (r, n) labels and probabilities."""
    z = logit(np.clip(p, _CLIP, 1 - _CLIP))
    slope_fit = _logistic_fit(np.stack([np.ones_like(z), z], axis=-1), y)
    citl = _logistic_fit(np.ones_like(z)[..., None], y, offset=z)[:, 0]
    observed = y.mean(axis=1)
    brier = ((p - y) ** 2).mean(axis=1)
    return {"citl": citl, "slope": slope_fit[:, 1], "intercept": slope_fit[:, 0], "brier": brier,
            "scaled_brier": 1 - brier / (observed * (1 - observed)), "mean_predicted": p.mean(axis=1),
            "observed": observed}


def calibration_table(labels, p_bad_by_seed, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> pd.DataFrame:
    """One row per :data:`CALIBRATION_MEASURES` entry: ``value`` (mean over the runs), ``ci_low``,
    ``ci_high`` (patient bootstrap of that mean), ``seed_min``, ``seed_max``, ``n_seeds``."""
    y, runs = runs_on_patients(labels, p_bad_by_seed)
    index = bootstrap_indices(y, n_boot, seed, stratified=False)
    point = [calibration_rows(y[None], p[None]) for p in runs]
    boot = [calibration_rows(y[index], p[index]) for p in runs]
    rows = []
    for name in CALIBRATION_MEASURES:
        values = np.array([run[name][0] for run in point])
        rows.append((name, float(values.mean()),
                     *percentile_ci(np.mean([b[name] for b in boot], axis=0), level),
                     float(values.min()), float(values.max()), values.size))
    return pd.DataFrame(rows, columns=["measure", "value", "ci_low", "ci_high", "seed_min", "seed_max",
                                       "n_seeds"])


def smoothed_calibration(labels, p_bad_by_seed, points: int = 50, n_boot: int = 200, seed: int = 0,
                         level: float = 0.95, knots: int = 4) -> pd.DataFrame:
    """The smoothed calibration curve (mean over the runs) on ``points`` predicted risks between the
    runs' 2nd and 98th percentiles: ``predicted``, ``observed``, ``ci_low``, ``ci_high``."""
    y, runs = runs_on_patients(labels, p_bad_by_seed)
    z = logit(np.clip(runs, _CLIP, 1 - _CLIP))
    grid = np.linspace(*np.percentile(runs, [2, 98]), points)
    index = bootstrap_indices(y, n_boot, seed, stratified=False)
    curves, bands = [], []
    for z_run in z:
        spline = SplineTransformer(n_knots=knots, degree=3, knots="quantile", extrapolation="linear")
        basis, on_grid = spline.fit_transform(z_run[:, None]), spline.transform(logit(grid)[:, None])
        fits = _logistic_fit(np.concatenate([basis[None], basis[index]]), np.concatenate([y[None], y[index]]))
        risks = expit(fits @ on_grid.T)
        curves.append(risks[0])
        bands.append(risks[1:])
    low, high = np.percentile(np.mean(bands, axis=0), [50 * (1 - level), 50 * (1 + level)], axis=0)
    return pd.DataFrame({"predicted": grid, "observed": np.mean(curves, axis=0), "ci_low": low,
                         "ci_high": high})
