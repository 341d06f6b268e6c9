"""Notebook 11's views: maps relative to uniform, the counterfactual figure, readings, localisation plots."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import LogNorm

from ichpro.heatmaps import GRAD_CAM
from ichpro.views.attention import (
    Patient,
    change_factors,
    compare_counterfactuals,
    counterfactual_changes,
    counterfactual_summary,
    describe_edit,
    gives,
    good_outcomes_to_edit,
    grids_label,
    largest_change,
    localisation_readings,
    oracle_readings,
    plot_counterfactual,
    plot_examples,
    plot_localisation,
    relative,
    top_words,
)

NAMES = ("stage1_cmaf_text_to_vision", "stage2_mhsaf_self")


def _patient() -> Patient:
    ct = torch.zeros(1, 4, 16, 16)
    ct[:, :, 2:14, 2:14] = 0.2
    blood = np.zeros((2, 4, 16, 16))
    blood[0, 1:3, 4:8, 4:8] = 1.0
    brain = ct[0].numpy() > 0
    return Patient("P1", ct, blood, brain, "Age: 50\nGCS Score: 14", slice=2)


def _counterfactual(patient: Patient) -> dict:
    before = {name: np.where(patient.brain, 1.0, 0.0) for name in NAMES}
    after = {NAMES[0]: before[NAMES[0]] * 1.0, NAMES[1]: before[NAMES[1]].copy()}
    after[NAMES[1]][2, 4:8, 4:8] *= 3.0  # this map triples on the haematoma
    return {"attention_before": before, "attention_after": after, "p_bad_before": 0.1, "p_bad_after": 0.3}


def test_relative_maps_are_one_on_average_over_the_brain_and_blank_outside():
    patient = _patient()
    heat = np.random.default_rng(0).random(patient.brain.shape)
    shown = relative(heat, patient.brain)
    assert np.nanmean(shown) == pytest.approx(1.0) and np.isnan(shown[~patient.brain]).all()


def test_change_factors_are_after_over_before_and_the_largest_counts_both_ways():
    patient = _patient()
    factors = change_factors(_counterfactual(patient), patient.brain)
    assert largest_change(factors[NAMES[0]]) == pytest.approx(1.0)
    tripled = factors[NAMES[1]]
    brain = patient.brain.sum()
    mean_after = (brain + 2 * 16) / brain  # 16 voxels of the brain go from 1 to 3
    assert tripled[2, 5, 5] == pytest.approx(3 / mean_after)
    assert tripled[0, 5, 5] == pytest.approx(1 / mean_after)
    assert largest_change(tripled) == pytest.approx(3 / mean_after)
    assert largest_change(np.array([0.25, 1.0, np.nan])) == 4.0  # a fall to a quarter is a change by 4


def test_counterfactual_figure_uses_the_maps_fixed_log_scale_and_readable_colour_bars():
    patient = _patient()
    fig = plot_counterfactual(_counterfactual(patient), patient, {"gcs": 5, "age": 85}, "edited")
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6 and panels[1].get_title().startswith("after (GCS → 5, age → 85)")
    factor = largest_change(change_factors(_counterfactual(patient), patient.brain)[NAMES[1]])
    assert panels[5].get_title() == f"after ÷ before\nlargest change ×{factor:.2f}"
    for ax in panels[1::3] + panels[2::3]:
        norm = ax.images[-1].norm
        assert isinstance(norm, LogNorm) and (norm.vmin, norm.vmax) == (0.25, 4.0)  # symmetric: 1/4 to 4
    bars = [ax for ax in fig.axes if not ax.images]
    labels = [bar.get_xlabel() for bar in bars]
    assert labels[0].startswith("map ÷ its mean over the brain") and labels[1].startswith("after ÷ before")
    renderer = fig.canvas.get_renderer()
    for bar in bars:
        ticks = [t for t in bar.get_xticklabels() if t.get_text()]
        assert [t.get_text() for t in ticks] == ["≤ 0.25", "0.5", "1", "2", "≥ 4"]
        boxes = [t.get_window_extent(renderer) for t in ticks]
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))  # no two tick labels overlap
    plt.close(fig)


def test_the_example_figure_titles_each_map_with_its_ratio():
    patient = _patient()
    patient.maps = {NAMES[0]: np.ones((4, 16, 16)), GRAD_CAM: patient.blood[0] + 0.01}
    shown = pd.DataFrame({"patient_id": ["P1"], "label": [1], "p_bad": [0.9]})
    fig = plot_examples({"P1": patient}, shown, "examples")
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles[0].startswith("P1 · bad outcome") and titles[1] == "stage 1 CMAF: text → vision\nratio 1.00"
    assert titles[2].startswith("Grad-CAM (bad)\nratio ") and float(titles[2].split()[-1]) > 5
    assert fig.axes[-1].get_ylabel() == "map ÷ its mean over the brain (1 = uniform; log scale)"
    plt.close(fig)


def test_edits_are_described_and_reports_checked_for_their_fields():
    assert describe_edit({"gcs": 5, "age": 85}) == "GCS → 5, age → 85"
    assert describe_edit({"gcs": 5, "age": 85}, {"gcs": 14, "age": 50}) == "GCS 14 → 5, age 50 → 85"
    assert gives("Age: 50\nGCS Score: 14", ["gcs", "age"])
    assert not gives("Age: 50", ["gcs", "age"]) and not gives("Age: old\nGCS Score: 14", ["age"])
    manifest = pd.DataFrame({"patient_id": ["a", "b", "c", "d"], "label": [0, 1, 0, 0],
                             "report": ["Age: 50\nGCS Score: 14", "Age: 70\nGCS Score: 6", "Age: 50",
                                        "GCS Score: 15\nAge: 61"]})
    assert good_outcomes_to_edit(manifest, ["gcs", "age"]) == ["a", "d"]


def test_counterfactual_summary_against_the_oracle():
    table = pd.DataFrame({"p_before": [0.1, 0.2, 0.5], "p_after": [0.3, 0.1, 0.9],
                          "oracle_p_before": [0.1, 0.1, 0.1], "oracle_p_after": [0.5, 0.5, 0.5]})
    summary = counterfactual_summary(table)
    assert summary["patients"] == 3 and summary["model mean ΔP(bad)"] == pytest.approx(0.5 / 3)
    assert summary["model ΔP(bad) > 0"] == pytest.approx(2 / 3)
    assert summary["same sign as the oracle"] == pytest.approx(2 / 3)
    assert summary["model mean / oracle mean"] == pytest.approx((0.5 / 3) / 0.4)
    assert "oracle mean ΔP(bad)" not in counterfactual_summary(table[["p_before", "p_after"]])


def test_compare_counterfactuals_states_each_runs_mean_against_the_oracles():
    oracle = {"oracle_p_before": [0.1, 0.1], "oracle_p_after": [0.5, 0.5]}
    reads = pd.DataFrame({"p_before": [0.1, 0.2], "p_after": [0.3, 0.4], **oracle})
    ignores = pd.DataFrame({"p_before": [0.1, 0.2], "p_after": [0.16, 0.18], **oracle})
    sentence = compare_counterfactuals({"A": reads, "B": ignores})
    assert sentence == ("Mean change of P(bad) over the same 2 patients: A +0.200 (0.50 of the oracle's, "
                        "same sign for 100%); B +0.020 (0.05 of the oracle's, same sign for 50%); "
                        "the oracle moves it by +0.400.")
    assert compare_counterfactuals({"A": reads[["p_before", "p_after"]]}).endswith("A +0.200.")


def _localisation():
    rows = []
    for method, ratios, hits in [("stage1_cmaf_text_to_vision", [1.0, 1.02], [False, False]),
                                 ("stage1_cmaf_text_to_vision_x_gradient", [2.0, 1.0], [True, False]),
                                 (GRAD_CAM, [6.0, 2.0], [True, False])]:
        for pid, label, ratio, hit in zip(["a", "b"], [0, 1], ratios, hits):
            rows.append({"patient_id": pid, "label": label, "method": method, "ratio": ratio,
                         "pointing_hit": hit})
    table = pd.DataFrame(rows)
    summary = pd.DataFrame({"ratio": [1.01, 1.5, 4.0], "median_ratio": [1.01, 1.5, 4.0],
                            "share_above_1": [0.5, 0.5, 1.0], "grid_ceiling": [10.0, 10.0, 30.0],
                            "pointing_hit_rate": [0.0, 0.5, 0.5], "pointing_ci_low": [0.0, 0.01, 0.01],
                            "pointing_ci_high": [0.84, 0.99, 0.99], "pointing_chance": [0.05, 0.05, 0.05]},
                           index=["stage1_cmaf_text_to_vision", "stage1_cmaf_text_to_vision_x_gradient",
                                  GRAD_CAM])
    return table, summary


def test_localisation_readings_are_written_from_the_numbers():
    table, summary = _localisation()
    said = "\n".join(localisation_readings(summary, table))
    assert ("stage 1 CMAF: text → vision (stage1_cmaf_text_to_vision): mean ratio 1.01 (median 1.01, "
            "50% of") in said
    assert "Grad-CAM (bad) good 6.00, bad 2.00" in said
    assert "stage 1 CMAF: text → vision × gradient (stage1_cmaf_text_to_vision_x_gradient)" in said
    assert ("highest mean ratio of each kind of attention map, as attended: stage1_cmaf_text_to_vision, 1.01 "
            "times uniform on average; weighted by its gradient: stage1_cmaf_text_to_vision_x_gradient, 1.50 "
            "times uniform on average; Grad-CAM: 4.00.") in said
    assert ("Within 5% of uniform (ratio 0.95-1.05), not singling out the blood: stage1_cmaf_text_to_vision "
            "1.01.") in said
    assert "Below uniform (ratio under 0.95), less mass on the haematoma than a uniform map: none." in said
    assert "Above uniform (ratio over 1.05): stage1_cmaf_text_to_vision_x_gradient 1.50." in said
    strict = "\n".join(localisation_readings(summary, table, flat_within=0.001))
    assert "not singling out the blood: none." in strict
    assert "over 1.00): stage1_cmaf_text_to_vision 1.01," in strict
    below = summary.assign(ratio=summary["ratio"].where(summary.index != "stage1_cmaf_text_to_vision", 0.84))
    assert "less mass on the haematoma than a uniform map: stage1_cmaf_text_to_vision 0.84." in "\n".join(
        localisation_readings(below, table))


def test_localisation_figure_labels_its_axes():
    table, summary = _localisation()
    fig = plot_localisation(table, summary, "two patients")
    ratios, pointing = fig.axes
    assert ratios.get_yscale() == "log" and ratios.get_ylabel() == "mass inside / volume share (log)"
    labels = [t.get_text() for t in pointing.get_xticklabels()]
    assert labels == ["stage 1 CMAF: text → vision", "stage 1 CMAF: text → vision × gradient",
                      "Grad-CAM (bad)"]
    assert pointing.get_ylabel() == "share of patients"
    plt.close(fig)


def test_oracle_readings_and_top_words():
    truth = pd.DataFrame({"label": [0, 0, 1, 1]})
    for suffix in ("", "_image", "_report", "_report_no_stay"):
        truth[f"p_bad_oracle{suffix}"] = [0.1, 0.2, 0.8, 0.9]
    said = oracle_readings(truth)
    assert said[0].startswith("Oracle AUC on this cohort from all variables 1.000; image-visible variables")
    assert len(said) == 2 and len(oracle_readings(truth.assign(p_bad_oracle_report_no_stay=0.5))) == 1
    assert "reaches an oracle AUC of 1.000 (≥ 0.75)" in said[1]
    read = pd.Series([0.5, 0.3, 0.2], index=["0:[CLS]", "1:gcs", "2:5"])
    assert top_words({"P1": read}, n=2) == ["P1: most read [CLS] 0.500, gcs 0.300 (uniform 0.333)"]


def test_grids_label_names_each_blocks_grid_once():
    grids = {"stage1_cmaf_text_to_vision": (2, 4, 4), "stage1_cmaf_text_to_vision_x_gradient": (2, 4, 4),
             "stage2_mhsaf_self": (2, 4, 4), GRAD_CAM: (4, 8, 8)}
    assert grids_label(grids) == ("maps on grids stage 1 CMAF 2×4×4, stage 2 MHSAF 2×4×4, "
                                  "Grad-CAM (bad) 4×8×8, up-sampled")


def test_counterfactual_changes_separate_raw_from_gradient_weighted_maps():
    brain = np.ones((1, 2, 2), dtype=bool)
    flat = np.full((1, 2, 2), 0.25)
    doubled = np.array([[[0.5, 0.5 / 3], [0.5 / 3, 0.5 / 3]]])  # one cell's share doubles
    cf = {"p_bad_before": 0.2, "p_bad_after": 0.7,
          "attention_before": {"stage1_cmaf_text_to_vision": flat, GRAD_CAM: flat,
                               "stage1_cmaf_text_to_vision_x_gradient": flat},
          "attention_after": {"stage1_cmaf_text_to_vision": flat, GRAD_CAM: doubled,
                              "stage1_cmaf_text_to_vision_x_gradient": doubled}}
    changes = counterfactual_changes(cf, brain)
    assert changes["largest_change"] == pytest.approx(1.0)  # Grad-CAM is not an attention map
    assert changes["largest_change_x_gradient"] == pytest.approx(2.0)
    assert (changes["p_bad_before"], changes["p_bad_after"]) == (0.2, 0.7)
