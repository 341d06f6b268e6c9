"""Views around the result tables: readings computed from the numbers, late fusion over seeds, the
Hospital Stay figure, the out-of-fold text probe and comparisons against a baseline row."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from ichpro.config import get_profile
from ichpro.errors import IchproError
from ichpro.experiments import Row, row_folder
from ichpro.metrics import classification_metrics
from ichpro.probes import out_of_fold_probe, probe_table
from ichpro.train import OOF_FILE, split_folds
from ichpro.views.tables import (
    SUMMED,
    auc_versus_ceiling,
    describe_ceilings,
    describe_probe,
    describe_seed_spans,
    describe_spread,
    describe_stay,
    describe_versus,
    finished_rows,
    loss_label,
    outcome_groups,
    plot_hospital_stay,
    pooled_vs_per_fold,
    row_status,
    versus_row,
)


def results() -> pd.DataFrame:
    return pd.DataFrame({"row": ["A", "B", "C"], "paper_auc": [0.9, np.nan, 0.8], "auc": [0.7, 0.8, 0.9],
                         "auc_ci_low": [0.6, 0.7, 0.85], "auc_ci_high": [0.8, 0.9, 0.95],
                         "n_seeds": 3, "auc_seed_min": [0.65, 0.75, 0.85], "auc_seed_max": [0.75, 0.85, 0.95],
                         "difference": [np.nan, 0.1, 0.2], "p_holm": [np.nan, 0.2, 0.01],
                         "call": [np.nan, "not established", "real"], "ceiling_auc": [0.95, 0.85, 0.9]})


def oof(p_bad, fold=(0, 0, 0, 1, 1, 1), label=(0, 0, 1, 0, 1, 1), **more) -> pd.DataFrame:
    return pd.DataFrame({"patient_id": [f"{i:03d}" for i in range(len(p_bad))], "fold": fold, "label": label,
                         "p_bad": p_bad, **more})


def test_losses_are_written_as_the_tables_write_them():
    assert loss_label((("ce", 1.0), ("sdm", 0.5), ("mlm", 1.0))) == "CE + 0.5·SDM + MLM"


def test_auc_against_ceiling_has_the_gap():
    np.testing.assert_allclose(auc_versus_ceiling(results())["gap"], [0.25, 0.05, 0.0])


def test_spread_counts_rows_whose_cis_overlap():
    said = describe_spread(results())
    assert "span 0.700-0.900 (0.200)" in said and "0.100 to 0.200 wide" in said
    assert "2 of 3 pairs of rows have overlapping CIs" in said  # A-B and B-C; A-C do not


def test_ceilings_sentence_compares_fused_with_the_better_single_one():
    said = describe_ceilings(results(), fused="A", image="B", report="C")
    assert "all variables (A) 0.950" in said and "+0.050 above" in said


def test_pooled_vs_per_fold_on_hand_computed_runs():
    shifted = oof([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])  # each fold ranks perfectly, fold 1 shifted up: 0.6 > 0.3
    runs = {"X": {0: shifted.assign(p_bad_uncalibrated=[0.1, 0.2, 0.3, 0.25, 0.35, 0.45]), 1: shifted}}
    late = pooled_vs_per_fold(runs)
    assert list(late.index) == [("X", 0), ("X", 1)]
    assert late.loc[("X", 0), "mean per-fold AUC"] == 1.0
    assert late.loc[("X", 0), "pooled AUC"] == pytest.approx(8 / 9)
    assert late.loc[("X", 0), "pooled AUC, uncalibrated"] == 1.0
    assert np.isnan(late.loc[("X", 1), "pooled AUC, uncalibrated"])
    assert late.loc[("X", 0), "folds' mean P(bad)"] == "0.20-0.70"
    assert describe_seed_spans(late)[0] == "pooled AUC over 2 seeds: X 0.889-0.889"
    assert SUMMED == "Text + vision logits summed"


def test_outcome_groups_and_stay_medians():
    truth = pd.DataFrame({"gos": [1, 1, 3, 3, 5], "died_30d": [1, 0, 0, 0, 0], "label": [1, 1, 1, 1, 0],
                          "hospital_stay_days": [3, 30, 10, 20, 8]})
    assert list(outcome_groups(truth)) == ["died by day 30", "GOS 1", "GOS 3", "GOS 3", "GOS 5"]
    assert describe_stay(truth) == ("Median hospital stay in days: died by day 30: 3; GOS 1: 30; GOS 3: 15; "
                                    "GOS 5: 8.")
    fig = plot_hospital_stay(truth)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "hospital stay (days)"
    assert ax.get_legend().get_title().get_text() == "outcome label"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["died by day 30", "GOS 1", "GOS 3", "GOS 5"]
    plt.close(fig)


def test_out_of_fold_probe_predicts_every_patient_without_its_own_fold():
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 50)
    folds = split_folds(labels, 5, 0.2, seed=0)
    features = rng.normal(size=(100, 4))
    features[:, 0] += 3 * labels
    p = out_of_fold_probe(features, labels, folds)
    assert np.isfinite(p).all() and classification_metrics(labels, p)["auc"] > 0.95
    flipped = labels.copy()
    flipped[folds[0].test] = 1 - flipped[folds[0].test]  # a test fold's labels never reach its own probe
    np.testing.assert_allclose(out_of_fold_probe(features, flipped, folds)[folds[0].test], p[folds[0].test])


def test_probe_table_adds_out_of_fold_auc_with_its_ci():
    rng = np.random.default_rng(1)
    labels = np.tile([0, 1], 40)
    noise = rng.normal(size=(80, 3))
    pooled = np.stack([noise, noise + 3 * labels[:, None]])
    table = probe_table(pooled, labels, split_folds(labels, 4, 0.2, seed=0), n_boot=200)
    assert list(table.columns) == ["inner_val_auc", "inner_val_auc_sd", "out_of_fold_auc",
                                   "out_of_fold_auc_ci_low", "out_of_fold_auc_ci_high"]
    assert table.loc[1, "out_of_fold_auc"] > 0.95 and abs(table.loc[0, "out_of_fold_auc"] - 0.5) < 0.2
    assert (table["out_of_fold_auc_ci_low"] <= table["out_of_fold_auc"]).all()


def test_probe_readings_place_the_model_against_the_probes_ci():
    layers = pd.DataFrame({"inner_val_auc": [0.6, 0.8, 0.7], "out_of_fold_auc": [0.6, 0.8, 0.75],
                           "out_of_fold_auc_ci_low": [0.5, 0.7, 0.7],
                           "out_of_fold_auc_ci_high": [0.7, 0.9, 0.8]})
    row = pd.Series({"auc": 0.65, "ceiling_auc": 0.9}, name="Text only")
    first, second = describe_probe(layers, 2, row)
    assert first == ("The model reads layer 2 of 2; the best layer on inner validation is 1 "
                     "(not the same: this cohort's inner splits prefer 1).")
    assert "the Text only model: 0.650, below the probe's CI" in second
    assert "inside the probe's CI" in describe_probe(layers, 1, row.replace(0.65, 0.8))[1]
    with pytest.raises(IchproError, match="layer 5"):
        describe_probe(layers, 5, row)


def test_rows_against_a_baseline_on_hand_computed_aucs():
    predictions = {"base": {0: oof([0.1, 0.6, 0.4, 0.2, 0.5, 0.7])},  # AUC 7/9; per fold 1/2 and 1
                   "perfect": {0: oof([0.1, 0.2, 0.8, 0.3, 0.9, 0.7]).iloc[::-1]}}  # matched by patient
    rows = [Row("base"), Row("perfect")]
    versus = versus_row(rows, predictions, "base")
    assert list(versus.index) == ["perfect"] and versus.at["perfect", "b"] == "base"
    assert versus.at["perfect", "auc_a"] == 1.0 and versus.at["perfect", "auc_b"] == pytest.approx(7 / 9)
    assert versus.at["perfect", "difference"] == pytest.approx(0.25)  # mean of the per-fold gains 1/2 and 0
    said = describe_versus(versus, "base")
    assert said[0] == "1 of 1 rows have a higher mean AUC than base (0.778)."
    assert said[1].startswith("Calls against base (Holm over these comparisons): real: 0, equivalent: 0, ")
    assert said[2] == "The per-fold difference from base ranges from +0.250 (perfect) to +0.250 (perfect)."


def test_row_status_tells_loaded_from_trained_rows(tmp_path):
    profile = get_profile("smoke")
    rows = [Row("CE", loss="ce"), Row("VTMF", reference=True)]
    done = row_folder(tmp_path, profile, rows[0], 0)
    done.mkdir(parents=True)
    (done / OOF_FILE).write_text("patient_id,fold,p_bad,label\n")
    (done / "timing.json").write_text('{"seconds": 40}')
    finished = finished_rows(rows, profile, tmp_path, 0)
    assert finished == {"CE"}
    status = row_status(rows, profile, tmp_path, 0, finished)
    assert list(status["this run"]) == ["loaded", "trained"]
    assert status.loc["CE", "training time per fold (s)"] == 40 / profile.train.n_folds
    assert np.isnan(status.loc["VTMF", "training time per fold (s)"])
    assert status.loc["CE", "run folder"] == done.name
