"""For whom does a model work less well? Discrimination and calibration per clinical subgroup.

The subgroups are read from a manifest's clinical fields (what a user's data carries): sex, age
(< 80 / >= 80), admission GCS (3-8 / 9-12 / 13-15), haematoma volume (< 30 / >= 30 mL), intraventricular
extension, and location (deep / lobar / infratentorial: brainstem or cerebellum). Per subgroup: the
patients, the bad-outcome rate, the AUC and the calibration slope (means over a model's runs, with
95 % intervals over patient resamples drawn within the subgroup), and the gap to the patients outside
it with its interval; a gap is *clear* when that interval excludes 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichpro.calibration import calibration_rows
from ichpro.clinical import clinical_fields
from ichpro.metrics import auc_rows, bootstrap_indices, percentile_ci, runs_on_patients

#: fewer patients of either outcome than this in a subgroup (or outside it) leave its numbers undefined
MIN_PER_OUTCOME = 5


#: each grouping's subgroups, in the order tables list them
SUBGROUPS = {"sex": ("female", "male"), "age": ("< 80", "≥ 80"), "GCS": ("3-8", "9-12", "13-15"),
             "volume": ("< 30 mL", "≥ 30 mL"), "IVH": ("no IVH", "IVH"),
             "location": ("deep", "lobar", "infratentorial")}
_INFRATENTORIAL = {"deep": "deep", "lobar": "lobar", "brainstem": "infratentorial",
                   "cerebellar": "infratentorial", "infratentorial": "infratentorial"}


def _split(values: pd.Series, cut: float, below: str, above: str) -> pd.Series:
    return pd.Series(np.where(values >= cut, above, below), index=values.index).where(values.notna())


def subgroup_labels(manifest: pd.DataFrame) -> pd.DataFrame:
    """One column per grouping of :data:`SUBGROUPS`, one row per patient of the manifest (same
    order): its subgroup, or NaN where the field is unknown."""
    f = clinical_fields(manifest)
    columns = {
        "sex": f["male"].map({1.0: "male", 0.0: "female"}),
        "age": _split(f["age"], 80, "< 80", "≥ 80"),
        "GCS": pd.cut(f["gcs"], [2, 8, 12, 15], labels=list(SUBGROUPS["GCS"])).astype(object),
        "volume": _split(f["volume_ml"], 30, "< 30 mL", "≥ 30 mL"),
        "IVH": f["ivh"].map({1.0: "IVH", 0.0: "no IVH"}),
        "location": f["location"].map(_INFRATENTORIAL),
    }
    return pd.DataFrame({name: pd.Categorical(values, categories=SUBGROUPS[name])
                         for name, values in columns.items()}, index=manifest.index)


def _auc_and_slope(y: np.ndarray, runs: np.ndarray, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Point values and bootstrap replicates of the mean AUC and calibration slope over the runs;
    NaN when either outcome has fewer than :data:`MIN_PER_OUTCOME` patients."""
    if min(y.sum(), (1 - y).sum()) < MIN_PER_OUTCOME:
        return {k: np.full(1 if k.endswith("point") else n_boot, np.nan)
                for k in ("auc_point", "auc_boot", "slope_point", "slope_boot")}
    index = bootstrap_indices(y, n_boot, seed)
    return {"auc_point": np.mean([auc_rows(y[None], p[None]) for p in runs], axis=0),
            "auc_boot": np.mean([auc_rows(y[index], p[index]) for p in runs], axis=0),
            "slope_point": np.mean([calibration_rows(y[None], p[None])["slope"] for p in runs], axis=0),
            "slope_boot": np.mean([calibration_rows(y[index], p[index])["slope"] for p in runs], axis=0)}


def subgroup_table(labels, p_bad_by_seed, groups: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> pd.DataFrame:
    """One row per subgroup of each grouping in ``groups`` (:func:`subgroup_labels`): ``n``,
    ``bad_rate``, ``auc`` and ``slope`` with intervals, their gaps to the rest with intervals, and
    ``auc_gap_clear`` / ``slope_gap_clear``."""
    y, runs = runs_on_patients(labels, p_bad_by_seed)
    y = y.astype(float)
    rows = []
    for grouping in groups.columns:
        for group in groups[grouping].cat.categories:
            inside = (groups[grouping] == group).to_numpy()
            if not inside.any():
                continue
            known = groups[grouping].notna().to_numpy()
            a = _auc_and_slope(y[inside], runs[:, inside], n_boot, seed)
            b = _auc_and_slope(y[known & ~inside], runs[:, known & ~inside], n_boot, seed + 1)
            row = {"grouping": grouping, "group": group, "n": int(inside.sum()), "bad_rate": y[inside].mean()}
            for measure in ("auc", "slope"):
                gap = a[f"{measure}_boot"] - b[f"{measure}_boot"]
                low, high = (percentile_ci(a[f"{measure}_boot"], level)
                             if np.isfinite(a[f"{measure}_point"][0]) else (np.nan, np.nan))
                gap_low, gap_high = percentile_ci(gap, level) if np.isfinite(gap).all() else (np.nan, np.nan)
                row.update({measure: a[f"{measure}_point"][0], f"{measure}_ci_low": low,
                            f"{measure}_ci_high": high,
                            f"{measure}_gap": a[f"{measure}_point"][0] - b[f"{measure}_point"][0],
                            f"{measure}_gap_ci_low": gap_low, f"{measure}_gap_ci_high": gap_high,
                            f"{measure}_gap_clear": bool(gap_low > 0 or gap_high < 0)})
            rows.append(row)
    return pd.DataFrame(rows)
