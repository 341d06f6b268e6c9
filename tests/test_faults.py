"""Crash consistency: a run killed at any moment resumes to the uninterrupted run's predictions and
metrics, patient ids kept as written."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

import ichpro.train as train
from ichpro.config import get_profile
from ichpro.errors import IchproError
from ichpro.train import cross_validate, prepare_vision_weights

SMOKE = get_profile("smoke")
FAULTS = replace(SMOKE, train=replace(SMOKE.train, epochs=2, n_folds=2))
#: what a kill may leave different: wall-clock time
TIMING = ["seconds"]


class Killed(BaseException):
    """Stands for the process dying: nothing after it runs."""


@pytest.fixture(scope="module")
def zero_padded(manifest):
    """The smoke cohort with patient ids a spreadsheet would turn into numbers."""
    return manifest.assign(patient_id=[f"{i:06d}" for i in range(len(manifest))])


@pytest.fixture(scope="module")
def reference(zero_padded, tmp_path_factory):
    prepare_vision_weights(FAULTS, quiet=True)
    cache = tmp_path_factory.mktemp("fault_cache")
    run = tmp_path_factory.mktemp("uninterrupted")
    cross_validate(FAULTS, zero_padded, run, seed=0, quiet=True, cache_dir=cache)
    return run, cache


def _outputs(run):
    oof = pd.read_csv(run / "oof_predictions.csv", dtype={"patient_id": str})
    metrics = pd.read_csv(run / "metrics.csv").drop(columns=TIMING)
    return oof, metrics


def _writes_of_a_run(monkeypatch):
    """Count the file writes of the engine; ``kill_before[0]`` set to k raises Killed before write k."""
    counter = {"writes": 0, "kill_before": None}
    for name in ("atomic_write", "save_tensors", "write_json", "publish"):
        original = getattr(train, name)

        def counted(*args, _original=original, **kwargs):
            counter["writes"] += 1
            if counter["writes"] == counter["kill_before"]:
                raise Killed
            return _original(*args, **kwargs)

        monkeypatch.setattr(train, name, counted)
    return counter


def test_a_kill_between_any_two_files_of_a_checkpoint_resumes_to_the_uninterrupted_run(
        reference, zero_padded, tmp_path, monkeypatch):
    run_ref, cache = reference
    expected_oof, expected_metrics = _outputs(run_ref)
    counter = _writes_of_a_run(monkeypatch)
    original_commit = train.BatchedFit._commit

    def commit(self, epoch, rows, scores):
        counter.setdefault("commits", []).append(counter["writes"] + 1)
        return original_commit(self, epoch, rows, scores)

    monkeypatch.setattr(train.BatchedFit, "_commit", commit)
    cross_validate(FAULTS, zero_padded, tmp_path / "count", seed=0, quiet=True, cache_dir=cache)
    n_writes, last_epoch = counter["writes"], counter["commits"][-1]
    # the two folds train as one batched fit, so its last epoch holds every kind of boundary: a
    # commit of several folds (each one's last, best and optimizer files, then each one's state, then
    # the metrics), the fit's end (each one's best, calibration and pending predictions, then each
    # one's publication) and the run's end (out-of-fold predictions); each kill stops the run right
    # before that write
    assert n_writes - last_epoch >= 14
    split = 0  # kills that left the folds at different epochs: resumed from the earlier one
    for k in range(last_epoch, n_writes + 1):
        run = tmp_path / f"kill{k}"
        counter.update(writes=0, kill_before=k)
        with pytest.raises(Killed):
            cross_validate(FAULTS, zero_padded, run, seed=0, quiet=True, cache_dir=cache)
        epochs = {json.loads(p.read_text())["epoch"] for p in run.glob("fold*/state.json")}
        split += len(epochs) > 1
        counter.update(writes=0, kill_before=None)
        cross_validate(FAULTS, zero_padded, run, seed=0, quiet=True, cache_dir=cache, resume=True)
        oof, metrics = _outputs(run)
        pd.testing.assert_frame_equal(oof, expected_oof, check_exact=True,
                                      obj=f"OOF after a kill before write {k}")
        pd.testing.assert_frame_equal(metrics, expected_metrics, check_exact=True,
                                      obj=f"metrics.csv after a kill before write {k}")
        assert oof["patient_id"].str.len().eq(6).all()
    assert split >= 1


def test_a_damaged_checkpoint_is_named_on_resume_with_the_fix(reference, zero_padded, tmp_path, monkeypatch):
    run_ref, cache = reference
    counter = _writes_of_a_run(monkeypatch)
    counter["kill_before"] = 14  # inside the second epoch's commit
    with pytest.raises(Killed):
        cross_validate(FAULTS, zero_padded, tmp_path, seed=0, quiet=True, cache_dir=cache)
    state = json.loads((tmp_path / "fold0" / "state.json").read_text())
    damaged = tmp_path / "fold0" / state["files"]["last"]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    counter["kill_before"] = None
    words = rf"{damaged.name} is damaged or missing.*delete the folder .*fold0.*--resume"
    with pytest.raises(IchproError, match=words):
        cross_validate(FAULTS, zero_padded, tmp_path, seed=0, quiet=True, cache_dir=cache, resume=True)


def test_ichpro_train_killed_at_five_random_moments_resumes_to_the_uninterrupted_run(
        reference, zero_padded, tmp_path):
    run_ref, cache = reference
    expected_oof, expected_metrics = _outputs(run_ref)
    data = tmp_path / "manifest.csv"
    zero_padded.to_csv(data, index=False)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "ichpro", "train", "--profile", "smoke", "--data", str(data),
               "--out", str(run), "--epochs", "2", "--folds", "2", "--cache", str(cache), "--quiet"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(5):
        process = subprocess.Popen(command + (["--resume"] if run.exists() else []), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(4.0, 12.0))  # imports take ~4 s; a smoke run ~15 s
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    finished = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert kills >= 3
    oof, metrics = _outputs(run)
    pd.testing.assert_frame_equal(oof, expected_oof, check_exact=True)
    pd.testing.assert_frame_equal(metrics, expected_metrics, check_exact=True)
