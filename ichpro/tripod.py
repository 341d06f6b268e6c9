"""The models of Tables 1 and 4 judged as clinical prediction models (TRIPOD+AI, BMJ 2024;385:e078378):
calibration before and after the folds' Platt scaling, decision curves, subgroups and the development
sample size, from the finished runs' out-of-fold predictions over their seeds (no training).

``docs/tripod_ai.md`` maps each TRIPOD+AI item to where the companion answers it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from ichpro.calibration import calibration_table, smoothed_calibration
from ichpro.config import Profile
from ichpro.decision_curve import decision_curves
from ichpro.errors import IchproError
from ichpro.experiments import VARIANT, Row, load_predictions, row_folder, row_seeds, table_rows
from ichpro.sample_size import cox_snell_from_c, minimum_sample_size
from ichpro.subgroups import subgroup_labels, subgroup_table

#: the models judged, by table: the paper's ICHPro and its admission-only form (TRIPOD+AI 9b: Hospital
#: Stay is known only after the outcome), our variant, each modality, and the clinical baselines
JUDGED = {"table1_modalities": ("ICHPro", "ICHPro, no Hospital Stay", VARIANT, "Text only", "Vision only"),
          "table4_comparison": ("Logistic regression, clinical fields", "ICH score", "FUNC score")}
BEFORE, AFTER, FITTED = "before Platt scaling", "after Platt scaling", "fitted logistic map (no Platt)"


def judged_rows() -> list[Row]:
    """The :class:`~ichpro.experiments.Row` of every :data:`JUDGED` model, in that order."""
    return [row for table, names in JUDGED.items() for row in table_rows(table) if row.name in names]


def judged_jobs(seed: int = 0) -> list[tuple[Row, int]]:
    """Every (row, training seed) the judgement reads (for :func:`ichpro.experiments.train_rows`)."""
    return [(row, s) for row in judged_rows() for s in row_seeds(row, seed)]


def judged_predictions(profile: Profile, out: str | Path, manifest: pd.DataFrame, seed: int = 0
                       ) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """The labels (in manifest order) and, per model and recalibration (:data:`BEFORE`, :data:`AFTER`
    or :data:`FITTED`), the (seeds, patients) P(bad) of every judged model's out-of-fold predictions."""
    patients = manifest["patient_id"].to_numpy()
    predictions = load_predictions(judged_rows(), profile, out, seed)
    labels, by_model = None, {}
    for name, runs in predictions.items():
        oofs = [o.set_index("patient_id").reindex(patients) for o in runs.values()]
        if any(o["p_bad"].isna().any() for o in oofs):
            raise IchproError(f"{name}: its out-of-fold predictions do not cover the manifest's patients")
        labels = oofs[0]["label"].to_numpy(int)
        stack = {AFTER: np.stack([o["p_bad"].to_numpy() for o in oofs])}
        if "p_bad_uncalibrated" in oofs[0]:
            stack[BEFORE] = np.stack([o["p_bad_uncalibrated"].to_numpy() for o in oofs])
        else:
            stack = {FITTED: stack[AFTER]}
        by_model[name] = stack
    return labels, by_model


def calibration_summary(labels: np.ndarray, by_model: dict[str, dict[str, np.ndarray]], n_boot: int = 1000,
                        seed: int = 0) -> pd.DataFrame:
    """:func:`~ichpro.calibration.calibration_table` of every model and recalibration, one line each
    (``<measure>``, ``<measure>_ci_low``, ``<measure>_ci_high``) plus ``n_seeds``."""
    lines = []
    for model, stacks in by_model.items():
        for recalibration, runs in stacks.items():
            t = calibration_table(labels, runs, n_boot=n_boot, seed=seed).set_index("measure")
            line = {"model": model, "recalibration": recalibration, "n_seeds": int(t["n_seeds"].iloc[0])}
            for measure, r in t.iterrows():
                line.update({measure: r["value"], f"{measure}_ci_low": r["ci_low"],
                             f"{measure}_ci_high": r["ci_high"]})
            lines.append(line)
    return pd.DataFrame(lines)


def calibration_curves(labels: np.ndarray, by_model: dict[str, dict[str, np.ndarray]], n_boot: int = 200,
                       seed: int = 0) -> pd.DataFrame:
    """:func:`~ichpro.calibration.smoothed_calibration` of every model and recalibration (long form)."""
    return pd.concat([smoothed_calibration(labels, runs, n_boot=n_boot, seed=seed).assign(
        model=model, recalibration=recalibration) for model, stacks in by_model.items()
        for recalibration, runs in stacks.items()], ignore_index=True)


def final_probabilities(by_model: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The probabilities a user gets from each model: after Platt scaling, or the fitted map."""
    return {model: stacks.get(AFTER, stacks.get(FITTED)) for model, stacks in by_model.items()}


def model_decision_curves(labels: np.ndarray, by_model: dict[str, dict[str, np.ndarray]], n_boot: int = 500,
                          seed: int = 0) -> pd.DataFrame:
    """:func:`~ichpro.decision_curve.decision_curves` of the probabilities a user gets."""
    return decision_curves(labels, final_probabilities(by_model), n_boot=n_boot, seed=seed)


def model_subgroups(labels: np.ndarray, by_model: dict[str, dict[str, np.ndarray]], manifest: pd.DataFrame,
                    n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """:func:`~ichpro.subgroups.subgroup_table` of every model's final probabilities (long form;
    500 resamples per subgroup and model, as for the decision curves: 8 models x 14 subgroups)."""
    groups = subgroup_labels(manifest.reset_index(drop=True))
    return pd.concat([subgroup_table(labels, runs, groups, n_boot=n_boot, seed=seed).assign(model=model)
                      for model, runs in final_probabilities(by_model).items()], ignore_index=True)


def final_layer_parameters(model: nn.Module) -> int:
    """The coefficients of the log-odds the model's last layer computes: the inputs of the last linear
    layer with two outputs, plus one (a softmax over two logits is a logistic regression on them)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 2]
    if not layers:
        raise IchproError(f"{type(model).__name__} has no linear layer with two outputs")
    return layers[-1].in_features + 1


#: how the candidate predictor parameters of the sample-size criteria are counted (notebook 12)
LOGISTIC_COEFFICIENTS, LAST_LAYER, ALL_WEIGHTS = ("clinical logistic regression", "ICHPro's last layer",
                                                  "ICHPro's trainable weights")


def sample_size_table(prevalence: float, counts: dict[str, int], c_statistics: dict[str, float],
                      patients: int, development: int) -> pd.DataFrame:
    """:func:`~ichpro.sample_size.minimum_sample_size` for each way of counting the candidate predictor
    parameters (``counts``) and each anticipated C statistic (turned into a Cox-Snell R²): columns
    ``c_from``, ``c``, ``r2_cox_snell``, ``counted``, ``parameters``, ``n_<criterion key>``, and the
    cohort's ``patients`` and the ``development`` patients of a training fold."""
    lines = []
    for c_name, c in c_statistics.items():
        r2 = cox_snell_from_c(c, prevalence)
        for counted, parameters in counts.items():
            t = minimum_sample_size(prevalence, parameters, r2).set_index("key")["n"]
            lines.append({"c_from": c_name, "c": c, "r2_cox_snell": r2, "counted": counted,
                          "parameters": parameters, **{f"n_{key}": n for key, n in t.items()},
                          "patients": patients, "development": development})
    return pd.DataFrame(lines)


def trainable_parameters(profile: Profile, out: str | Path, name: str, seed: int = 0) -> int:
    """A judged model's trainable parameters, as its run recorded them (``parameters.json``)."""
    row = next(r for r in judged_rows() if r.name == name)
    return int(json.loads((row_folder(out, profile, row, seed) / "parameters.json").read_text())["trainable"])
