import subprocess
import sys

import pandas as pd

from ichpro.cli import main


def test_synth_check_prints_the_calibration_table(tmp_path, capsys):
    code = main(["synth", "--spec", "smoke", "--out", str(tmp_path), "--n-patients", "3000",
                 "--no-images", "--check", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "ICH score -> 30-day mortality" in out and "FUNC -> independence" in out
    assert "AUC of p_bad_oracle_image" in out and "all checked rows within tolerance" in out
    assert len(pd.read_csv(tmp_path / "truth.csv")) == 3000
    assert not (tmp_path / "ct").exists()


def test_validate_summarises_a_generated_cohort(smoke_cohort, capsys):
    assert main(["validate", str(smoke_cohort / "manifest.csv")]) == 0
    out = capsys.readouterr().out
    assert "120" in out


def test_validate_lists_every_problem_and_fails(tmp_path, capsys):
    (tmp_path / "manifest.csv").write_text("patient_id,ct_path,label,report\nA,missing.nii.gz,7,\n")
    assert main(["validate", str(tmp_path / "manifest.csv")]) == 1
    out = capsys.readouterr().out
    assert "problem" in out and "missing.nii.gz" in out and "label" in out


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["synth", "--spec", "no-such-spec", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cohort spec") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_reproduce_rejects_an_unknown_notebook_number(capsys):
    assert main(["reproduce", "--profile", "smoke", "--only", "99", "--data", "unused"]) == 2
    assert "no notebook numbered 99" in capsys.readouterr().err


def test_module_entry_point_shows_help():
    out = subprocess.run([sys.executable, "-m", "ichpro", "synth", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--no-images" in out and "--check" in out
