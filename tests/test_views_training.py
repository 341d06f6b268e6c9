"""Training views: human labels, each fold's kept epoch, loss curves over the epochs every fold ran."""

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from ichpro.errors import IchproError
from ichpro.views.training import (
    KEPT,
    column_label,
    describe_loss_changes,
    describe_recalibration,
    kept_epochs,
    plot_calibration_confusion,
    plot_relative_losses,
    plot_training_curves,
    recalibration_table,
    relative_losses,
)


def history(epochs=(3, 2)) -> pd.DataFrame:
    """Two folds; fold 1 stops early. CE halves every epoch; SDM is 4 in fold 0 and 2 in fold 1, always."""
    rows = [{"fold": f, "epoch": e, "train_total": 9.0, "train_ce": 0.5 ** (e - 1),
             "train_sdm": 4.0 / (f + 1), "val_loss": 0.7, "val_auc": 0.5 + 0.1 * e}
            for f, n in enumerate(epochs) for e in range(1, n + 1)]
    return pd.DataFrame(rows)


def write_state(folder, fold, best):
    (folder / f"fold{fold}").mkdir(parents=True)
    files = {"last": "last-3.safetensors", **({"best": best} if best else {})}
    (folder / f"fold{fold}" / "state.json").write_text(json.dumps({"epoch": 3, "files": files}))


def test_columns_get_human_labels_and_unknown_ones_are_refused():
    assert column_label("train_sdm") == "training loss: SDM"
    assert column_label("train_blend") == "training loss: blend"
    assert column_label("val_auc") == "inner-validation AUC"
    with pytest.raises(IchproError, match="seconds"):
        column_label("seconds")


def test_kept_epochs_are_read_from_each_folds_state(tmp_path):
    write_state(tmp_path, 0, "best-10.safetensors")
    write_state(tmp_path, 1, "best-2.safetensors")
    write_state(tmp_path, 2, None)
    kept = kept_epochs(tmp_path)
    assert kept.loc[0] == 10 and kept.loc[1] == 2 and np.isnan(kept.loc[2])
    with pytest.raises(IchproError, match="not a trained run folder"):
        kept_epochs(tmp_path / "fold0")


def test_training_curves_have_human_labels_and_mark_each_kept_epoch():
    fig = plot_training_curves(history(), pd.Series({0: 2, 1: 1}))
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_visible() and ax.axison]
    assert labels == ["training loss: CE", "training loss: SDM", "inner-validation loss (cross-entropy)",
                      "inner-validation AUC"]
    assert not any("_" in label for label in labels)
    auc_panel = fig.axes[3]
    stars = np.concatenate([c.get_offsets() for c in auc_panel.collections])
    np.testing.assert_allclose(sorted(map(tuple, stars)), [(1, 0.6), (2, 0.7)])
    assert KEPT in [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)


def test_relative_losses_average_only_epochs_every_fold_ran():
    curves = relative_losses(history())
    assert list(curves.index) == [1, 2] and list(curves.columns) == ["train_ce", "train_sdm"]
    np.testing.assert_allclose(curves["train_ce"], [1.0, 0.5])
    np.testing.assert_allclose(curves["train_sdm"], [1.0, 1.0])  # each fold against its own first epoch


def test_relative_loss_figure_names_terms_and_says_what_it_averages():
    fig = plot_relative_losses({"A": history(), "B": history((2, 2))})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["CE", "SDM"]
    assert "epochs every fold ran" in fig.axes[0].get_xlabel()
    assert len(fig.axes[0].lines[0].get_xdata()) == 2
    plt.close(fig)


def test_loss_changes_are_counted_per_fold_from_first_to_last_epoch():
    said = describe_loss_changes("A", history())
    assert said.startswith("A, each fold's first to last epoch: CE fell in 2 of 2 folds")
    assert "SDM fell in 0 of 2 folds (median change +0.0%)" in said


def test_recalibration_table_reads_each_folds_scaling(tmp_path):
    (tmp_path / "fold0").mkdir()
    (tmp_path / "fold0" / "calibration.json").write_text(json.dumps({"slope": 2.0, "intercept": -1.0}))
    oof = pd.DataFrame({"fold": [0, 0, 1, 1], "label": [0, 1, 0, 1], "p_bad": [0.2, 0.6, 0.3, 0.5],
                        "p_bad_uncalibrated": [0.4, 0.8, 0.3, 0.5]})
    table = recalibration_table(tmp_path, oof)
    assert table.loc[0, "slope"] == 2.0 and table.loc[1, "slope"] == 1.0  # fold 1: not recalibrated
    np.testing.assert_allclose(table["mean P(bad) before"], [0.6, 0.4])
    np.testing.assert_allclose(table["after"], [0.4, 0.4])
    assert describe_recalibration(oof).startswith("pooled AUC 1.000 with the fold models' own probabilities")


def test_calibration_and_confusion_figure_counts_patients_at_the_threshold():
    oof = pd.DataFrame({"label": [0, 0, 1, 1, 1], "p_bad": [0.1, 0.7, 0.8, 0.9, 0.4]})
    fig = plot_calibration_confusion(oof)
    counts = [t.get_text() for t in fig.axes[1].texts]
    assert counts == ["1", "1", "1", "2"]  # tn, fp, fn, tp
    assert fig.axes[0].get_xlabel() == "predicted P(bad)" and "true outcome" == fig.axes[1].get_ylabel()
    plt.close(fig)
