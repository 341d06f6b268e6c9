"""The verdict table: each claim judged from the comparison CSVs by the one rule."""

import numpy as np
import pandas as pd

from ichpro.experiments import TABLES
from ichpro.verdicts import (
    CLAIMS,
    NOT_REPRODUCED,
    PARTLY,
    REPRODUCED,
    describe_verdicts,
    verdict_markdown,
    verdict_table,
)


def comparison(a, b, difference, p_holm, call, auc_b=0.8):
    return {"a": a, "b": b, "n_seeds": 3, "auc_a": auc_b + difference, "auc_b": auc_b,
            "difference": difference,
            "difference_ci_low": difference - 0.02, "difference_ci_high": difference + 0.02,
            "p_holm": p_holm, "call": call}


def write(folder, name, lines):
    pd.DataFrame(lines).to_csv(folder / f"{name}.csv", index=False)


def test_every_claim_names_rows_of_its_table():
    for claim in CLAIMS:
        if claim.beats:
            names = {r.name for r in TABLES[claim.table][1]}
            assert {n for pair in claim.beats for n in pair} <= names, claim.claim


def test_a_claim_is_reproduced_only_when_every_difference_it_names_is_real_in_its_direction(tmp_path):
    write(tmp_path, "table1_modalities_comparisons", [
        comparison("Text only", "ICHPro", -0.06, 0.001, "real"),  # ICHPro above text: as the paper says
        comparison("Vision only", "ICHPro", 0.03, 0.01, "real"),  # ICHPro below vision: the other way
        comparison("Vision only", "Text only", 0.01, 0.4, "not established"),
        comparison("ICHPro + age/GCS head (ours)", "Text only", 0.08, 0.001, "real"),
        comparison("ICHPro + age/GCS head (ours)", "Vision only", 0.0, 0.9, "equivalent")])
    write(tmp_path, "second_cohort_comparisons", [
        comparison("Text only", "ICHPro", -0.05, 0.2, "not established"),
        comparison("Vision only", "ICHPro", 0.03, 0.01, "real")])
    table = verdict_table(tmp_path).set_index("claim")
    report = table.loc["Fusing report and CT beats the report alone"]
    assert report["verdict"] == REPRODUCED and report["ours"] == "0.800 vs 0.740 (3 seeds)"
    assert report["reason"].startswith("Δ +0.060 (95 % interval +0.040 to +0.080), Holm p = 0.001: real")
    assert report["second_cohort"].startswith(NOT_REPRODUCED) and report["differs"]
    ct = table.loc["Fusing report and CT beats the CT alone"]
    assert ct["verdict"] == NOT_REPRODUCED and "real, the other way" in ct["reason"] and not ct["differs"]
    assert table.loc["The CT alone beats the report alone", "verdict"] == NOT_REPRODUCED
    variant = table.loc["ICHPro + age/GCS head (ours) beats each modality alone"]
    assert variant["verdict"] == PARTLY and variant["paper"] == "not in the paper"
    assert variant["reason"].startswith("1 of 2 differences real")
    assert table.loc["VTMF beats every other loss of Table 3", "verdict"] == "not run"  # its CSV is missing
    markdown = verdict_markdown(table.reset_index())
    assert "| Fusing report and CT beats the report alone (Table 1) |" in markdown


def test_attention_verdicts_follow_the_localisation_and_counterfactual_numbers(tmp_path):
    methods = ["stage1_cmaf_text_to_vision", "stage1_cmaf_vision_to_text", "stage2_mhsaf_self",
               "stage1_cmaf_text_to_vision_x_gradient", "grad_cam"]
    summary = pd.DataFrame({"method": methods, "ratio": [0.84, 1.0, 0.92, 2.18, 4.67],
                            "pointing_chance": 0.05, "pointing_ci_low": [0.06, 0.0, 0.0, 0.17, 0.76]})
    summary.to_csv(tmp_path / "attention_localisation_summary.csv", index=False)
    changes = {"largest_change": 1.02, "p_bad_before": 0.2, "p_bad_after": 0.6}
    write(tmp_path, "attention_counterfactual_summary", [changes])
    table = verdict_table(tmp_path).set_index("claim")
    # the text -> vision map points above chance but has less than a uniform map's mass: it does not count
    assert table.loc["ICHPro's attention falls on the haemorrhage", "verdict"] == PARTLY
    assert table.loc["ICHPro's attention moves with the report", "verdict"] == NOT_REPRODUCED
    summary.assign(ratio=np.where(summary["method"] == "stage1_cmaf_text_to_vision", 1.3, summary["ratio"])
                   ).to_csv(tmp_path / "attention_localisation_summary.csv", index=False)
    write(tmp_path, "attention_counterfactual_summary", [{**changes, "largest_change": 0.8}])
    table = verdict_table(tmp_path).set_index("claim")
    assert table.loc["ICHPro's attention falls on the haemorrhage", "verdict"] == REPRODUCED
    summary.assign(ratio=np.where(summary["method"] == "stage1_cmaf_text_to_vision", 1.01, summary["ratio"])
                   ).to_csv(tmp_path / "attention_localisation_summary.csv", index=False)
    # 1.01 times a uniform map's mass does not single out the haematoma, even if the peak falls on it
    claim = "ICHPro's attention falls on the haemorrhage"
    assert verdict_table(tmp_path).set_index("claim").at[claim, "verdict"] == PARTLY
    assert table.loc["ICHPro's attention moves with the report", "verdict"] == REPRODUCED  # 1 / 0.8 >= 1.1


def test_the_summary_counts_the_papers_verdicts_and_names_what_the_second_draw_changes():
    table = pd.DataFrame({"claim": ["a", "b", "c", "d"],
                          "source": ["Table 1", "Table 1", "Table 2", "ours"],
                          "verdict": [REPRODUCED, NOT_REPRODUCED, REPRODUCED, PARTLY],
                          "differs": [False, True, False, False]})
    assert describe_verdicts(table) == ("Of the paper's 3 claims: 2 reproduced, 1 not reproduced. On the "
                                        "second cohort draw 1 verdict(s) differ: b.")
    same = describe_verdicts(table.assign(differs=False))
    assert same.endswith("every verdict it could judge is the same.")


def test_the_clinical_verdicts_follow_calibration_net_benefit_and_sample_size(tmp_path):
    from ichpro.decision_curve import TABULATED, TREAT_ALL, TREAT_NONE
    from ichpro.tripod import LAST_LAYER

    calibration = [
        {"model": "ICHPro", "recalibration": "after Platt scaling", "slope": 0.9, "slope_ci_low": 0.75,
         "slope_ci_high": 1.05, "citl": 0.01, "citl_ci_low": -0.2, "citl_ci_high": 0.25},
        {"model": "ICHPro", "recalibration": "before Platt scaling", "slope": 0.5, "slope_ci_low": 0.4,
         "slope_ci_high": 0.6, "citl": 0.5, "citl_ci_low": 0.3, "citl_ci_high": 0.7},
        {"model": "ICHPro, no Hospital Stay", "recalibration": "after Platt scaling", "slope": 0.95,
         "slope_ci_low": 0.8, "slope_ci_high": 1.1, "citl": 0.0, "citl_ci_low": -0.2, "citl_ci_high": 0.2}]
    write(tmp_path, "clinical_calibration", calibration)
    curves = [{"model": m, "threshold": t, "net_benefit": nb, "advantage_ci_low": gain}
              for t in TABULATED for m, nb, gain in (("ICHPro", 0.3, 0.01 if t < 0.5 else -0.01),
                                                     (TREAT_ALL, 0.2, None), (TREAT_NONE, 0.0, None))]
    write(tmp_path, "clinical_decision_curves", curves)
    write(tmp_path, "clinical_sample_size", [
        {"c_from": "here", "c": 0.84, "counted": name, "parameters": p, "n_minimum": n, "patients": 480,
         "development": 384}
        for name, p, n in (("clinical logistic regression", 15, 300), (LAST_LAYER, 153, 7000))])
    table = verdict_table(tmp_path).set_index("claim")
    calibrated = [c for c in table.index if c.startswith("After Platt scaling")][0]
    assert table.loc[calibrated, "verdict"] == REPRODUCED
    decision = table.loc[[c for c in table.index if c.startswith("Acting on ICHPro")][0]]
    assert decision["verdict"] == PARTLY and decision["ours"] == "above at 20%, 30%, 40%"
    assert decision["reason"].endswith("at 20%, 30%, 40%; not at 50%, 60%")
    size = table.loc["480 patients are enough to develop ICHPro (Riley et al.)"]
    assert size["verdict"] == NOT_REPRODUCED and "need 7,000 patients" in size["reason"]
    calibration[2].update(slope_ci_high=0.98)  # the admission-time form's predictions too extreme
    write(tmp_path, "clinical_calibration", calibration)
    assert verdict_table(tmp_path).set_index("claim").at[calibrated, "verdict"] == PARTLY
