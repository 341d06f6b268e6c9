"""P(bad outcome) from a model's two logits, optionally recalibrated per fold (Platt scaling).

Every table's AUC is *pooled*: the five test folds' predictions, each from its own fold model, are
ranked together. A fold model whose probabilities are shifted as a whole then loses AUC even when it
ranks its own patients well. Platt scaling (Platt 1999) maps a fold model's margin
``m = logit_bad - logit_good`` to ``P(bad) = sigmoid(slope * m + intercept)``, the two numbers
fitted on the fold's inner validation split (never on its test fold), so that every fold's
probabilities mean the same. The slope is kept non-negative: a recalibration never reverses a
model's ranking. Without recalibration (:data:`IDENTITY`), ``P(bad) = sigmoid(m)``, the softmax.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit, log_expit


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
