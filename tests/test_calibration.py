"""Platt scaling of a fold model's P(bad): the identity is the softmax, the fit recovers a known
scaling, never reverses the ranking, stays finite on separable margins, and is saved per fold."""

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
