"""Notebook 10's views: the systems table, the diagrams, the volume plot, the Grad-CAM summary and figure."""

from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from ichpro.checkpoints import save_weights
from ichpro.config import get_profile
from ichpro.experiments import CEILINGS, table_rows
from ichpro.models.comparators import build_comparator
from ichpro.views.comparison import (
    fold_model,
    grad_cam_readings,
    grad_cam_summary,
    plot_grad_cam,
    plot_volume,
    system_pipelines,
    systems_table,
)

CPU = get_profile("cpu")
ROWS = table_rows("table4_comparison")


def test_systems_table_says_what_each_row_sees_learns_and_trains():
    table = systems_table(ROWS, CPU)
    assert list(table.index) == [r.name for r in ROWS]
    assert table.loc["ICHPro", "what trains"] == "after the frozen encoders"  # cpu freezes the encoders
    unfrozen = replace(CPU, model=replace(CPU.model, freeze_vision=False))
    assert systems_table(ROWS, unfrozen).loc["ICHPro", "what trains"] == "end to end"
    assert table.loc["ICH score", "what trains"] == "logistic regression"
    assert table.loc["Small 3D CNN", "what trains"] == "whole network, from scratch"
    assert table.loc["Concatenation late fusion", "what trains"] == "after the frozen encoders"
    assert table.loc["Small 3D CNN", "sees at prediction"] == "CT"
    assert table.loc["DenseNet + ord GCS + bin age", "learns from"] == "outcome, GCS class, age ≥ 80"
    assert table.loc["DenseNet, prognosis only", "paper's row"] == "not in the paper"
    assert set(table["ceiling (truth.csv)"]) <= set(CEILINGS.values())


def test_system_pipelines_show_the_ct_at_the_comparators_input():
    pipelines = system_pipelines(CPU)
    assert pipelines["Small 3D CNN (3D DL method)"][0] == ["CT 16×32×32"]
    assert all(columns[-1][0] == "P(bad)" for columns in pipelines.values())
    paper = get_profile("paper")
    assert pipelines != system_pipelines(paper)
    assert system_pipelines(paper)["Small 3D CNN (3D DL method)"][0] == [
        "CT " + "×".join(map(str, paper.preprocess.spatial_size))]


def test_volume_plot_puts_truth_against_the_estimate_on_equal_log_axes():
    true = pd.Series([10.0, 20.0, 40.0], index=["a", "b", "c"])
    oof = pd.DataFrame({"volume_ml_pred": [-3.0, 840.0], "label": [0, 1]}, index=["c", "a"])
    fig = plot_volume(true, oof)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("true haematoma volume")
    assert ax.get_ylabel().startswith("predicted volume")
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert ax.get_xlim() == ax.get_ylim() == pytest.approx((0.4, 840 * 1.3))
    # by patient; a negative estimate is drawn at the floor of the log axis
    np.testing.assert_allclose(ax.collections[0].get_offsets(), [[40.0, 0.5], [10.0, 840.0]])
    plt.close(fig)


def test_fold_model_reads_the_fold_s_checkpoint(tmp_path):
    row = next(r for r in ROWS if r.name == "ResNet, volume + prognosis")
    smoke = get_profile("smoke")
    torch.manual_seed(3)
    trained = build_comparator(row.model["comparator"], smoke.model)
    (tmp_path / "fold1").mkdir()
    save_weights(tmp_path / "fold1" / "best.safetensors", trained)
    loaded = fold_model(tmp_path, row, smoke, fold=1)
    assert not loaded.training and loaded.ct_size == smoke.model.comparator_input
    for a, b in zip(trained.state_dict().values(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def _localisation():
    return pd.DataFrame({"patient_id": ["p1", "p2", "p3"] * 2, "method": ["joint"] * 3 + ["single"] * 3,
                         "mass_inside": 0.1, "volume_share": 0.05, "ratio": [2.0, np.nan, 1.0, 3.0, 4.0, 5.0],
                         "pointing_hit": [True, False, False, True, True, False],
                         "pointing_chance": 0.1, "grid_ceiling": [8.0, 4.0, 6.0] * 2})


def test_grad_cam_summary_counts_maps_and_hits_per_system():
    summary = grad_cam_summary(_localisation())
    assert list(summary["system"]) == ["joint", "single"]
    assert summary.columns[0] == "system"
    assert {"nonzero_maps", "pointing_hits", "pointing_ci_low", "grid_ceiling"} <= set(summary)
    joint = summary.set_index("system").loc["joint"]
    assert joint["n"] == 3 and joint["nonzero_maps"] == 2 and joint["pointing_hits"] == 1
    assert joint["ratio"] == pytest.approx(1.5) and joint["grid_ceiling"] == 6.0
    said = grad_cam_readings(summary)
    assert said[0].startswith("joint: 2 of 3 maps have mass in the brain; mean ratio 1.50")
    assert "for 1 of 3 patients" in said[0] and "against 10% by chance" in said[0]
    empty = grad_cam_summary(_localisation().assign(ratio=np.nan, pointing_hit=False))
    assert grad_cam_readings(empty)[0].startswith("joint: none of the 3 maps has mass in the brain")


def test_grad_cam_figure_shows_the_maps_on_one_fixed_scale_within_the_brain():
    cts = torch.zeros(3, 1, 4, 8, 8)
    cts[:, :, :, 2:6, 2:6] = 0.2  # the brain
    blood = torch.zeros(3, 4, 8, 8)
    blood[1, 2, 3:5, 3:5] = 1.0  # the most haematoma: patient p2, slice 2
    blood[0, 1, 3, 3] = 1.0
    cams = {"joint": torch.rand(3, 4, 8, 8), "single": torch.rand(3, 4, 8, 8)}
    grids = {"joint": (1, 2, 2), "single": (2, 4, 4)}
    fig = plot_grad_cam(cts, blood, cams, _localisation(), ["p1", "p2", "p3"], grids, n=2)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["p2, slice 2", "joint\n1×2×2 grid, up-sampled; no mass in the brain",
                          "single\n2×4×4 grid, up-sampled; ratio 4.00"]
    images = [ax.images[-1] for ax in fig.axes[:6] if ax.get_title().startswith(("joint", "single"))]
    assert all(image.get_clim() == (0, 1) for image in images)
    shown = np.ma.filled(images[0].get_array(), np.nan)
    assert np.isnan(shown[0, 0]) and not np.isnan(shown[3, 3])  # outside the brain: transparent
    assert fig.axes[-1].get_ylabel() == "Grad-CAM ÷ the patient's maximum"  # the colour bar
    plt.close(fig)
