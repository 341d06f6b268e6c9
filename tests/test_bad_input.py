"""Bad input and faults, as a new user with their own data meets them, across ``validate``, ``train``,
``predict`` and the caches: each ends in a one-line error, a named warning, or a healed cache, with no
traceback."""

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from dicom_utils import write_dicom_series

from ichpro.cli import main

ERROR, WARNING = "error", "warning"


def re_search(pattern, text):
    return re.search(pattern, text, flags=re.S)


def renamed_label(cohort, tmp_path):
    path = edited(cohort, tmp_path)
    pd.read_csv(path).rename(columns={"label": "Label"}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def cohort(smoke_cohort, tmp_path_factory):
    """24 smoke patients as a hospital might give them: CT paths, labels and report text, no other column."""
    folder = tmp_path_factory.mktemp("own_data")
    manifest = pd.read_csv(smoke_cohort / "manifest.csv", dtype=str).head(24)
    manifest = pd.DataFrame({"patient_id": manifest["patient_id"],
                             "ct_path": [str(smoke_cohort / p) for p in manifest["ct_path"]],
                             "label": manifest["label"],
                             "report": [(smoke_cohort / p).read_text() for p in manifest["report_path"]]})
    manifest.to_csv(folder / "manifest.csv", index=False)
    return folder, manifest


@pytest.fixture(scope="module")
def volumes(cohort):
    """CT files that are not what they should be, next to a good one."""
    folder, manifest = cohort
    good = Path(manifest["ct_path"].iloc[0])
    image = nib.load(good)
    hu = np.asarray(image.dataobj, dtype=np.float32)
    out = folder / "volumes"
    out.mkdir()

    def save(name, array):
        nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), image.affine), out / name)
        return str(out / name)

    small = hu[::4, ::4, :]  # a 16 x 16 x slices DICOM series writes quickly
    affine = image.affine @ np.diag([4.0, 4.0, 1.0, 1.0])
    series = write_dicom_series(small, affine, out / "dicom")
    for name, edit in (("duplicate", lambda paths: shutil.copy(paths[3], paths[3].with_name("copy.dcm"))),
                       ("gap", lambda paths: paths[5].unlink()),
                       ("tilted", lambda paths: _tilt(paths[4]))):
        target = out / f"dicom_{name}"
        shutil.copytree(out / "dicom", target)
        edit(sorted(target.iterdir()))
    shutil.copytree(out / "dicom", out / "dicom_two_series")
    for path in write_dicom_series(small, affine, out / "second"):
        shutil.copy(path, out / "dicom_two_series" / f"b_{path.name}")
    return {
        "good": str(good),
        "mask": save("mask.nii.gz", (hu > 60).astype(np.float32)),
        "offset": save("offset.nii.gz", hu + 1024),
        "normalised": save("normalised.nii.gz", (hu - hu.min()) / (hu.max() - hu.min())),
        "no_bone": save("no_bone.nii.gz", np.clip(hu, -1000, 80)),
        "dicom": str(out / "dicom"), "dicom_duplicate": str(out / "dicom_duplicate"),
        "dicom_gap": str(out / "dicom_gap"), "dicom_two_series": str(out / "dicom_two_series"),
        "dicom_tilted": str(out / "dicom_tilted"),
    }, len(series)


def _tilt(path):
    """Give one DICOM slice another orientation (a slice of another acquisition, tilted 30 degrees)."""
    header = pydicom.dcmread(path)
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    header.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, c, s]
    header.save_as(path)


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "Traceback" not in output
    return code, output


def edited(cohort, tmp_path, **columns):
    """The cohort's manifest with columns replaced (a callable gets the manifest), saved in tmp_path."""
    manifest = cohort[1].copy()
    for name, value in columns.items():
        manifest[name] = value(manifest) if callable(value) else value
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


def first_ct(kind):
    return lambda m, kind=kind: [kind] + m["ct_path"].tolist()[1:]


# ------------------------------------------------------------------------------------- validate

VALIDATE_CASES = {
    "missing manifest": (lambda c, v, t: t / "nope.csv", 1, ERROR, r"nope.csv does not exist"),
    "misspelt column": (lambda c, v, t: renamed_label(c, t), 1, ERROR, r"rename column 'Label' to 'label'"),
    "duplicate id": (lambda c, v, t: edited(c, t, patient_id=lambda m: ["A", "A", *m["patient_id"][2:]]),
                     1, ERROR, r"row 3 \(patient 'A'\): patient_id 'A' is already used on row 2"),
    "label out of range": (lambda c, v, t: edited(c, t, label=lambda m: ["2", *m["label"][1:]]), 1, ERROR,
                           r"row 2 .*label is '2': set it to 0"),
    "label contradicts gos": (lambda c, v, t: edited(c, t, gos=lambda m: np.where(m["label"] == "1", 5, 2)),
                              1, ERROR, r"label 1 contradicts gos 5"),
    "mask as CT": (lambda c, v, t: edited(c, t, ct_path=first_ct(v[0]["mask"])), 1, ERROR,
                   r"mask.nii.gz holds only 2 distinct values .*label map"),
    "CT without intercept": (lambda c, v, t: edited(c, t, ct_path=first_ct(v[0]["offset"])), 1, ERROR,
                             r"offset.nii.gz has no air .*not in Hounsfield units"),
    "normalised image": (lambda c, v, t: edited(c, t, ct_path=first_ct(v[0]["normalised"])), 1, ERROR,
                         r"normalised.nii.gz has no air"),
    "duplicated DICOM slice": (lambda c, v, t: edited(c, t, ct_path=first_ct(v[0]["dicom_duplicate"])), 1,
                               ERROR, r"dicom_duplicate has 1 slice\(s\) at a position another slice"),
    "missing DICOM slice": (lambda c, v, t: edited(c, t, ct_path=first_ct(v[0]["dicom_gap"])), 1, ERROR,
                            r"dicom_gap has a gap of .* slices are missing"),
    "DICOM slices of two orientations": (
        lambda c, v, t: edited(c, t, ct_path=first_ct(v[0]["dicom_tilted"])), 1, ERROR,
        r"dicom_tilted mixes 2 slice orientations"),
    "two DICOM series": (lambda c, v, t: edited(c, t, ct_path=first_ct(v[0]["dicom_two_series"])), 1, ERROR,
                         r"dicom_two_series mixes 2 DICOM series"),
    "skull-stripped CT": (lambda c, v, t: edited(c, t, ct_path=first_ct(v[0]["no_bone"])), 0, WARNING,
                          r"warning: CT .*no_bone.nii.gz has no bone"),
    "free-prose reports": (lambda c, v, t: edited(c, t, report="Patient admitted drowsy after a fall."), 0,
                           WARNING, r"warning: 24 report\(s\) give none of the expected fields, e.g."),
    "unreadable report value": (lambda c, v, t: edited(c, t, report=lambda m: m["report"].str.replace(
        r"GCS Score: \d+", "GCS Score: high", regex=True)), 0, WARNING,
        r"warning: report values that cannot be read: gcs in \d+ report\(s\)"),
    "report file not UTF-8": (lambda c, v, t: ((t / "r.txt").write_bytes("Âge: 60".encode("latin-1")),
                                               edited(c, t, report="", report_path="r.txt"))[1], 1, ERROR,
                              r"r.txt is not UTF-8 text: save it with UTF-8 encoding"),
}


@pytest.mark.parametrize("case", list(VALIDATE_CASES))
def test_validate(case, cohort, volumes, tmp_path, capsys):
    make, exit_code, kind, words = VALIDATE_CASES[case]
    code, output = run_cli(["validate", make(cohort, volumes, tmp_path)], capsys)
    assert code == exit_code, output
    assert re_search(words, output), output


def test_a_good_dicom_series_passes_validate_and_the_summary_counts_report_fields(cohort, volumes, tmp_path,
                                                                                  capsys):
    data = edited(cohort, tmp_path, ct_path=first_ct(volumes[0]["dicom"]))
    code, output = run_cli(["validate", data], capsys)
    assert code == 0 and "report fields given: age " in output and "warning" not in output, output


# ------------------------------------------------------------------------------------------ train

TRAIN_CASES = {
    "--epochs 0": (["--epochs", "0"], r"TrainConfig.epochs \(--epochs\) is 0: use a whole number >= 1"),
    "--epochs -2": (["--epochs", "-2"], r"\(--epochs\) is -2"),
    "--folds 1": (["--folds", "1"], r"\(--folds\) is 1: use at least 2 folds"),
    "--folds 30": (["--folds", "30"], r"cannot make 30 stratified folds"),
    "--batch-size 0": (["--batch-size", "0"], r"\(--batch-size\) is 0"),
    "--batch-size -4": (["--batch-size", "-4"], r"\(--batch-size\) is -4"),
    "--lr -1": (["--lr", "-1"], r"\(--lr\) is -1.0: use a learning rate > 0"),
    "--grad-accumulation 0": (["--grad-accumulation", "0"], r"\(--grad-accumulation\) is 0"),
    "--vision-dropout 1": (["--vision-dropout", "1"],
                           r"vision_dropout \(--vision-dropout\) is 1.0: use a share in \[0, 1\)"),
    "--loss ce=0": (["--loss", "ce=0"], r"\(--loss\) .*learns only from ce or blend"),
    "--loss sdm": (["--loss", "sdm"], r"learns only from ce or blend"),
    "--loss focal": (["--loss", "ce,focal"], r"unknown loss term 'focal' \(--loss\)"),
    "--comparator bogus": (["--comparator", "bogus"], r"unknown comparator 'bogus'; choose one of"),
    "--device cuda:0": (["--device", "cuda:0"], r"CUDA is not available; use --device cpu"),
    "--device gpu": (["--device", "gpu"], r"\(--device\) is 'gpu': use auto, cpu, cuda or cuda:N"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses_a_bad_option_without_claiming_the_run_folder(case, cohort, tmp_path, capsys):
    options, words = TRAIN_CASES[case]
    out = tmp_path / "run"
    code, output = run_cli(["train", "--profile", "smoke", "--data", cohort[0], "--out", out, "--quiet",
                            *options], capsys)
    assert code == 2 and re_search(words, output), output
    assert not (out / "run.json").exists()


@pytest.mark.parametrize("option", [["--fusion", "bogus"], ["--amp", "fp8"], ["--epochs", "two"]])
def test_train_option_types_and_choices_are_checked_by_the_parser(option, cohort, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--data", str(cohort[0]), "--out", str(tmp_path), *option])
    assert stop.value.code == 2 and "invalid" in capsys.readouterr().err


def test_a_clinical_baseline_on_reports_without_fields_is_an_error(cohort, tmp_path, capsys):
    data = edited(cohort, tmp_path, report="Patient admitted drowsy after a fall.")
    code, output = run_cli(["train", "--profile", "smoke", "--data", data, "--out", tmp_path / "run",
                            "--comparator", "logistic_regression", "--folds", "2", "--quiet"], capsys)
    assert code == 2 and re_search(r"24 patient\(s\) have no clinical field .* e.g. 'ICH\d+'", output), output


# --------------------------------------------------------------------------- predict and caches


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    """A small3dcnn run (no pretraining) and the cache it filled."""
    out, cache = tmp_path_factory.mktemp("cnn_run"), tmp_path_factory.mktemp("cnn_cache")
    assert main(["train", "--profile", "smoke", "--data", str(cohort[0]), "--out", str(out), "--cache",
                 str(cache), "--comparator", "small3dcnn", "--epochs", "1", "--folds", "2", "--quiet"]) == 0
    return out, cache


def test_train_writes_the_model_card_and_predict_points_to_it(run, cohort, volumes, tmp_path, capsys):
    card = (run[0] / "model_card.md").read_text()
    assert "comparator `small3dcnn`" in card and "## Subgroups\n| subgroup |" in card
    code, output = run_cli(predict_case(run, cohort, volumes, tmp_path), capsys)
    assert code == 0 and f"read the model card: {run[0] / 'model_card.md'}" in output


def predict_case(run, cohort, volumes, tmp_path, ct="good", report=None):
    report = cohort[1]["report"].iloc[0] if report is None else report
    return ["predict", "--checkpoint", run[0], "--ct", volumes[0][ct] if ct in volumes[0] else ct,
            "--report", report]


PREDICT_CASES = {
    "report path that names no file": (dict(report="notes/typo.txt"), 2, r"report file .*notes/typo.txt does "
                                                                          r"not exist: fix its path"),
    "report file not UTF-8": (dict(report="LATIN1"), 2, r"latin1.txt is not UTF-8 text"),
    "empty report": (dict(report="  "), 2, r"the report is empty"),
    "missing CT": (dict(ct="/no/such/ct.nii.gz"), 2, r"cannot predict: CT /no/such/ct.nii.gz does not exist"),
    "mask as CT": (dict(ct="mask"), 2, r"cannot predict: CT .*mask.nii.gz holds only 2 distinct values"),
    "CT without intercept": (dict(ct="offset"), 2, r"offset.nii.gz has no air"),
    "two DICOM series": (dict(ct="dicom_two_series"), 2, r"mixes 2 DICOM series"),
    "free-prose report": (dict(report="Patient admitted drowsy after a fall."), 0,
                          r"P\(bad outcome\) = .*warning: the report gives none of the expected fields"),
    "a report without its GCS": (dict(report="Age: 70\nGender: Male"), 0,
                                 r"report fields not given: .*gcs \(missing\)"),
}


@pytest.mark.parametrize("case", list(PREDICT_CASES))
def test_predict(case, run, cohort, volumes, tmp_path, capsys):
    options, exit_code, words = PREDICT_CASES[case]
    if options.get("report") == "LATIN1":
        (tmp_path / "latin1.txt").write_bytes("Âge: 60 ans".encode("latin-1"))
        options = dict(report=str(tmp_path / "latin1.txt"))
    code, output = run_cli(predict_case(run, cohort, volumes, tmp_path, **options), capsys)
    assert code == exit_code and re_search(words, output), output


def test_predict_on_a_folder_that_is_no_run_or_a_clinical_baseline_run(cohort, volumes, tmp_path, capsys):
    code, output = run_cli(predict_case((tmp_path,), cohort, volumes, tmp_path), capsys)
    assert code == 2 and "is not a run folder (no run.json)" in output
    baseline = tmp_path / "lr"
    assert main(["train", "--profile", "smoke", "--data", str(cohort[0]), "--out", str(baseline),
                 "--comparator", "logistic_regression", "--folds", "2", "--quiet"]) == 0
    code, output = run_cli(predict_case((baseline,), cohort, volumes, tmp_path), capsys)
    assert code == 2 and "holds the clinical baseline 'logistic_regression'" in output
    assert "vocabulary" not in output
    card = (baseline / "model_card.md").read_text()
    assert "clinical baseline `logistic_regression`" in card and "None: the model reads no image." in card
    assert "before Platt scaling" not in card  # a fitted logistic model is not recalibrated


def test_a_truncated_checkpoint_is_named(run, cohort, volumes, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    best = copy / "fold0" / "best.safetensors"
    best.write_bytes(best.read_bytes()[:100])
    code, output = run_cli(predict_case((copy,), cohort, volumes, tmp_path), capsys)
    assert code == 2 and re_search(r"fold0/best.safetensors cannot be read .*truncated or damaged", output)


@pytest.mark.parametrize("how", ["truncated", "flipped byte"])
def test_damaged_cache_entries_heal_and_the_run_predicts_the_same(how, run, cohort, tmp_path, capsys):
    out, cache = run
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    for entry in sorted(copy.rglob("*.safetensors")):  # the resized CTs and every preprocessed one
        data = entry.read_bytes()
        entry.write_bytes(data[: len(data) // 2] if how == "truncated"
                          else data[:-9] + bytes([data[-9] ^ 0x55]) + data[-8:])
    code, output = run_cli(["train", "--profile", "smoke", "--data", cohort[0], "--out", tmp_path / "again",
                            "--cache", copy, "--comparator", "small3dcnn", "--epochs", "1", "--folds", "2",
                            "--quiet"], capsys)
    assert code == 0 and output.count("is damaged (truncated or altered): recomputing it") >= 1, output
    expected = pd.read_csv(out / "oof_predictions.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "oof_predictions.csv"), expected)
