"""Riley et al.'s minimum sample size for a binary outcome, against the published worked examples."""

import pytest

from ichpro.errors import IchproError
from ichpro.sample_size import cox_snell_from_c, max_cox_snell, minimum_sample_size


def _n(table):
    return table.set_index("key")["n"].to_dict()


def test_the_bmj_2020_binary_example():
    # Riley et al., BMJ 2020;368:m441: prevalence 0.05, 30 candidate parameters, Cox-Snell R² 0.05:
    # 73 (overall risk), 544 (MAPE 0.05), 5249 (shrinkage 0.9), 1770 (optimism 0.05); 263 events, EPP 8.75
    table = minimum_sample_size(0.05, 30, 0.05)
    assert _n(table) == {"overall_risk": 73, "mape": 544, "shrinkage": 5249, "optimism": 1770,
                         "minimum": 5249}
    final = table.set_index("key").loc["minimum"]
    assert (final["events"] == pytest.approx(262.45)
            and final["events_per_parameter"] == pytest.approx(8.75, abs=0.01))


def test_the_stat_med_2019_chagas_example():
    # Riley et al., Stat Med 2019;38:1276: prevalence 0.174, 24 parameters, Cox-Snell R² 0.288: 623 for
    # shrinkage, 662 for optimism (EPP 4.8, as its abstract states), 221 for the overall risk
    n = _n(minimum_sample_size(0.174, 24, 0.288))
    assert (n["shrinkage"], n["optimism"], n["overall_risk"]) == (623, 662, 221)
    assert 662 * 0.174 / 24 == pytest.approx(4.8, abs=0.01)


def test_the_largest_cox_snell_r2_at_even_odds_is_three_quarters():
    assert max_cox_snell(0.5) == pytest.approx(0.75)
    assert max_cox_snell(0.174) == pytest.approx(0.603, abs=1e-3)


def test_a_c_statistic_becomes_a_cox_snell_r2_that_grows_with_it():
    r2 = [cox_snell_from_c(c, 0.3, n=200_000) for c in (0.6, 0.7, 0.8, 0.9)]
    assert r2 == sorted(r2) and 0 < r2[0] < r2[-1] < max_cox_snell(0.3)


@pytest.mark.parametrize(("args", "message"), [
    ((0.0, 10, 0.1), "prevalence must lie strictly between 0 and 1"),
    ((0.3, 0, 0.1), "at least 1"),
    ((0.3, 10, 0.9), r"must lie in \(0, 0.705\)"),
])
def test_impossible_inputs_are_refused(args, message):
    with pytest.raises(IchproError, match=message):
        minimum_sample_size(*args)
    with pytest.raises(IchproError, match="C statistic"):
        cox_snell_from_c(0.4, 0.3)
