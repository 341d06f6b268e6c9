"""Platt scaling of a fold model's P(bad): the identity is the softmax, the fit recovers a known
scaling, never reverses the ranking, stays finite on separable margins, and is saved per fold; and the
measures of calibration (slope, intercept, calibration-in-the-large, scaled Brier, smoothed curve)."""

import json

import numpy as np
import pytest
import torch
from scipy.special import expit

from ichpro.calibration import IDENTITY, PlattScaling, margin


def test_identity_is_the_softmax():
    logits = torch.tensor([[0.3, -1.2], [2.0, 2.5], [-4.0, 1.0]])
    np.testing.assert_allclose(IDENTITY.p_bad(margin(logits).numpy()), logits.softmax(dim=1)[:, 1].numpy(),
                               rtol=1e-6)


def test_fit_recovers_a_known_scaling():
    rng = np.random.default_rng(0)
    m = rng.normal(0, 2, 20000)
    y = (rng.random(m.size) < expit(0.5 * m - 1.0)).astype(int)
    fitted = PlattScaling.fit(m, y)
    assert fitted.slope == pytest.approx(0.5, abs=0.03) and fitted.intercept == pytest.approx(-1.0, abs=0.05)


def test_a_shifted_fold_is_moved_back():
    """A model whose margins are all 3 too high: the fit removes the shift (slope 1, intercept -3)."""
    rng = np.random.default_rng(1)
    m = rng.normal(0, 1.5, 20000)
    y = (rng.random(m.size) < expit(m)).astype(int)
    fitted = PlattScaling.fit(m + 3, y)
    assert fitted.slope == pytest.approx(1.0, abs=0.05) and fitted.intercept == pytest.approx(-3.0, abs=0.1)


def test_the_slope_never_turns_negative():
    m = np.linspace(-3, 3, 40)
    fitted = PlattScaling.fit(m, (m < 0).astype(int))  # a model that ranks backwards
    assert fitted.slope == 0.0
    # with slope 0 every patient gets the smoothed share of bad outcomes
    np.testing.assert_allclose(fitted.p_bad(m), 21 / 42, rtol=1e-4)


def test_separable_margins_give_a_finite_scaling():
    m = np.array([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0])
    fitted = PlattScaling.fit(m, np.array([0, 0, 0, 1, 1, 1]))
    assert np.isfinite([fitted.slope, fitted.intercept]).all() and fitted.slope > 0
    # Platt's smoothed targets: the most confident patients stay short of 0 and 1
    p = fitted.p_bad(m)
    assert 0.05 < p.min() < 0.5 < p.max() < 0.95


def test_load_reads_a_saved_scaling_and_defaults_to_the_identity(tmp_path):
    assert PlattScaling.load(tmp_path / "missing.json") == IDENTITY
    (tmp_path / "calibration.json").write_text(json.dumps({"slope": 0.7, "intercept": -0.2}))
    assert PlattScaling.load(tmp_path / "calibration.json") == PlattScaling(0.7, -0.2)


def _simulated(slope: float, shift: float, n: int = 20000, seed: int = 0):
    """Labels drawn from sigmoid(z) and predictions sigmoid((z - shift) / slope): a model whose
    recalibration slope is ``slope`` and whose log-odds are ``shift`` too high on average."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < expit(z)).astype(float)
    return y, expit(z / slope + shift)


def test_calibration_rows_agree_with_an_unpenalised_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    from ichpro.calibration import calibration_rows

    y, p = _simulated(0.6, 0.4, n=500)
    rows = calibration_rows(y[None], p[None])
    z = np.log(p / (1 - p))[:, None]
    fitted = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(z, y)
    assert rows["slope"][0] == pytest.approx(fitted.coef_[0, 0], rel=1e-4)
    assert rows["intercept"][0] == pytest.approx(fitted.intercept_[0], abs=1e-4)


def test_a_calibrated_model_has_slope_one_and_no_offset_and_a_wrong_one_is_caught():
    from ichpro.calibration import calibration_table

    good = calibration_table(*_simulated(1.0, 0.0), n_boot=200).set_index("measure")["value"]
    assert good["slope"] == pytest.approx(1.0, abs=0.05) and good["citl"] == pytest.approx(0.0, abs=0.05)
    extreme = calibration_table(*_simulated(0.5, 0.0), n_boot=200).set_index("measure")["value"]
    assert extreme["slope"] == pytest.approx(0.5, abs=0.05)  # predictions twice as extreme as they should be
    high = calibration_table(*_simulated(1.0, 1.0), n_boot=200).set_index("measure")
    assert (high.at["citl", "ci_high"] < 0
            and high.at["mean_predicted", "value"] > high.at["observed", "value"])


def test_scaled_brier_is_zero_for_the_outcome_rate_and_intervals_hold_the_mean_over_seeds():
    from ichpro.calibration import calibration_table

    y, p = _simulated(1.0, 0.0, n=400)
    flat = calibration_table(y, np.full(y.size, y.mean()), n_boot=50).set_index("measure")
    assert flat.at["scaled_brier", "value"] == pytest.approx(0.0, abs=1e-12)
    table = calibration_table(y, [p, expit(np.log(p / (1 - p)) * 1.2)], n_boot=200).set_index("measure")
    assert (table["ci_low"] <= table["value"]).all() and (table["value"] <= table["ci_high"]).all()
    assert (table["n_seeds"] == 2).all() and table.at["slope", "seed_min"] < table.at["slope", "seed_max"]


def test_the_smoothed_curve_follows_the_diagonal_of_a_calibrated_model():
    from ichpro.calibration import smoothed_calibration

    y, p = _simulated(1.0, 0.0, n=5000)
    curve = smoothed_calibration(y, p, n_boot=50)
    assert (curve["observed"] - curve["predicted"]).abs().max() < 0.06
    assert (curve["ci_low"] <= curve["observed"]).all() and (curve["observed"] <= curve["ci_high"]).all()
