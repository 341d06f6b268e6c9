"""Decision curve analysis (Vickers & Elkin, Med Decis Making 2006): would acting on the model help?

A clinician who acts (here: plans for a bad outcome) when a patient's P(bad) reaches a threshold
``t`` weighs a missed bad outcome ``(1 - t) / t`` times a needless action. A model's **net benefit**
at ``t`` is ``TP / n - FP / n · t / (1 - t)`` with the patients at ``P(bad) >= t`` acted on; acting on
everyone ("treat all") gives ``φ - (1 - φ) t / (1 - t)`` (φ the outcome rate), acting on no one 0. A
model is worth using at ``t`` only where its net benefit is above both.

The formula is the one of the ``dcurves`` package (Sjoberg), which is not a dependency: it imports
``lifelines`` for survival outcomes, which requires pandas < 3. ``tests/test_decision_curve.py`` pins
this implementation to hand-computed cases.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ichpro.errors import IchproError
from ichpro.metrics import bootstrap_indices, percentile_ci, runs_on_patients

#: the thresholds of the curves: P(bad) from 5 % to 80 %
THRESHOLDS = np.round(np.arange(0.05, 0.801, 0.01), 2)
#: the thresholds a table reports
TABULATED = (0.2, 0.3, 0.4, 0.5, 0.6)
TREAT_ALL, TREAT_NONE = "Treat all", "Treat none"


def _check_thresholds(thresholds) -> np.ndarray:
    t = np.atleast_1d(np.asarray(thresholds, dtype=float))
    if np.any((t <= 0) | (t >= 1)):
        raise IchproError("decision thresholds must lie strictly between 0 and 1; "
                          f"got {t[(t <= 0) | (t >= 1)]}")
    return t


def _net_benefit(y: np.ndarray, p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Net benefit (r, thresholds) of each row of (r, n) labels and probabilities."""
    acted = p[..., None] >= t
    n = y.shape[-1]
    tp = np.einsum("rn,rnt->rt", y, acted) / n
    fp = np.einsum("rn,rnt->rt", 1 - y, acted) / n
    return tp - fp * t / (1 - t)


def net_benefit(labels, p_bad, thresholds=THRESHOLDS) -> np.ndarray:
    """A model's net benefit at each threshold (acting on the patients with ``p_bad >= t``)."""
    y, p = runs_on_patients(labels, p_bad)
    return _net_benefit(y.astype(float)[None], p[:1], _check_thresholds(thresholds))[0]


def treat_all(labels, thresholds=THRESHOLDS) -> np.ndarray:
    """Net benefit of acting on every patient."""
    y, _ = runs_on_patients(labels, np.zeros(len(labels)))
    t = _check_thresholds(thresholds)
    return y.mean() - (1 - y.mean()) * t / (1 - t)


def decision_curves(labels, p_bad_by_model: Mapping[str, np.ndarray], thresholds=THRESHOLDS,
                    n_boot: int = 500, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Net benefit of each model (mean over its runs: an (r, n) array per model), of treat all and
    treat none, at each threshold, with a percentile interval over patient resamples (not stratified,
    shared by every model): columns ``model``, ``threshold``, ``net_benefit``, ``ci_low``, ``ci_high``;
    and a model's ``advantage`` over the better default (treat all or treat none) with its paired
    interval on the same resamples (``advantage_ci_low``, ``advantage_ci_high``; NaN for the defaults)."""
    t = _check_thresholds(thresholds)
    y = runs_on_patients(labels, np.zeros(len(labels)))[0].astype(float)
    index = bootstrap_indices(y, n_boot, seed, stratified=False)
    everyone = np.ones((1, y.size))
    default = np.maximum(_net_benefit(y[None], everyone, t)[0], 0.0)
    default_boot = np.maximum(_net_benefit(y[index], everyone[[0] * n_boot], t), 0.0)
    curves = {**{name: runs_on_patients(y, p)[1] for name, p in p_bad_by_model.items()}, TREAT_ALL: everyone}
    frames = []
    for name, runs in curves.items():
        point = np.mean([_net_benefit(y[None], p[None], t)[0] for p in runs], axis=0)
        boot = np.mean([_net_benefit(y[index], p[index], t) for p in runs], axis=0)
        low, high = zip(*(percentile_ci(boot[:, i], level) for i in range(t.size)))
        frame = pd.DataFrame({"model": name, "threshold": t, "net_benefit": point, "ci_low": low,
                              "ci_high": high})
        if name != TREAT_ALL:
            gain = boot - default_boot
            frame["advantage"] = point - default
            frame["advantage_ci_low"], frame["advantage_ci_high"] = zip(
                *(percentile_ci(gain[:, i], level) for i in range(t.size)))
        frames.append(frame)
    frames.append(pd.DataFrame({"model": TREAT_NONE, "threshold": t, "net_benefit": 0.0, "ci_low": 0.0,
                                "ci_high": 0.0}))
    return pd.concat(frames, ignore_index=True)


def decision_table(curves: pd.DataFrame, thresholds=TABULATED) -> pd.DataFrame:
    """Net benefit (95 % interval) of every model and of the two defaults at a few thresholds, one
    column per threshold."""
    rows = curves[np.isclose(curves["threshold"].to_numpy()[:, None], np.asarray(thresholds)).any(axis=1)]
    cells = rows.assign(cell=[f"{v:+.3f} ({lo:+.3f} to {hi:+.3f})" for v, lo, hi
                              in zip(rows["net_benefit"], rows["ci_low"], rows["ci_high"])])
    return cells.pivot(index="model", columns="threshold", values="cell").reindex(curves["model"].unique())


def useful_models(curves: pd.DataFrame, threshold: float) -> list[str]:
    """The models whose advantage over the better default (treat all or treat none) at ``threshold``
    has a paired 95 % interval above 0."""
    at = curves[np.isclose(curves["threshold"], threshold)].set_index("model")
    models = at.drop([TREAT_ALL, TREAT_NONE])
    return models.index[models["advantage_ci_low"] > 0].tolist()
