"""Subgroups from a manifest's fields, and their AUC, slope and gaps."""

import numpy as np
import pandas as pd

from ichpro.subgroups import SUBGROUPS, subgroup_labels, subgroup_table


def test_cut_points_and_locations_as_the_clinical_scores_use_them():
    manifest = pd.DataFrame({
        "patient_id": list("abcdef"), "label": [0, 1, 0, 1, 0, 1],
        "age": [79, 80, 50, None, 90, 60], "sex": ["Male", "Female", "Male", "Female", "Male", None],
        "gcs": [8, 9, 12, 13, 3, 15], "volume_ml": [29.9, 30, 5, 60, None, 10], "ivh": [0, 1, 0, 1, 0, 1],
        "location": ["deep", "lobar", "brainstem", "cerebellar", "deep", None]})
    groups = subgroup_labels(manifest)
    assert list(groups.columns) == list(SUBGROUPS)
    assert groups["age"].tolist()[:3] == ["< 80", "≥ 80", "< 80"] and pd.isna(groups["age"][3])
    assert groups["GCS"].tolist() == ["3-8", "9-12", "9-12", "13-15", "3-8", "13-15"]
    assert groups["volume"].tolist()[:2] == ["< 30 mL", "≥ 30 mL"] and pd.isna(groups["volume"][4])
    assert groups["location"].tolist()[:4] == ["deep", "lobar", "infratentorial", "infratentorial"]
    assert groups["sex"].tolist()[:2] == ["male", "female"] and pd.isna(groups["sex"][5])


def test_a_model_that_fails_in_one_subgroup_shows_a_clear_gap():
    rng = np.random.default_rng(0)
    n = 600
    y = (rng.random(n) < 0.45).astype(int)
    group = np.where(np.arange(n) < 300, "a", "b")
    p = np.where(group == "a", np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.1, n), 0.01, 0.99),
                 rng.random(n))  # informative in a, noise in b
    groups = pd.DataFrame({"g": pd.Categorical(group, categories=["a", "b", "c"])})
    table = subgroup_table(y, p, groups, n_boot=200).set_index("group")
    assert list(table.index) == ["a", "b"]  # an empty subgroup is left out
    assert table.at["a", "auc"] > 0.95 and abs(table.at["b", "auc"] - 0.5) < 0.1
    assert table.at["b", "auc_gap"] < 0 and table.at["b", "auc_gap_clear"]
    assert table.at["a", "n"] == 300 and table.at["a", "bad_rate"] == y[:300].mean()


def test_a_subgroup_with_too_few_outcomes_has_no_auc():
    y = np.array([0] * 20 + [1] * 20)
    groups = pd.DataFrame({"g": pd.Categorical(["rare"] * 3 + ["common"] * 37,
                                               categories=["rare", "common"])})
    table = subgroup_table(y, np.linspace(0.1, 0.9, 40), groups, n_boot=50).set_index("group")
    assert np.isnan(table.at["rare", "auc"]) and not table.at["rare", "auc_gap_clear"]
    assert np.isfinite(table.at["common", "auc"])
