"""Refit the outcome model's coefficients to the published ICH-score and FUNC tables.

Provenance of ``ichpro.cohort.OUTCOME_MODEL``: run it after changing the covariate model in
``ichpro/cohort.py`` and copy the printed coefficients into ``OutcomeModel`` (rounded to two
decimals). The objective is the squared error between the model's *expected* rates and the
published ones (Hemphill's 30-day mortality by ICH score counted twice, Rost's independence by
FUNC band once), a penalty keeping the bad-outcome share in 50-60 %, and mild shrinkage. The
coefficients of surgery, cognitive impairment and onset-to-CT time are fixed, not fitted.

    .venv/bin/python data_synthetic/calibrate_outcome_model.py   # about a minute
"""

from dataclasses import replace

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from ichpro import cohort

FITTED = ("age_per_decade", "gcs_per_point", "coma", "log_volume", "ivh", "midline_shift_per_mm",
          "lobar", "cerebellar", "brainstem", "cut_bad", "cut_death30")
N_COEFFICIENTS = 9  # the leading entries of FITTED that are shrunk (not the cut-points)


def to_model(x: np.ndarray) -> cohort.OutcomeModel:
    values = dict(zip(FITTED, x))
    location = {"deep": 0.0, **{k: values.pop(k) for k in ("lobar", "cerebellar", "brainstem")}}
    return replace(cohort.OUTCOME_MODEL, location=location, **values)


def main() -> None:
    t = cohort.sample_clinical(20_000, np.random.default_rng(7))
    ich = t["ich_score"].to_numpy()
    bands = cohort.func_band(t["func_score"].to_numpy())

    def objective(x: np.ndarray) -> float:
        model = to_model(x)
        eta = model.linear_predictor(t)
        death30, bad = expit(eta - model.cut_death30), expit(eta - model.cut_bad)
        loss = 0.0
        for score, published in cohort.HEMPHILL_MORTALITY.items():
            if (ich == score).sum() >= 120:
                loss += 2 * (death30[ich == score].mean() - published) ** 2
        for band, published in cohort.ROST_INDEPENDENCE.items():
            loss += ((1 - bad[bands == band]).mean() - published) ** 2
        share = bad.mean()
        loss += 4 * max(0.0, 0.50 - share) ** 2 + 4 * max(0.0, share - 0.60) ** 2
        return loss + 0.001 * float(np.sum(x[:N_COEFFICIENTS] ** 2))

    m = cohort.OUTCOME_MODEL
    x0 = np.array([getattr(m, k) if hasattr(m, k) else m.location[k] for k in FITTED])
    result = minimize(objective, x0, method="Nelder-Mead",
                      options={"maxiter": 6000, "xatol": 1e-4, "fatol": 1e-9, "adaptive": True})
    print(f"objective {result.fun:.5f} after {result.nit} iterations")
    for name, value in zip(FITTED, result.x):
        print(f"{name} = {value:.2f}")


if __name__ == "__main__":
    main()
