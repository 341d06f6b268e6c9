"""Clinical baselines: the ICH and FUNC scores, and a logistic regression on the clinical fields.

Every baseline reads the same per-patient fields (:func:`clinical_fields`): a manifest column when
it is filled, else the field parsed from the report text. The manifest's ``volume_ml`` is the
radiologist's estimate (ABC/2-like, noisy), not the true haematoma volume, so these scores are what
a clinician could compute at admission. Hospital stay is never used: it is known only after the
outcome.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from ichpro.cohort import func_score, ich_score
from ichpro.errors import IchproError
from ichpro.reports import EXAMPLE_REPORT, POSITION_CATEGORIES, TREATMENTS, parse, position_category, render

#: Numeric fields of :func:`clinical_fields` (``location`` is the categorical one).
NUMERIC_FIELDS = ("age", "male", "gcs", "volume_ml", "ivh", "midline_shift_mm", "onset_to_ct_min",
                  "surgical")
#: +1 when a higher score means a worse outcome, -1 when it means a better one.
SCORE_RISK_SIGN = {"ich_score": 1, "func_score": -1}
_ICH_INPUTS = ("gcs", "volume_ml", "ivh", "location", "age")
_FUNC_INPUTS = ("volume_ml", "age", "location", "gcs", "cognitive_impairment")
#: report-level location -> the location scored; "supratentorial" is lobar or deep, which FUNC
#: tells apart (2 vs 1 point) and the ICH score does not (0 points either way)
_ICH_LOCATION = {"infratentorial": "cerebellar", "supratentorial": "deep"}
_FUNC_LOCATION = {"infratentorial": "cerebellar", "supratentorial": None}


def clinical_fields(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per-patient fields: the manifest's column where filled, else the report's; NaN if neither.

    Columns: :data:`NUMERIC_FIELDS` as floats (``male`` and ``surgical`` are 0/1, ``ivh`` 0/1) and
    ``location`` (deep, lobar, cerebellar, brainstem, or only supra/infratentorial; None if unknown).
    IVH and midline shift are not in the report and come from the columns only.
    """
    columns = _from_columns(manifest)
    if "report" in manifest.columns:
        columns = columns.fillna(_from_reports(manifest["report"]))
    return columns


def _from_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The fields read from the manifest's clinical columns (all-missing where a column is absent)."""
    def column(name: str) -> pd.Series:
        return df[name] if name in df.columns else pd.Series(None, index=df.index, dtype=object)

    out = pd.DataFrame(index=df.index)
    for name in ("age", "gcs", "volume_ml", "midline_shift_mm", "onset_to_ct_min"):
        out[name] = pd.to_numeric(column(name), errors="coerce")
    out["male"] = column("sex").map(_male)
    out["ivh"] = column("ivh").map(_flag)
    out["surgical"] = column("treatment").map(_surgical)
    out["location"] = column("location").map(_location)
    return out.astype({name: float for name in NUMERIC_FIELDS})[[*NUMERIC_FIELDS, "location"]]


def _from_reports(reports: pd.Series) -> pd.DataFrame:
    """The fields a report text gives (parsed with :func:`ichpro.reports.parse`)."""
    rows = []
    for text in reports:
        r = parse(text) if isinstance(text, str) else parse("")
        rows.append({"age": r.age, "gcs": r.gcs, "volume_ml": r.volume_ml,
                     "onset_to_ct_min": r.onset_to_ct_min, "male": _male(r.sex),
                     "surgical": _surgical(r.treatment), "location": position_category(r.position)})
    return pd.DataFrame(rows, index=reports.index).astype(
        {name: float for name in ("age", "gcs", "volume_ml", "onset_to_ct_min", "male", "surgical")})


def _male(sex: object) -> float:
    return {"male": 1.0, "m": 1.0, "female": 0.0, "f": 0.0}.get(str(sex).strip().lower(), np.nan)


def _flag(value: object) -> float:
    """1/0 from a number (> 0), true/false or yes/no; NaN otherwise."""
    text = str(value).strip().lower()
    words = {"true": 1.0, "yes": 1.0, "false": 0.0, "no": 0.0}
    if text in words:
        return words[text]
    number = pd.to_numeric(text, errors="coerce")
    return np.nan if np.isnan(number) else float(number > 0)


def _surgical(treatment: object) -> float:
    if not isinstance(treatment, str) or not treatment.strip():
        return np.nan
    return float(treatment.strip().lower() != TREATMENTS[0].lower())


def _location(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    return text if text in POSITION_CATEGORIES else position_category(text)


def clinical_scores(manifest: pd.DataFrame) -> pd.DataFrame:
    """ICH score (Hemphill 2001) and FUNC score (Rost 2008) of each patient, NaN where an input is missing.

    Uses :func:`ichpro.cohort.ich_score` and :func:`ichpro.cohort.func_score` on
    :func:`clinical_fields`. A manifest rarely records pre-ICH cognitive impairment: without a
    ``cognitive_impairment`` column it is taken as absent (FUNC's 1 point). Besides the scores, the
    ``*_risk`` columns are oriented so that higher means a worse outcome (for AUCs of P(bad)).
    """
    fields = clinical_fields(manifest)
    impairment = manifest["cognitive_impairment"] if "cognitive_impairment" in manifest else 0.0
    fields["cognitive_impairment"] = pd.to_numeric(impairment, errors="coerce")
    ich = _where_known(ich_score, _scored(fields, _ICH_LOCATION), _ICH_INPUTS)
    func = _where_known(func_score, _scored(fields, _FUNC_LOCATION), _FUNC_INPUTS)
    scores = pd.DataFrame({"ich_score": ich, "func_score": func}, index=manifest.index)
    for name, sign in SCORE_RISK_SIGN.items():
        scores[f"{name}_risk"] = sign * scores[name]
    return scores


def _scored(fields: pd.DataFrame, locations: dict[str, str | None]) -> pd.DataFrame:
    """``fields`` with report-level locations replaced by the location a score counts."""
    return fields.assign(location=fields["location"].map(lambda value: locations.get(value, value)))


def _where_known(score, fields: pd.DataFrame, inputs: tuple[str, ...]) -> np.ndarray:
    """``score(fields)`` on the rows whose ``inputs`` are all known, NaN on the others."""
    known = fields[list(inputs)].notna().all(axis=1).to_numpy()
    out = np.full(len(fields), np.nan)
    if known.any():
        out[known] = score(fields[known].reset_index(drop=True))
    return out


def design_matrix(manifest: pd.DataFrame) -> pd.DataFrame:
    """:data:`NUMERIC_FIELDS` plus a one-hot ``location_*`` column per category (NaN if unknown)."""
    fields = clinical_fields(manifest)
    location = fields.pop("location")
    for category in POSITION_CATEGORIES:
        fields[f"location_{category}"] = (location == category).astype(float).where(location.notna())
    return fields


def fit_standardizer(frame: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """Training mean and std of each column (0 and 1 for a column with no value or no spread)."""
    stats = {}
    for name in frame.columns:
        mean, std = frame[name].mean(), frame[name].std(ddof=0)
        stats[name] = (0.0 if np.isnan(mean) else float(mean),
                       1.0 if np.isnan(std) or std == 0 else float(std))
    return stats


def standardize(frame: pd.DataFrame, stats: dict[str, tuple[float, float]]) -> np.ndarray:
    """(value - mean) / std per column of ``stats``; a missing value becomes the mean, i.e. 0."""
    mean = np.array([stats[name][0] for name in stats])
    std = np.array([stats[name][1] for name in stats])
    return np.nan_to_num((frame[list(stats)].to_numpy(float) - mean) / std, nan=0.0)


def logistic_regression_cv(manifest: pd.DataFrame, folds: np.ndarray, seed: int = 0,
                           features: pd.DataFrame | None = None) -> np.ndarray:
    """Out-of-fold P(bad) of a logistic regression on ``features`` (default :func:`design_matrix`).

    For each fold k the model is fitted on the other folds only, with standardization and mean
    imputation from those folds, and predicts fold k.
    """
    folds = np.asarray(folds)
    labels = manifest["label"].to_numpy(int)
    if len(folds) != len(manifest):
        raise IchproError(f"got {len(folds)} fold indices for {len(manifest)} patients: give one per patient")
    x = (design_matrix(manifest) if features is None else features).reset_index(drop=True)
    p_bad = np.empty(len(manifest))
    for fold in np.unique(folds):
        test = folds == fold
        train = ~test
        if len(np.unique(labels[train])) < 2:
            raise IchproError(f"the training folds of fold {fold} hold only one outcome: use fewer folds")
        stats = fit_standardizer(x[train])
        model = LogisticRegression(max_iter=1000, random_state=seed)
        model.fit(standardize(x[train], stats), labels[train])
        p_bad[test] = model.predict_proba(standardize(x[test], stats))[:, 1]
    return p_bad



#: Baselines without a neural network, by name: a logistic regression on the clinical fields, and
#: each clinical score turned into P(bad) by a one-variable logistic regression.
CLINICAL_BASELINES = ("logistic_regression", "ich_score", "func_score")


def clinical_baseline_cv(name: str, manifest: pd.DataFrame, folds: np.ndarray, seed: int = 0
                         ) -> tuple[np.ndarray, int]:
    """Out-of-fold P(bad) of a :data:`CLINICAL_BASELINES` entry and its number of fitted parameters.

    A score is a fixed formula; to read it as a probability (for accuracy, F1 and calibration),
    each fold maps the score's risk to P(bad) with a logistic regression fitted on the other folds.
    Each map is monotone, so each test fold's AUC is the formula's; the pooled out-of-fold AUC ranks
    the five folds' maps together and differs from the formula's AUC on the whole cohort
    (:func:`ichpro.views.comparison.describe_score_aucs` prints both).
    """
    if name not in CLINICAL_BASELINES:
        raise IchproError(f"unknown clinical baseline {name!r}; "
                          f"choose one of {', '.join(CLINICAL_BASELINES)}")
    fields = clinical_fields(manifest)
    empty = fields[list(NUMERIC_FIELDS)].isna().all(axis=1) & fields["location"].isna()
    if empty.any():
        raise IchproError(f"{int(empty.sum())} patient(s) have no clinical field in their manifest columns "
                          f"or report, e.g. {manifest['patient_id'][empty].iloc[0]!r}: the {name} baseline "
                          "reads them; add the columns (age, gcs, volume_ml, ...) or write the report's "
                          f"fields as {render(EXAMPLE_REPORT)!r}")
    features = (design_matrix(manifest) if name == "logistic_regression"
                else clinical_scores(manifest)[[f"{name}_risk"]])
    return logistic_regression_cv(manifest, folds, seed, features), features.shape[1] + 1
