"""Comparisons over repeated cross-validation: the corrected t-test, Holm, the one decision rule."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ichpro.errors import IchproError
from ichpro.metrics import delong_test
from ichpro.repeated_cv import call_difference, compare_over_seeds, corrected_t_test, fold_differences, holm


def test_the_corrected_t_test_on_a_hand_computed_case():
    # d = 0.01..0.05: mean 0.03, sample variance 2.5e-4; k r = 5 and n_test / n_train = 1/4
    result = corrected_t_test([0.01, 0.02, 0.03, 0.04, 0.05], 0.25)
    se = np.sqrt((1 / 5 + 0.25) * 2.5e-4)  # 0.0106
    assert result["mean"] == pytest.approx(0.03)
    assert result["t"] == pytest.approx(0.03 / se)  # 2.83
    assert result["df"] == 4
    assert result["p"] == pytest.approx(2 * stats.t.sf(0.03 / se, 4))  # 0.047
    assert result["ci_low"] == pytest.approx(0.03 - stats.t.ppf(0.975, 4) * se)
    # the correction widens the plain t-test's interval: same mean, larger p
    plain = stats.ttest_1samp([0.01, 0.02, 0.03, 0.04, 0.05], 0.0).pvalue
    assert result["p"] > plain


def test_holm_adjusts_step_down_keeps_order_and_nan():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, np.nan]), [0.03, 0.06, 0.06, np.nan])
    np.testing.assert_allclose(holm([0.2, 0.9]), [0.4, 0.9])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # monotone in the sorted order, capped at 1


@pytest.mark.parametrize(("p", "low", "high", "expected"), [
    (0.01, 0.01, 0.05, "real"),
    (0.30, -0.01, 0.015, "equivalent"),
    (0.30, -0.01, 0.03, "not established"),
    (0.04, -0.005, 0.005, "real"),  # significance is read first
])
def test_one_rule_calls_a_difference(p, low, high, expected):
    assert call_difference(p, low, high) == expected


def _run(labels, folds, signal, rng):
    """Out-of-fold predictions whose scores carry ``signal`` times the label plus unit noise."""
    scores = signal * labels + rng.normal(size=labels.size)
    return pd.DataFrame({"patient_id": np.arange(labels.size), "fold": folds, "label": labels,
                         "p_bad": 1 / (1 + np.exp(-scores))})


def test_a_single_seeds_delong_can_be_significant_where_the_corrected_test_is_not():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    a, b = {}, {}
    for seed, (signal_a, signal_b) in enumerate([(1.6, 0.9), (1.0, 1.1), (1.0, 1.15)]):
        folds = np.random.default_rng(seed).permutation(np.arange(400) % 5)
        a[seed], b[seed] = _run(labels, folds, signal_a, rng), _run(labels, folds, signal_b, rng)
    first = delong_test(labels, a[0]["p_bad"], b[0]["p_bad"])[2]
    assert first < 0.05  # seed 0 alone: "significant"
    result = compare_over_seeds(a, b)
    assert result["p"] > 0.05 and result["n_seeds"] == 3
    assert result["seed_mean_min"] < 0 < result["seed_mean_max"]
    assert call_difference(holm([result["p"]])[0], result["ci_low"], result["ci_high"]) == "not established"


def test_fold_differences_refuse_rows_on_other_folds_or_seeds():
    labels = np.tile([0, 1], 50)
    run = _run(labels, np.arange(100) % 5, 1.0, np.random.default_rng(0))
    table = fold_differences({0: run}, {0: run})
    assert len(table) == 5 and (table["difference"] == 0).all()
    assert set(table["n_test"]) == {20} and set(table["n_train"]) == {80}
    with pytest.raises(IchproError, match="different patients"):
        fold_differences({0: run}, {0: run.assign(fold=np.roll(run["fold"], 1))})
    with pytest.raises(IchproError, match="different seeds"):
        fold_differences({0: run}, {1: run})
