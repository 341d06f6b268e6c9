"""Evaluation metrics for binary ICH prognosis (label 1 = bad outcome, 0 = good; models give p_bad).

Conventions
-----------
* A patient is *predicted bad* when ``p_bad > threshold`` (strict, like the argmax of a two-class
  softmax and scikit-learn's ``predict``: a tie at 0.5 is called good).
* **Pooled metrics.** With cross-validation, every metric is computed once on the pooled
  out-of-fold predictions. In particular F1 is computed *from pooled recall and precision, as the
  paper*: ``F1 = 2 P R / (P + R)`` with P and R of the pooled predictions (identical to
  scikit-learn's ``f1_score`` on the pooled predictions). It is **not** the mean of per-fold F1s,
  which differs in general (see ``tests/test_metrics.py``).
* **Degenerate cases** follow scikit-learn with ``zero_division=0``: no predicted positives gives
  precision 0 (and F1 0), silently; recall or specificity of an absent class is 0 and balanced
  accuracy then averages the recall of the classes present. With a single class in ``labels``
  the ROC AUC is undefined and returned as NaN (not an exception).
* **Brier score** ``mean((p_bad - y)^2)``.
* **Expected calibration error** with B = 10 equal-width bins ``[k/B, (k+1)/B)`` (the last one
  closed), weighted by bin counts:
  ``ECE = sum_b (n_b / n) |mean(p_bad in b) - mean(y in b)| = sum_b |sum_b p_bad - sum_b y| / n``.
* **Bootstrap CIs** are percentile intervals over patients, resampled *stratified* (positives and
  negatives separately, with their counts fixed) so that every replicate has both classes; one set
  of replicate indices is drawn with ``np.random.default_rng(seed)`` and shared by all metrics.
  All named metrics are computed by one vectorised implementation (pinned to scikit-learn by the
  tests), so point estimates and bootstrap replicates agree by construction. A callable metric
  ``f(labels, p_bad) -> float`` is evaluated replicate by replicate (``threshold`` is then unused).
* **DeLong test** (DeLong, DeLong & Clarke-Pearson 1988) for two correlated AUCs on the same
  patients, in the O(n log n) midrank form of Sun & Xu (2014). For m positives X and n negatives Y,
  with ``psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise``, each model r has structural components
  ``V10_r(X_i) = mean_j psi(X_i, Y_j)`` and ``V01_r(Y_j) = mean_i psi(X_i, Y_j)``; the AUC is their
  mean. With S10 and S01 the 2 x 2 sample covariance matrices (ddof 1) of the components,
  ``S = S10 / m + S01 / n``, ``Var(AUC_a - AUC_b) = S_aa + S_bb - 2 S_ab``,
  ``z = (AUC_a - AUC_b) / sqrt(Var)`` and the two-sided ``p = 2 (1 - Phi(|z|))``. The components come
  from midranks: ``V10(X_i) = (rank_Z(X_i) - rank_X(X_i)) / n`` and
  ``V01(Y_j) = 1 - (rank_Z(Y_j) - rank_Y(Y_j)) / m`` with Z = X + Y pooled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata

from ichpro.errors import IchproError

METRICS = ("accuracy", "recall", "precision", "f1", "auc", "balanced_accuracy", "specificity", "brier", "ece")
ECE_BINS = 10
_CHUNK_CELLS = 2_000_000  # bootstrap replicates are evaluated in blocks of ~this many (replicate, patient)

MetricFn = Callable[[np.ndarray, np.ndarray], float]


# --------------------------------------------------------------------------- validation
def _labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise IchproError(f"labels must be a non-empty 1-D array; got shape {y.shape}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise IchproError(f"labels must be 0 (good) or 1 (bad); found {sorted(set(y[bad].tolist()))[:5]}")
    return y.astype(np.int8)


def _scores(p, name: str, n: int, probabilities: bool = True) -> np.ndarray:
    try:
        s = np.asarray(p, dtype=float)
    except (TypeError, ValueError) as exc:
        raise IchproError(f"{name} must be numeric: {exc}") from None
    if s.ndim != 1 or s.size != n:
        raise IchproError(f"{name} must be a 1-D array as long as labels ({n}); got shape {s.shape}")
    finite = np.isfinite(s)
    if not finite.all():
        raise IchproError(f"{name} must be finite; {(~finite).sum()} values are NaN or infinite "
                          f"(first at index {np.argmin(finite)})")
    if probabilities and (s.min() < 0 or s.max() > 1):
        raise IchproError(f"{name} must lie in [0, 1] (probabilities, not logits); "
                          f"found min {s.min():.4g}, max {s.max():.4g}")
    return s


def _inputs(labels, p_bad) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(labels)
    return y, _scores(p_bad, "p_bad", y.size)


def runs_on_patients(labels, p_bad_by_seed) -> tuple[np.ndarray, np.ndarray]:
    """Checked labels and the (r, n) P(bad) of r runs (seeds) on the same n patients."""
    y = _labels(labels)
    runs = np.atleast_2d(np.asarray(p_bad_by_seed, dtype=float))
    return y, np.stack([_scores(p, "p_bad", y.size) for p in runs])


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise IchproError(f"threshold must lie in [0, 1]; got {threshold}")


# --------------------------------------------------------------------------- vectorised core
def _safe_div(num: np.ndarray, den: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """num / den elementwise, ``fill`` where den == 0 (no warning)."""
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    return np.divide(num, den, out=np.full(num.shape, fill), where=den != 0)


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each probability: ``[k/B, (k+1)/B)``, with p = 1 in the last bin."""
    return np.minimum((p * n_bins).astype(np.intp), n_bins - 1)


def auc_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Row-wise ROC AUC by the Mann-Whitney midrank formula; NaN for rows with a single class."""
    n_pos = y.sum(axis=-1)
    n_neg = y.shape[-1] - n_pos
    rank_sum = np.where(y == 1, rankdata(p, axis=-1), 0.0).sum(axis=-1)
    return _safe_div(rank_sum - n_pos * (n_pos + 1) / 2, n_pos * n_neg, fill=np.nan)


def _ece(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Row-wise expected calibration error: sum over bins of |sum p - sum y|, divided by n."""
    rows, n = p.shape
    cell = (np.arange(rows)[:, None] * n_bins + _bin_index(p, n_bins)).ravel()
    gap = np.bincount(cell, weights=(p - y).ravel(), minlength=rows * n_bins)
    return np.abs(gap.reshape(rows, n_bins)).sum(axis=1) / n


def _batch_metrics(y: np.ndarray, p: np.ndarray, threshold: float,
                   names: Iterable[str]) -> dict[str, np.ndarray]:
    """The named metrics for each row of (replicates, patients) arrays of labels and p_bad."""
    n = y.shape[-1]
    positive = y == 1
    predicted = p > threshold
    n_pos = positive.sum(axis=-1)
    n_neg = n - n_pos
    tp = (predicted & positive).sum(axis=-1)
    fp = predicted.sum(axis=-1) - tp
    tn = n_neg - fp
    recall = _safe_div(tp, n_pos)
    precision = _safe_div(tp, tp + fp)
    specificity = _safe_div(tn, n_neg)
    has_pos, has_neg = (n_pos > 0).astype(float), (n_neg > 0).astype(float)
    values = {
        "accuracy": (tp + tn) / n,
        "recall": recall,
        "precision": precision,
        "f1": _safe_div(2 * precision * recall, precision + recall),
        "balanced_accuracy": _safe_div(recall * has_pos + specificity * has_neg, has_pos + has_neg),
        "specificity": specificity,
        "brier": ((p - y) ** 2).mean(axis=-1),
    }
    lazy = {"auc": auc_rows, "ece": _ece}
    return {name: values[name] if name in values else lazy[name](y, p) for name in names}


def _check_names(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise IchproError(f"unknown metric(s) {unknown or '(none given)'}; choose from {', '.join(METRICS)}")
    return names


# --------------------------------------------------------------------------- bootstrap
def bootstrap_indices(y: np.ndarray, n_boot: int, seed: int, stratified: bool = True) -> np.ndarray:
    """(n_boot, n) patient indices, resampled with replacement, within each class when ``stratified``
    (every replicate then has the observed outcome rate)."""
    if n_boot < 1:
        raise IchproError(f"n_boot must be at least 1; got {n_boot}")
    rng = np.random.default_rng(seed)
    if not stratified:
        return rng.integers(0, y.size, size=(n_boot, y.size))
    strata = [np.flatnonzero(y == c) for c in (1, 0)]
    return np.concatenate([rng.choice(s, size=(n_boot, s.size)) for s in strata if s.size], axis=1)


def _replicates(y: np.ndarray, p: np.ndarray, index: np.ndarray, threshold: float,
                names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Metric values on every bootstrap replicate, evaluated in memory-bounded blocks."""
    step = max(1, _CHUNK_CELLS // y.size)
    blocks = [_batch_metrics(y[index[i:i + step]], p[index[i:i + step]], threshold, names)
              for i in range(0, len(index), step)]
    return {name: np.concatenate([block[name] for block in blocks]) for name in names}


def percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise IchproError(f"level must lie strictly between 0 and 1; got {level}")
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


# --------------------------------------------------------------------------- public API
def classification_metrics(labels, p_bad, threshold: float = 0.5) -> dict[str, float]:
    """All of :data:`METRICS` on pooled predictions (predicted bad when ``p_bad > threshold``)."""
    y, p = _inputs(labels, p_bad)
    _check_threshold(threshold)
    return {name: float(v[0]) for name, v in _batch_metrics(y[None], p[None], threshold, METRICS).items()}


def metrics_table(labels, p_bad, n_boot: int = 1000, seed: int = 0, threshold: float = 0.5,
                  metrics: Iterable[str] = METRICS, level: float = 0.95) -> pd.DataFrame:
    """One row per metric (metric, value, ci_low, ci_high); all CIs from one set of bootstrap replicates."""
    y, p = _inputs(labels, p_bad)
    _check_threshold(threshold)
    names = _check_names(metrics)
    point = _batch_metrics(y[None], p[None], threshold, names)
    boot = _replicates(y, p, bootstrap_indices(y, n_boot, seed), threshold, names)
    rows = [(name, float(point[name][0]), *percentile_ci(boot[name], level)) for name in names]
    return pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high"])


def metrics_over_seeds(labels, p_bad_by_seed, n_boot: int = 1000, seed: int = 0, threshold: float = 0.5,
                       metrics: Iterable[str] = METRICS, level: float = 0.95) -> pd.DataFrame:
    """:func:`metrics_table` for r runs on the same patients (repeated cross-validation; an (r, n)
    array of P(bad)): each metric's ``value`` is its mean over the runs, with ``seed_min``,
    ``seed_max``, ``seed_sd`` (ddof 1; NaN for one run) and ``n_seeds``; the CI is the percentile
    interval of that mean over one set of patient resamples shared by every run."""
    y, runs = runs_on_patients(labels, p_bad_by_seed)
    _check_threshold(threshold)
    names = _check_names(metrics)
    index = bootstrap_indices(y, n_boot, seed)
    point = [_batch_metrics(y[None], p[None], threshold, names) for p in runs]
    boot = [_replicates(y, p, index, threshold, names) for p in runs]
    rows = []
    for name in names:
        values = np.array([run[name][0] for run in point])
        mean_boot = np.mean([run[name] for run in boot], axis=0)
        sd = float(values.std(ddof=1)) if values.size > 1 else np.nan
        rows.append((name, float(values.mean()), *percentile_ci(mean_boot, level), float(values.min()),
                     float(values.max()), sd, values.size))
    columns = ["metric", "value", "ci_low", "ci_high", "seed_min", "seed_max", "seed_sd", "n_seeds"]
    return pd.DataFrame(rows, columns=columns)


def bootstrap_ci(labels, p_bad, metric: str | MetricFn, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0, threshold: float = 0.5) -> tuple[float, float, float]:
    """(point, low, high): stratified percentile bootstrap of a named metric or of ``f(labels, p_bad)``."""
    if isinstance(metric, str):
        row = metrics_table(labels, p_bad, n_boot, seed, threshold, (metric,), level).iloc[0]
        return float(row["value"]), float(row["ci_low"]), float(row["ci_high"])
    y, p = _inputs(labels, p_bad)
    values = np.array([metric(y[i], p[i]) for i in bootstrap_indices(y, n_boot, seed)], dtype=float)
    return (float(metric(y, p)), *percentile_ci(values, level))


def delong_test(labels, p_a, p_b) -> tuple[float, float, float]:
    """DeLong test of two correlated ROC AUCs on the same patients: (auc_a, auc_b, two-sided p-value)."""
    y = _labels(labels)
    scores = np.stack([_scores(p_a, "p_a", y.size, probabilities=False),
                       _scores(p_b, "p_b", y.size, probabilities=False)])
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if min(m, n) < 2:
        raise IchproError(f"the DeLong test needs at least 2 patients of each class; got {m} bad, {n} good")
    pooled = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    v10 = (pooled[:, :m] - rankdata(pos, axis=1)) / n
    v01 = 1.0 - (pooled[:, m:] - rankdata(neg, axis=1)) / m
    auc_a, auc_b = v10.mean(axis=1)
    s = np.cov(v10) / m + np.cov(v01) / n
    var = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    if var <= 1e-12 * (s[0, 0] + s[1, 1]):  # same ranking (or a constant difference): no sampling variance
        return float(auc_a), float(auc_b), 1.0 if abs(auc_a - auc_b) <= 1e-12 else 0.0
    return float(auc_a), float(auc_b), float(2 * norm.sf(abs(auc_a - auc_b) / np.sqrt(var)))


def calibration_curve_table(labels, p_bad, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Reliability table over equal-width bins: bin, n, mean_predicted, observed_rate (NaN for empty bins)."""
    y, p = _inputs(labels, p_bad)
    if n_bins < 1:
        raise IchproError(f"n_bins must be at least 1; got {n_bins}")
    b = _bin_index(p, n_bins)
    n = np.bincount(b, minlength=n_bins)
    return pd.DataFrame({
        "bin": np.arange(n_bins),
        "n": n,
        "mean_predicted": _safe_div(np.bincount(b, weights=p, minlength=n_bins), n, fill=np.nan),
        "observed_rate": _safe_div(np.bincount(b, weights=y, minlength=n_bins), n, fill=np.nan),
    })
