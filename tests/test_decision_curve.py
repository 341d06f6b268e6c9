"""Net benefit on hand-computed cases."""

import numpy as np
import pytest

from ichpro.decision_curve import (
    TREAT_ALL,
    TREAT_NONE,
    decision_curves,
    decision_table,
    net_benefit,
    treat_all,
    useful_models,
)
from ichpro.errors import IchproError

LABELS = np.array([1, 1, 0, 0, 0])
P_BAD = np.array([0.9, 0.4, 0.6, 0.2, 0.1])


def test_net_benefit_by_hand():
    # t = 0.5: acted on 0.9 and 0.6 -> TP 1, FP 1 of 5: 1/5 - 1/5 * 1 = 0
    # t = 0.25: acted on 0.9, 0.4, 0.6 -> TP 2, FP 1: 2/5 - 1/5 * 1/3
    np.testing.assert_allclose(net_benefit(LABELS, P_BAD, [0.5, 0.25]), [0.0, 0.4 - 0.2 / 3])
    # acting at P(bad) >= t: a patient exactly at the threshold is acted on
    assert net_benefit(LABELS, P_BAD, [0.4])[0] == pytest.approx(0.4 - 0.2 * 0.4 / 0.6)


def test_treat_all_by_hand():
    np.testing.assert_allclose(treat_all(LABELS, [0.2, 0.5]), [0.4 - 0.6 * 0.25, 0.4 - 0.6])


def test_curves_hold_every_model_and_the_two_defaults():
    curves = decision_curves(LABELS, {"m": np.stack([P_BAD, P_BAD])}, thresholds=[0.25, 0.5], n_boot=50)
    assert set(curves["model"]) == {"m", TREAT_ALL, TREAT_NONE}
    m = curves[curves["model"] == "m"]
    # mean of equal runs
    np.testing.assert_allclose(m["net_benefit"], net_benefit(LABELS, P_BAD, [0.25, 0.5]))
    assert (m["ci_low"] <= m["net_benefit"]).all() and (m["net_benefit"] <= m["ci_high"]).all()
    assert (curves.loc[curves["model"] == TREAT_NONE, "net_benefit"] == 0).all()
    defaults = np.maximum(treat_all(LABELS, [0.25, 0.5]), 0)  # the better of treat all and treat none
    np.testing.assert_allclose(m["advantage"], m["net_benefit"] - defaults)
    assert (m["advantage_ci_low"] <= m["advantage"]).all()
    assert (m["advantage"] <= m["advantage_ci_high"]).all()
    assert decision_table(curves, thresholds=[0.25]).shape == (3, 1)


def test_a_perfect_model_is_useful_and_a_constant_one_is_not():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.4).astype(int)
    curves = decision_curves(y, {"perfect": np.where(y == 1, 0.95, 0.05), "constant": np.full(400, 0.4)},
                             thresholds=[0.3], n_boot=200)
    assert useful_models(curves, 0.3) == ["perfect"]


def test_thresholds_outside_zero_and_one_are_refused():
    with pytest.raises(IchproError, match="strictly between 0 and 1"):
        net_benefit(LABELS, P_BAD, [0.0, 0.5])
