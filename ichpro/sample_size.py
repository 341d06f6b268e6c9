"""Minimum sample size to develop a prediction model of a binary outcome (Riley et al., BMJ
2020;368:m441; Riley et al., Stat Med 2019;38:1276-1296).

Four criteria, each a closed form in the outcome prevalence φ, the number of candidate predictor
parameters P and the anticipated Cox-Snell R² of the model:

1. the overall risk is estimated within ±``margin`` (95 %): ``n = (1.96 / margin)² φ (1 - φ)``;
2. the mean absolute prediction error is at most ``mape`` (van Smeden et al. 2019):
   ``n = exp((-0.508 + 0.259 ln φ + 0.504 ln P - ln mape) / 0.544)``;
3. the expected uniform shrinkage of the predictor effects is at least ``shrinkage`` (0.9):
   ``n = P / ((S - 1) ln(1 - R²_CS / S))``;
4. the apparent and the adjusted Nagelkerke R² differ by at most ``optimism`` (0.05): criterion 3
   with ``S = R²_CS / (R²_CS + optimism · max R²_CS)``, where
   ``max R²_CS = 1 - exp(2 (φ ln φ + (1 - φ) ln(1 - φ)))``.

The minimum sample size is the largest of the four, rounded up.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.special import log_expit
from scipy.stats import norm

from ichpro.errors import IchproError


def max_cox_snell(prevalence: float) -> float:
    """The largest Cox-Snell R² a model of a binary outcome with this prevalence can have."""
    phi = prevalence
    return 1 - math.exp(2 * (phi * math.log(phi) + (1 - phi) * math.log(1 - phi)))


def _shrinkage_n(parameters: int, r2_cs: float, shrinkage: float) -> float:
    return parameters / ((shrinkage - 1) * math.log(1 - r2_cs / shrinkage))


def minimum_sample_size(prevalence: float, parameters: int, r2_cs: float, *, shrinkage: float = 0.9,
                        optimism: float = 0.05, margin: float = 0.05, mape: float = 0.05) -> pd.DataFrame:
    """One row per criterion (``key``: overall_risk, mape, shrinkage, optimism; and ``minimum``, the
    largest): the minimum n, its events (n φ) and the events per candidate predictor parameter."""
    if not 0 < prevalence < 1:
        raise IchproError(f"the prevalence must lie strictly between 0 and 1; got {prevalence}")
    if parameters < 1:
        raise IchproError("the number of candidate predictor parameters must be at least 1; "
                          f"got {parameters}")
    largest = max_cox_snell(prevalence)
    if not 0 < r2_cs < largest:
        raise IchproError(f"the anticipated Cox-Snell R² must lie in (0, {largest:.3f}), the largest a model "
                          f"can reach at prevalence {prevalence}; got {r2_cs}")
    if r2_cs >= shrinkage:
        raise IchproError(f"the anticipated Cox-Snell R² ({r2_cs}) must be below the shrinkage ({shrinkage})")
    small_optimism = r2_cs / (r2_cs + optimism * largest)
    needed = {
        ("overall_risk", f"overall risk within ±{margin}"):
            (1.96 / margin) ** 2 * prevalence * (1 - prevalence),
        ("mape", f"mean absolute prediction error ≤ {mape}"): math.exp(
            (-0.508 + 0.259 * math.log(prevalence) + 0.504 * math.log(parameters) - math.log(mape)) / 0.544),
        ("shrinkage", f"shrinkage ≥ {shrinkage}"): _shrinkage_n(parameters, r2_cs, shrinkage),
        ("optimism", f"Nagelkerke R² optimism ≤ {optimism}"): _shrinkage_n(parameters, r2_cs, small_optimism),
    }
    rows = [(key, name, math.ceil(n)) for (key, name), n in needed.items()]
    rows.append(("minimum", "minimum (the largest)", max(n for *_, n in rows)))
    table = pd.DataFrame(rows, columns=["key", "criterion", "n"])
    table["events"] = table["n"] * prevalence
    table["events_per_parameter"] = table["events"] / parameters
    return table


def cox_snell_from_c(c_statistic: float, prevalence: float, n: int = 1_000_000) -> float:
    """The Cox-Snell R² that goes with a C statistic at this prevalence (Riley et al. 2021's
    approximation: a normal linear predictor with equal variance in both outcome groups whose means
    differ by ``sqrt(2) Φ⁻¹(C)``, its likelihood ratio over a large simulated sample)."""
    if not 0.5 < c_statistic < 1:
        raise IchproError(f"the C statistic must lie strictly between 0.5 and 1; got {c_statistic}")
    rng = np.random.default_rng(0)
    events = rng.random(n) < prevalence
    mu = math.sqrt(2) * norm.ppf(c_statistic)
    lp = np.where(events, mu, 0.0) + rng.standard_normal(n)
    # the linear predictor's log-odds: the log ratio of the two normal densities plus the prior log-odds
    log_odds = mu * lp - mu ** 2 / 2 + math.log(prevalence / (1 - prevalence))
    y = events.astype(float)
    log_l = np.sum(y * log_expit(log_odds) + (1 - y) * log_expit(-log_odds))
    phi = y.mean()
    log_l0 = n * (phi * math.log(phi) + (1 - phi) * math.log(1 - phi))
    return float(1 - math.exp(2 * (log_l0 - log_l) / n))
