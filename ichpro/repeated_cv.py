"""Comparing two table rows over repeated cross-validation: r seeds × k folds on the same patients.

The k × r per-fold AUC differences of two rows are not independent (the training sets overlap), so a
plain t-test over them is far too confident. The corrected repeated k-fold t-test (Nadeau & Bengio
2003; Bouckaert & Frank 2004) widens the variance of their mean by the ratio of test to training
patients::

    se = sqrt((1 / (k r) + n_test / n_train) * var(d)),   t = mean(d) / se,   df = k r - 1

with ``var`` the sample variance (ddof 1); the 95 % interval is ``mean ± t(0.975, df) * se``. Within
a table the p-values are Holm-adjusted (Holm 1979). :func:`call_difference` is the one rule every
reading uses: a difference is *real* when its adjusted p is below 0.05, two rows are *equivalent*
when the 95 % interval lies within ±0.02 AUC, and otherwise the difference is *not established*.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ichpro.errors import IchproError
from ichpro.metrics import classification_metrics, delong_test

ALPHA = 0.05
EQUIVALENCE_MARGIN = 0.02  # AUC


def fold_differences(a: dict[int, pd.DataFrame], b: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Per seed and test fold, the AUCs of two rows' out-of-fold predictions (``seed -> table`` with
    ``patient_id``, ``fold``, ``label``, ``p_bad``) on the same patients, and ``difference = a - b``.
    Both rows must hold the same seeds, and per seed the same patients in the same folds.
    ``n_train`` counts the patients outside the test fold (training and inner validation)."""
    if sorted(a) != sorted(b):
        raise IchproError(f"the rows were trained with different seeds: {sorted(a)} and {sorted(b)}")
    lines = []
    for seed in sorted(a):
        first = a[seed].set_index("patient_id").sort_index()
        second = b[seed].set_index("patient_id").sort_index()
        if not first.index.equals(second.index) or not first["fold"].equals(second["fold"]):
            raise IchproError(f"seed {seed}: the two rows' test folds hold different patients")
        for fold, part in first.groupby("fold"):
            other = second.loc[part.index]
            auc_a = classification_metrics(part["label"], part["p_bad"])["auc"]
            auc_b = classification_metrics(part["label"], other["p_bad"])["auc"]
            lines.append({"seed": seed, "fold": fold, "auc_a": auc_a, "auc_b": auc_b,
                          "difference": auc_a - auc_b, "n_test": len(part),
                          "n_train": len(first) - len(part)})
    return pd.DataFrame(lines)


def corrected_t_test(differences, test_to_train: float) -> dict[str, float]:
    """The corrected repeated k-fold t-test of per-fold ``differences`` (k × r of them) with the ratio
    ``n_test / n_train`` of one fold: ``mean``, ``ci_low``, ``ci_high`` (95 %), ``t``, ``df``, ``p``."""
    d = np.asarray(differences, dtype=float)
    if d.size < 2 or not np.isfinite(d).all():
        raise IchproError(f"the corrected t-test needs at least two finite differences, got {d.tolist()}")
    mean, df = float(d.mean()), d.size - 1
    se = float(np.sqrt((1 / d.size + test_to_train) * d.var(ddof=1)))
    if se == 0:
        t, p = (0.0, 1.0) if mean == 0 else (float(np.copysign(np.inf, mean)), 0.0)
    else:
        t = mean / se
        p = float(2 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(1 - ALPHA / 2, df)) * se
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "t": t, "df": df, "p": p}


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (same order as given; NaN stays NaN)."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    order = present[np.argsort(p[present], kind="stable")]
    m = order.size
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def call_difference(p_adjusted: float, ci_low: float, ci_high: float,
                    margin: float = EQUIVALENCE_MARGIN) -> str:
    """``"real"`` (adjusted p < 0.05), ``"equivalent"`` (the 95 % interval within ±``margin``) or
    ``"not established"``."""
    if p_adjusted < ALPHA:
        return "real"
    if -margin < ci_low and ci_high < margin:
        return "equivalent"
    return "not established"


def compare_over_seeds(a: dict[int, pd.DataFrame], b: dict[int, pd.DataFrame]) -> dict[str, float]:
    """Row ``a`` against row ``b``: the corrected test of their per-fold AUC differences, the range of
    the seeds' mean differences, and the median of the per-seed pooled DeLong p-values."""
    folds = fold_differences(a, b)
    ratio = float((folds["n_test"] / folds["n_train"]).mean())
    result = corrected_t_test(folds["difference"], ratio)
    per_seed = folds.groupby("seed")["difference"].mean()
    delong = []
    for seed in sorted(a):
        first = a[seed].sort_values("patient_id")
        second = b[seed].set_index("patient_id").loc[first["patient_id"], "p_bad"]
        delong.append(delong_test(first["label"], first["p_bad"], second.to_numpy())[2])
    return {**result, "n_seeds": len(a), "seed_mean_min": float(per_seed.min()),
            "seed_mean_max": float(per_seed.max()), "delong_p_median": float(np.median(delong))}
