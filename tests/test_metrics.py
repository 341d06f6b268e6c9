import time
import warnings

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import norm
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from ichpro.errors import IchproError
from ichpro.metrics import (
    METRICS,
    bootstrap_ci,
    calibration_curve_table,
    classification_metrics,
    delong_test,
    metrics_over_seeds,
    metrics_table,
)

# Six patients, hand-checked: 4 bad, 2 good; a bad and a good patient tie at 0.55.
HAND_Y = np.array([1, 1, 1, 1, 0, 0])
HAND_P = np.array([0.9, 0.8, 0.65, 0.55, 0.55, 0.1])


def random_data(n, seed, shift=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, expit(shift * (2 * y - 1) + rng.normal(0, 1.5, n))


def binormal(n, delta, seed):
    """Half bad, half good; bad scores ~ N(delta, 1), good ~ N(0, 1), mapped into (0, 1)."""
    rng = np.random.default_rng(seed)
    y = np.repeat([1, 0], n // 2)
    return y, norm.cdf(rng.normal(0, 1, y.size) + delta * y)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_classification_metrics_match_sklearn(seed, threshold):
    y, p = random_data(300, seed)
    pred = (p > threshold).astype(int)
    got = classification_metrics(y, p, threshold)
    assert tuple(got) == METRICS
    expected = {
        "accuracy": accuracy_score(y, pred),
        "recall": recall_score(y, pred),
        "precision": precision_score(y, pred),
        "f1": f1_score(y, pred),
        "auc": roc_auc_score(y, p),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "specificity": recall_score(y, pred, pos_label=0),
        "brier": brier_score_loss(y, p),
    }
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_ties_in_scores_match_sklearn_auc():
    y, p = random_data(400, 3)
    p = np.round(p, 1)
    assert classification_metrics(y, p)["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_hand_computed_six_patients():
    got = classification_metrics(HAND_Y, HAND_P)
    # predicted bad (p > 0.5): all but the last -> TP 4, FN 0, FP 1, TN 1
    precision, recall = 4 / 5, 4 / 4
    # AUC over 4 x 2 pairs: 0.9, 0.8, 0.65 beat both good patients (6); 0.55 ties one, beats one (1.5)
    # ECE bins: [0.9,1) {0.9: y 1}, [0.8,0.9) {0.8: 1}, [0.6,0.7) {0.65: 1}, [0.5,0.6) {0.55: 1, 0.55: 0},
    # [0.1,0.2) {0.1: 0}
    ece = (1 * 0.1 + 1 * 0.2 + 1 * 0.35 + 2 * abs(0.55 - 0.5) + 1 * 0.1) / 6
    expected = {
        "accuracy": 5 / 6,
        "recall": recall,
        "precision": precision,
        "f1": 2 * precision * recall / (precision + recall),
        "auc": 7.5 / 8,
        "balanced_accuracy": (1 + 1 / 2) / 2,
        "specificity": 1 / 2,
        "brier": (0.1**2 + 0.2**2 + 0.35**2 + 0.45**2 + 0.55**2 + 0.1**2) / 6,
        "ece": ece,
    }
    assert got == pytest.approx(expected, abs=1e-12)


def test_threshold_is_strict():
    # at threshold 0.55 the tied patients are called good: TP 3, FN 1, FP 0
    got = classification_metrics(HAND_Y, HAND_P, threshold=0.55)
    assert (got["recall"], got["precision"], got["specificity"]) == (0.75, 1.0, 1.0)


def test_pooled_f1_is_not_the_mean_of_fold_f1s():
    folds = [(np.array([1, 0, 0, 0]), np.array([0.9, 0.1, 0.2, 0.3])),   # TP 1: F1 = 1
             (np.array([1, 1, 1, 0]), np.array([0.9, 0.2, 0.3, 0.8]))]   # TP 1, FN 2, FP 1: F1 = 0.4
    per_fold = [classification_metrics(y, p)["f1"] for y, p in folds]
    assert per_fold == pytest.approx([1.0, 0.4])
    y, p = (np.concatenate(column) for column in zip(*folds))
    pooled = classification_metrics(y, p)
    # pooled: TP 2, FN 2, FP 1 -> P = 2/3, R = 1/2, F1 = 4/7, whereas the mean of fold F1s is 0.7
    assert pooled["f1"] == pytest.approx(4 / 7)
    assert pooled["f1"] == pytest.approx(f1_score([1, 0, 0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 1, 0, 0, 1]))
    assert abs(pooled["f1"] - np.mean(per_fold)) > 0.1


def test_no_predicted_positives_gives_zero_precision_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = classification_metrics([1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4])
        table = metrics_table([1, 0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4, 0.9], n_boot=50)
    assert got["precision"] == 0.0 and got["f1"] == 0.0 and got["recall"] == 0.0
    assert table["value"].notna().all()


def test_single_class_gives_nan_auc():
    p = [0.2, 0.7, 0.4]
    got = classification_metrics([1, 1, 1], p)
    assert np.isnan(got["auc"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred has a class absent from y_true
        assert got["balanced_accuracy"] == balanced_accuracy_score([1, 1, 1], [0, 1, 0])
    assert np.isnan(bootstrap_ci([0, 0, 0], p, "auc", n_boot=20)).all()


@pytest.mark.parametrize(("labels", "p", "message"), [
    ([0, 1, 1], [0.2, 0.3], "as long as labels"),
    ([0, 2, 1], [0.2, 0.3, 0.4], r"0 \(good\) or 1 \(bad\); found \[2\]"),
    ([0, 1, 1], [0.2, np.nan, 0.4], "p_bad must be finite; 1 values are NaN or infinite .first at index 1"),
    ([0, 1, 1], [0.2, np.inf, 0.4], "must be finite"),
    ([0, 1, 1], [-0.2, 0.5, 1.4], r"in \[0, 1\] \(probabilities, not logits\); found min -0.2, max 1.4"),
    ([], [], "non-empty 1-D"),
    ([[0, 1]], [[0.1, 0.2]], "non-empty 1-D"),
    ([0, 1], ["a", "b"], "p_bad must be numeric"),
])
def test_invalid_inputs_are_rejected(labels, p, message):
    with pytest.raises(IchproError, match=message):
        classification_metrics(labels, p)


def test_invalid_options_are_rejected():
    y, p = random_data(50, 0)
    with pytest.raises(IchproError, match="threshold must lie in"):
        classification_metrics(y, p, threshold=1.5)
    with pytest.raises(IchproError, match="unknown metric.*'mcc'.*choose from accuracy"):
        bootstrap_ci(y, p, "mcc")
    with pytest.raises(IchproError, match="n_boot must be at least 1"):
        bootstrap_ci(y, p, "auc", n_boot=0)
    with pytest.raises(IchproError, match="level must lie strictly between"):
        bootstrap_ci(y, p, "auc", level=95)
    with pytest.raises(IchproError, match="at least 2 patients of each class; got 1 bad"):
        delong_test([1, 0, 0], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(IchproError, match="p_b must be a 1-D array as long as labels"):
        delong_test(y, p, p[:-1])


# ---------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_contains_the_estimate_and_narrows_with_more_patients():
    widths = {}
    for n in (100, 2000):
        y, p = random_data(n, 4)
        for name in ("auc", "accuracy", "f1"):
            point, low, high = bootstrap_ci(y, p, name)
            assert low <= point <= high, (n, name)
            assert point == classification_metrics(y, p)[name]
            widths[n, name] = high - low
    for name in ("auc", "accuracy", "f1"):
        assert widths[2000, name] < widths[100, name] / 2


def test_bootstrap_is_seeded():
    y, p = random_data(200, 5)
    assert bootstrap_ci(y, p, "auc", seed=7) == bootstrap_ci(y, p, "auc", seed=7)
    assert bootstrap_ci(y, p, "auc", seed=7)[1:] != bootstrap_ci(y, p, "auc", seed=8)[1:]


def test_bootstrap_is_stratified():
    y, p = random_data(101, 6)
    assert bootstrap_ci(y, p, lambda yb, pb: yb.sum(), n_boot=200) == (y.sum(),) * 3


def test_callable_metric_agrees_with_the_named_one():
    y, p = random_data(150, 7)
    named = bootstrap_ci(y, p, "auc", n_boot=200, seed=3)
    assert bootstrap_ci(y, p, roc_auc_score, n_boot=200, seed=3) == pytest.approx(named, abs=1e-12)


def test_bootstrap_ci_covers_a_known_auc():
    delta = 1.0
    y, p = binormal(400, delta, seed=11)
    _, low, high = bootstrap_ci(y, p, "auc")
    assert low < norm.cdf(delta / np.sqrt(2)) < high


def test_metrics_table_shares_replicates_with_bootstrap_ci():
    y, p = random_data(500, 8)
    start = time.perf_counter()
    table = metrics_table(y, p, n_boot=1000, seed=2)
    assert time.perf_counter() - start < 2.0
    assert list(table.columns) == ["metric", "value", "ci_low", "ci_high"]
    assert tuple(table["metric"]) == METRICS
    assert (table["ci_low"] <= table["value"]).all() and (table["value"] <= table["ci_high"]).all()
    auc = table.set_index("metric").loc["auc"]
    assert bootstrap_ci(y, p, "auc", seed=2) == (auc["value"], auc["ci_low"], auc["ci_high"])
    subset = metrics_table(y, p, n_boot=1000, seed=2, metrics=("ece", "brier"))
    assert subset.set_index("metric").equals(table.set_index("metric").loc[["ece", "brier"]])


# ---------------------------------------------------------------------------------------------- DeLong
def slow_delong(y, p_a, p_b):
    """Textbook DeLong (1988): structural components by explicit double loops."""
    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)
    v10 = np.zeros((2, m))
    v01 = np.zeros((2, n))
    for r, s in enumerate((p_a, p_b)):
        for i, a in enumerate(pos):
            for j, b in enumerate(neg):
                value = psi(s[a], s[b])
                v10[r, i] += value / n
                v01[r, j] += value / m
    auc = v10.mean(axis=1)
    s10 = sum(np.outer(v10[:, i] - auc, v10[:, i] - auc) for i in range(m)) / (m - 1)
    s01 = sum(np.outer(v01[:, j] - auc, v01[:, j] - auc) for j in range(n)) / (n - 1)
    cov = s10 / m + s01 / n
    z = (auc[0] - auc[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return auc[0], auc[1], 2 * norm.sf(abs(z))


@pytest.mark.parametrize("seed", [0, 1])
def test_delong_matches_the_slow_reference(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    p_a = np.round(expit(y + rng.normal(0, 1, 60)), 1)  # rounded: ties within and across classes
    p_b = np.round(expit(0.5 * y + rng.normal(0, 1, 60)), 2)
    got = delong_test(y, p_a, p_b)
    assert got == pytest.approx(slow_delong(y, p_a, p_b), abs=1e-10)
    assert got[:2] == pytest.approx((roc_auc_score(y, p_a), roc_auc_score(y, p_b)), abs=1e-12)


def test_delong_same_ranking_gives_p_one():
    y, p = random_data(200, 9)
    assert delong_test(y, p, p)[2] == 1.0
    assert delong_test(y, p, p**3)[2] == 1.0  # a monotone transform has the same AUC, variance 0


def test_delong_detects_a_much_better_model():
    y, p = random_data(300, 10, shift=2.0)
    chance = np.random.default_rng(10).uniform(size=300)
    auc_a, auc_b, p_value = delong_test(y, p, chance)
    assert auc_a == pytest.approx(roc_auc_score(y, p)) and auc_b == pytest.approx(roc_auc_score(y, chance))
    assert p_value < 1e-6


def test_delong_accepts_scores_outside_zero_one():
    y, p = random_data(100, 12)
    assert delong_test(y, np.log(p), 7 * p - 3)[2] == 1.0


# ---------------------------------------------------------------------------------------------- calibration
def test_calibrated_probabilities_have_small_ece():
    rng = np.random.default_rng(13)
    p = rng.uniform(size=20_000)
    y = (rng.uniform(size=p.size) < p).astype(int)
    table = calibration_curve_table(y, p)
    assert list(table.columns) == ["bin", "n", "mean_predicted", "observed_rate"]
    assert table["n"].sum() == p.size and (table["n"] > 0).all()
    assert np.allclose(table["observed_rate"], table["mean_predicted"], atol=0.05)
    assert classification_metrics(y, p)["ece"] < 0.03


def test_calibration_table_bins_and_empty_bins():
    table = calibration_curve_table(HAND_Y, HAND_P)
    assert table["n"].tolist() == [0, 1, 0, 0, 0, 2, 1, 0, 1, 1]
    populated = table[table["n"] > 0]
    assert populated["mean_predicted"].tolist() == pytest.approx([0.1, 0.55, 0.65, 0.8, 0.9])
    assert populated["observed_rate"].tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert table.loc[table["n"] == 0, ["mean_predicted", "observed_rate"]].isna().all().all()
    # ECE is the count-weighted mean gap of this table
    gap = (populated["n"] * (populated["mean_predicted"] - populated["observed_rate"]).abs()).sum() / 6
    assert classification_metrics(HAND_Y, HAND_P)["ece"] == pytest.approx(gap)


def test_metrics_over_seeds_average_the_runs_and_share_the_resamples():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    runs = np.stack([1 / (1 + np.exp(-(s * y + rng.normal(size=120)))) for s in (0.5, 1.0, 2.0)])
    table = metrics_over_seeds(y, runs, n_boot=200, seed=1, metrics=("auc", "f1")).set_index("metric")
    aucs = [classification_metrics(y, p)["auc"] for p in runs]
    assert table.at["auc", "value"] == pytest.approx(np.mean(aucs))
    assert table.at["auc", "seed_min"] == pytest.approx(min(aucs))
    assert table.at["auc", "seed_sd"] == pytest.approx(np.std(aucs, ddof=1))
    assert table.at["auc", "n_seeds"] == 3
    assert table.at["auc", "ci_low"] < table.at["auc", "value"] < table.at["auc", "ci_high"]
    # one run is metrics_table exactly (same resamples, same percentile interval)
    one = metrics_over_seeds(y, runs[:1], n_boot=200, seed=1, metrics=("auc",)).iloc[0]
    alone = metrics_table(y, runs[0], n_boot=200, seed=1, metrics=("auc",)).iloc[0]
    for column in ("value", "ci_low", "ci_high"):
        assert one[column] == alone[column]
    assert np.isnan(one["seed_sd"])
    with pytest.raises(IchproError, match="p_bad"):
        metrics_over_seeds(y, np.stack([runs[0], runs[1][:-1].tolist() + [2.0]]))
