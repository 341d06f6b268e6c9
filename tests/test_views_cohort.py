"""Notebook 01's views: the distributions figure and the oracle AUC table."""

import numpy as np
import pandas as pd
import pytest

from ichpro.views.cohort import ORACLES, OUTCOMES, oracle_auc_table, plot_distributions


def small_truth(n: int = 40, seed: int = 0) -> pd.DataFrame:
    """A truth.csv-like table: columns the figures and the AUC table read, label = GOS <= 3."""
    rng = np.random.default_rng(seed)
    gos = np.tile([1, 2, 3, 4, 5], n // 5)
    label = (gos <= 3).astype(int)
    return pd.DataFrame({
        "age": rng.integers(40, 95, n), "gcs": rng.integers(3, 16, n), "gos": gos, "label": label,
        "location": np.tile(["deep", "lobar", "cerebellar", "brainstem"], n // 4),
        "volume_ml": rng.uniform(1, 80, n), "ich_score": label * 2 + rng.integers(0, 2, n),
        "func_score": 11 - 3 * label, "hospital_stay_days": rng.integers(1, 60, n),
        **{column: label * 0.8 + 0.1 for column in ORACLES}})


def test_distributions_label_every_axis_in_words_and_name_the_outcomes():
    fig = plot_distributions(small_truth())
    assert len(fig.axes) == 6
    labels = [label for ax in fig.axes for label in (ax.get_xlabel(), ax.get_ylabel())]
    assert all(label and "_" not in label for label in labels)
    assert "hospital stay (days)" in labels and "haematoma volume (mL, log scale)" in labels
    assert all(ax.get_legend() is None for ax in fig.axes)  # one legend for the figure
    (legend,) = fig.legends
    assert [text.get_text() for text in legend.get_texts()] == list(OUTCOMES.values())


def test_oracle_auc_table_scores_every_oracle_and_both_clinical_scores():
    truth = small_truth()
    reversed_image = truth.assign(**{"p_bad_oracle_image": 1 - truth["p_bad_oracle_image"]})
    table = oracle_auc_table({"a": truth, "b": reversed_image})
    assert table.columns.tolist() == ["cohort", "oracle", "auc"]
    assert len(table) == 2 * (len(ORACLES) + 2)
    auc = table.set_index(["cohort", "oracle"])["auc"]
    assert auc["a", "all variables"] == 1.0 and auc["a", "image only"] == 1.0
    assert auc["b", "image only"] == 0.0  # a probability of a good outcome ranks the wrong way
    assert auc["a", "FUNC score (negated)"] == 1.0  # a higher FUNC score means a good outcome
    # ICH score: bad patients score 2-3, good 0-1, so it separates them perfectly too
    assert auc["a", "ICH score"] == pytest.approx(1.0)
