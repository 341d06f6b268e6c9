import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ichpro.cohort import (
    OUTCOME_MODEL,
    TRUTH_COLUMNS,
    CohortSpec,
    calibration_table,
    ensure_cohort,
    func_score,
    generate_cohort,
    ich_score,
    load_spec,
    sample_clinical,
)
from ichpro.errors import CohortSpecError
from ichpro.phantom import ImageSpec
from ichpro.reports import parse

SMALL_IMAGES = ImageSpec(matrix=32, slices=(24, 26))


@pytest.fixture(scope="module")
def large():
    return sample_clinical(5000, np.random.default_rng([0, 0]))


def test_hemphill_and_rost_tables_are_reproduced(large):
    table = calibration_table(large)
    checked = table[table["n"] >= 30]
    assert len(checked) >= 10
    assert checked["ok"].all(), checked.to_string()


def test_bad_outcome_share_and_label_definition(large):
    assert 0.45 <= large["label"].mean() <= 0.65
    assert (large["label"] == (large["gos"] <= 3)).all()
    assert (large.loc[large["died_30d"] == 1, "gos"] == 1).all()  # 30-day deaths are dead at 90


def test_all_variable_oracle_is_calibrated(large):
    bins = pd.cut(large["p_bad_oracle"], np.linspace(0, 1, 6))
    grouped = large.groupby(bins, observed=True).agg(p=("p_bad_oracle", "mean"),
                                                     rate=("label", "mean"), n=("label", "size"))
    grouped = grouped[grouped["n"] >= 200]
    assert np.allclose(grouped["p"], grouped["rate"], atol=0.04), grouped


def test_hospital_stay_leaks_the_outcome(large):
    early_deaths = large[large["died_30d"] == 1]["hospital_stay_days"]
    survivors = large[large["died_30d"] == 0]["hospital_stay_days"]
    assert early_deaths.median() < survivors.median() / 2


def test_clinical_scores_on_hand_computed_cases():
    t = pd.DataFrame({
        "gcs": [15, 4, 10], "volume_ml": [10.0, 70.0, 30.0], "ivh": [0, 1, 0],
        "location": ["lobar", "brainstem", "deep"], "age": [50, 85, 75],
        "cognitive_impairment": [0, 1, 0],
    })
    # ICH: 0; 2+1+1+1+1 = 6; 1 (GCS 10) + 1 (30 mL) = 2
    assert list(ich_score(t)) == [0, 6, 2]
    # FUNC: 4+2+2+2+1 = 11; 0+0+0+0+0 = 0; 2+1+1+2+1 = 7
    assert list(func_score(t)) == [11, 0, 7]


def test_no_images_cohort_files_and_oracle_ceilings(tmp_path):
    spec = CohortSpec("test", n_patients=2000, seed=3, reference_size=10_000)
    truth = generate_cohort(spec, tmp_path, images=False, progress=False)
    assert list(truth.columns) == list(TRUTH_COLUMNS)
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    assert {"patient_id", "report_path", "label", "age", "gcs"} <= set(manifest.columns)
    assert "gos" not in manifest.columns and "p_bad_oracle" not in manifest.columns
    auc = {c: roc_auc_score(truth["label"], truth[c]) for c in truth.columns if c.startswith("p_bad")}
    assert auc["p_bad_oracle"] > auc["p_bad_oracle_image"] + 0.02
    assert auc["p_bad_oracle"] > auc["p_bad_oracle_report"] + 0.02
    assert auc["p_bad_oracle_report"] > auc["p_bad_oracle_report_no_stay"]
    assert min(auc.values()) > 0.75


def test_reports_show_report_fields_not_image_truth(tmp_path):
    spec = CohortSpec("test", n_patients=50, seed=4, reference_size=5000)
    truth = generate_cohort(spec, tmp_path, images=False, progress=False)
    for row in truth.itertuples():
        text = (tmp_path / "reports" / f"{row.patient_id}.txt").read_text()
        report = parse(text)
        assert "IVH" not in text and "shift" not in text.lower()
        assert report.gcs in (None, row.gcs) and report.age in (None, row.age)
        if report.volume_ml is not None and report.volume_ml >= 10:
            assert report.volume_ml % 5 == 0  # the radiologist's rounded estimate


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    spec = CohortSpec("test", n_patients=10, seed=5, image=SMALL_IMAGES, reference_size=3000)
    cards = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate_cohort(spec, tmp_path / name, seed=seed, progress=False)
        cards.append(json.loads((tmp_path / name / "cohort.json").read_text())["checksums"])
    assert cards[0] == cards[1]
    assert "ct/ICH0001.nii.gz" in cards[0] and "truth.csv" in cards[0]
    assert cards[0]["ct/ICH0001.nii.gz"] != cards[2]["ct/ICH0001.nii.gz"]
    assert cards[0]["truth.csv"] != cards[2]["truth.csv"]


def test_a_damaged_generated_cohort_is_generated_again_and_a_site_folder_is_left_alone(tmp_path, capsys,
                                                                                     monkeypatch):
    spec = CohortSpec("test", n_patients=4, seed=5, image=SMALL_IMAGES, reference_size=3000)
    monkeypatch.setattr("ichpro.cohort.load_spec", lambda name: spec)
    folder = ensure_cohort("test", tmp_path / "cohort", progress=False)
    ct = folder / "ct" / "ICH0002.nii.gz"
    original = ct.read_bytes()
    ct.write_bytes(original[: len(original) // 2])  # truncated
    ensure_cohort("test", folder, progress=False)
    assert "cohort in" in (err := capsys.readouterr().err) and "damaged (ct/ICH0002.nii.gz)" in err
    assert ct.read_bytes() == original
    ensure_cohort("test", folder, progress=False)
    assert capsys.readouterr().err == ""  # intact: nothing regenerated, nothing said
    (folder / "cohort.json").unlink()  # a manifest without a card: a site's own data
    (folder / "reports" / "ICH0001.txt").write_text("edited by hand\n")
    ensure_cohort("test", folder, progress=False)
    assert (folder / "reports" / "ICH0001.txt").read_text() == "edited by hand\n"


def test_linear_predictor_increases_with_severity():
    base = sample_clinical(1, np.random.default_rng(0))
    worse = base.assign(gcs=5, ivh=1, volume_ml=base["volume_ml"] * 4, age=base["age"] + 20)
    assert OUTCOME_MODEL.p_bad(worse)[0] > OUTCOME_MODEL.p_bad(base)[0]


def test_committed_specs_load():
    assert load_spec("smoke").n_patients <= 150 and load_spec("cpu").n_patients >= 400
    assert load_spec("smoke").image.matrix == 64


def test_bad_specs_raise_clear_errors(tmp_path):
    with pytest.raises(CohortSpecError, match="not found; known specs: .*smoke"):
        load_spec("no-such-spec")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nn_patients: 20\ncolour: blue\n")
    with pytest.raises(CohortSpecError, match="colour"):
        load_spec(bad)
    bad.write_text("name: x\nn_patients: 3\n")
    with pytest.raises(CohortSpecError, match="at least 10"):
        load_spec(bad)
