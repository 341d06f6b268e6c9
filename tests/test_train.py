"""Training engine: cross-validation outputs, fold hygiene, checkpoints, resume, DDP."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ichpro.config import get_profile
from ichpro.errors import IchproError
from ichpro.metrics import classification_metrics
from ichpro.runtime import autocast, cosine_lr, resolve_device
from ichpro.train import BatchedFit, cross_validate, prepare_vision_weights, split_folds

SMOKE = get_profile("smoke")
FAST = replace(SMOKE, train=replace(SMOKE.train, epochs=3, n_folds=3))


@pytest.fixture(scope="module")
def ct_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ct_cache")


@pytest.fixture(scope="module", autouse=True)
def pretrained():
    """The smoke profile's pretrained vision encoder, made as the callers of cross_validate do."""
    prepare_vision_weights(FAST, quiet=True)


@pytest.fixture(scope="module")
def finished_run(manifest, ct_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    oof = cross_validate(FAST, manifest, run, seed=0, quiet=True, cache_dir=ct_cache)
    return run, oof


def test_every_patient_is_predicted_exactly_once(finished_run, manifest):
    run, oof = finished_run
    saved = pd.read_csv(run / "oof_predictions.csv")
    assert list(saved.columns) == ["patient_id", "fold", "p_bad", "label", "p_bad_uncalibrated"]
    assert sorted(saved["patient_id"]) == sorted(manifest["patient_id"])
    assert saved["p_bad"].between(0, 1).all() and set(saved["fold"]) == {0, 1, 2}
    truth = manifest.set_index("patient_id")["label"]
    assert (saved.set_index("patient_id")["label"] == truth.loc[saved["patient_id"]]).all()
    np.testing.assert_allclose(saved["p_bad"], oof["p_bad"], rtol=1e-6)


def test_run_folder_records_config_metrics_and_checkpoints(finished_run):
    run, _ = finished_run
    record = json.loads((run / "run.json").read_text())
    assert record["seed"] == 0 and record["config"]["train"]["epochs"] == 3
    assert {"git commit", "torch", "ichpro"} <= set(record["versions"])
    metrics = pd.read_csv(run / "metrics.csv")
    assert len(metrics) == 3 * 3  # folds x epochs
    expected = {"train_ce", "train_imima", "train_sdm", "train_mlm", "val_loss", "val_auc"}
    assert expected <= set(metrics.columns)
    for k in range(3):
        folder = run / f"fold{k}"
        state = json.loads((folder / "state.json").read_text())
        assert state["epoch"] == 3 and state["files"]["last"] == "last-3.safetensors"
        kept = {"best.safetensors", "state.json", "predictions.csv", *state["files"].values()}
        assert kept <= {p.name for p in folder.iterdir()}
        assert not list(folder.glob("*.tmp"))
        assert [p.name for p in folder.glob("*-*.safetensors")] != [] and all(  # earlier epochs deleted
            p.name in state["files"].values() for p in folder.glob("*-*.safetensors"))
        assert [row["epoch"] for row in state["metrics"]] == [1, 2, 3]


def test_each_fold_is_recalibrated_on_its_inner_validation_split(finished_run):
    from scipy.special import logit

    from ichpro.calibration import PlattScaling

    run, oof = finished_run
    assert FAST.train.calibration == "platt"
    for k, fold in oof.groupby("fold"):
        scaling = PlattScaling.load(run / f"fold{k}" / "calibration.json")
        assert (scaling.slope, scaling.intercept) != (1.0, 0.0)
        np.testing.assert_allclose(fold["p_bad"], scaling.p_bad(logit(fold["p_bad_uncalibrated"])), rtol=1e-5)
        # a monotone map within the fold: the fold's own ranking is unchanged
        assert (fold["p_bad"].rank() == fold["p_bad_uncalibrated"].rank()).all() or scaling.slope == 0


def test_cosine_schedule_runs_from_the_base_rate_to_zero_and_is_applied_each_epoch(finished_run):
    assert cosine_lr(1e-3, 1, 10) == 1e-3 and cosine_lr(1e-3, 6, 10) == pytest.approx(5e-4)
    assert cosine_lr(1e-3, 11, 10) == pytest.approx(0, abs=1e-12)
    assert FAST.train.lr_schedule == "cosine"
    state = json.loads((finished_run[0] / "fold0" / "state.json").read_text())
    last_lr = state["optimizer"]["lr"]
    assert last_lr == pytest.approx(cosine_lr(FAST.train.lr, state["epoch"], FAST.train.epochs))


def test_checkpoints_leave_out_frozen_encoders(finished_run):
    from safetensors.torch import load_file

    keys = load_file(str(finished_run[0] / "fold0" / "best.safetensors")).keys()
    assert not any(k.startswith(("vision.", "text.")) for k in keys)
    assert any(k.startswith("fusion.") for k in keys) and any(k.startswith("header.") for k in keys)


def test_inner_validation_never_touches_the_test_fold():
    labels = np.array([0, 1] * 60)
    folds = split_folds(labels, n_folds=5, val_fraction=0.2, seed=3)
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested) == list(range(120))
    for f in folds:
        assert not set(f.val) & set(f.test) and not set(f.train) & set(f.test)
        assert not set(f.train) & set(f.val)
        assert len(f.train) + len(f.val) + len(f.test) == 120
        assert abs(labels[f.val].mean() - 0.5) <= 0.05


def test_resumed_run_predicts_exactly_like_an_uninterrupted_one(finished_run, manifest, ct_cache,
                                                                 tmp_path, monkeypatch):
    original = BatchedFit._train_epoch

    def crash_in_epoch2(self, epoch, active):
        if epoch == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, epoch, active)

    monkeypatch.setattr(BatchedFit, "_train_epoch", crash_in_epoch2)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(FAST, manifest, tmp_path, seed=0, quiet=True, cache_dir=ct_cache)
    for k in range(3):  # the folds train together: each has committed its first epoch
        assert json.loads((tmp_path / f"fold{k}" / "state.json").read_text())["epoch"] == 1
        assert not (tmp_path / f"fold{k}" / "predictions.csv").exists()
    monkeypatch.setattr(BatchedFit, "_train_epoch", original)
    resumed = cross_validate(FAST, manifest, tmp_path, seed=0, quiet=True, cache_dir=ct_cache,
                             resume=True)
    pd.testing.assert_frame_equal(resumed, finished_run[1], check_exact=True)
    before = (tmp_path / "fold0" / "predictions.csv").stat().st_mtime_ns
    cross_validate(FAST, manifest, tmp_path, seed=0, quiet=True, cache_dir=ct_cache, resume=True)
    assert (tmp_path / "fold0" / "predictions.csv").stat().st_mtime_ns == before  # finished: not recomputed


def test_a_run_folder_of_another_config_is_refused(finished_run, manifest):
    other = replace(FAST, train=replace(FAST.train, lr=5e-4))
    with pytest.raises(IchproError, match="another config"):
        cross_validate(other, manifest, finished_run[0], resume=True, quiet=True)
    with pytest.raises(IchproError, match="pass --resume"):
        cross_validate(FAST, manifest, finished_run[0], quiet=True)


def test_bf16_autocast_on_cpu_trains(manifest, ct_cache, tmp_path):
    bf16 = replace(FAST, train=replace(FAST.train, epochs=1, n_folds=2, amp="bf16"))
    oof = cross_validate(bf16, manifest, tmp_path, quiet=True, cache_dir=ct_cache)
    assert len(oof) == len(manifest) and np.isfinite(oof["p_bad"]).all()


def test_device_errors_are_clear():
    if not torch.cuda.is_available():
        with pytest.raises(IchproError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(IchproError, match="amp must be"):
        autocast(torch.device("cpu"), "fp8")


def _train_command(data, out, batch_size):
    # no vision dropout: each process draws its own samples' dropout, so runs could not be compared
    return ["-m", "ichpro", "train", "--profile", "smoke", "--data", str(data), "--out", str(out),
            "--epochs", "2", "--folds", "2", "--loss", "ce", "--batch-size", str(batch_size), "--quiet",
            "--vision-dropout", "0"]


def test_two_process_ddp_matches_a_single_process_run_of_the_same_global_batch(smoke_cohort, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29517"]
    subprocess.run(torchrun + _train_command(smoke_cohort, tmp_path / "ddp", 4), check=True, env=env,
                   capture_output=True, timeout=600)
    subprocess.run([sys.executable] + _train_command(smoke_cohort, tmp_path / "single", 8), check=True,
                   env=env, capture_output=True, timeout=600)
    ddp = pd.read_csv(tmp_path / "ddp" / "oof_predictions.csv")
    single = pd.read_csv(tmp_path / "single" / "oof_predictions.csv")
    assert sorted(ddp["patient_id"]) == sorted(single["patient_id"])
    auc_ddp = classification_metrics(ddp["label"], ddp["p_bad"])["auc"]
    auc_single = classification_metrics(single["label"], single["p_bad"])["auc"]
    # the same global batch; BatchNorm statistics are per process, so close but not identical
    assert abs(auc_ddp - auc_single) < 0.1
    first = [pd.read_csv(tmp_path / r / "metrics.csv").iloc[0]["train_ce"] for r in ("ddp", "single")]
    assert first[0] == pytest.approx(first[1], rel=0.05)


def test_ddp_keeps_every_learned_weight_of_model_and_objective_equal_across_ranks(smoke_cohort, tmp_path):
    """With the full VTMF loss, IMIMA's learnable mix included: DDP wraps the batched fit's stacked
    models with their objectives."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = str(Path(__file__).with_name("ddp_ranks.py"))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    "29518", worker, str(smoke_cohort / "manifest.csv"), str(tmp_path)], check=True, env=env,
                   capture_output=True, timeout=600)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert "member1.objective.imima_mix" in ranks[0] and ranks[0].keys() == ranks[1].keys()
    assert ranks[0]["member1.objective.imima_mix"].abs().max() > 0  # it learned: it starts at zero
    for name, weight in ranks[0].items():
        assert torch.equal(weight, ranks[1][name]), name


def test_predict_rebuilds_each_fold_model_exactly(finished_run, smoke_cohort, tmp_path):
    from ichpro.predict import load_run, predict_patient, save_heatmap

    run_dir, oof = finished_run
    run = load_run(run_dir)
    assert len(run.models) == 3
    row = oof.iloc[0]
    manifest = pd.read_csv(smoke_cohort / "manifest.csv").set_index("patient_id")
    ct = smoke_cohort / manifest.loc[row["patient_id"], "ct_path"]
    report = smoke_cohort / manifest.loc[row["patient_id"], "report_path"]
    prediction = predict_patient(run, ct, str(report))
    assert prediction.p_bad_per_fold[int(row["fold"])] == pytest.approx(row["p_bad"], abs=1e-5)
    assert prediction.p_bad == pytest.approx(np.mean(prediction.p_bad_per_fold))
    assert prediction.heatmap_name == "grad_cam"  # the default: the map that localises best (notebook 11)
    assert prediction.heatmap.shape == prediction.ct.shape == SMOKE.preprocess.spatial_size
    assert 0 <= prediction.heatmap.min() and prediction.heatmap.max() <= 1 + 1e-6
    attention = predict_patient(run, ct, str(report), heatmap_kind="stage1_cmaf_text_to_vision")
    assert attention.p_bad == prediction.p_bad
    cells = np.prod(run.models[0].fusion.map_grids["stage1_cmaf_text_to_vision"])
    assert attention.heatmap.mean() == pytest.approx(1 / cells, rel=0.01)  # shares sum to 1 over cells
    nifti, png = save_heatmap(attention, tmp_path / "patient")
    assert nifti.name == "patient_stage1_cmaf_text_to_vision.nii.gz" and nifti.is_file() and png.is_file()
    weighted = predict_patient(run, ct, str(report), heatmap_kind="stage2_mhsaf_self_x_gradient")
    mhsaf_cells = np.prod(run.models[0].fusion.map_grids["stage2_mhsaf_self"])
    assert 0 <= weighted.heatmap.mean() <= 1.01 / mhsaf_cells  # each fold's map: shares summing to 1, or none
    assert predict_patient(run, ct, str(report), with_heatmap=False).heatmap is None
    with pytest.raises(IchproError,
                       match="draws no heat map 'nope'; it draws stage1_cmaf_vision_to_text, .*grad_cam"):
        predict_patient(run, ct, str(report), heatmap_kind="nope")


def test_predict_rejects_bad_inputs_clearly(finished_run, smoke_cohort, tmp_path):
    from ichpro.predict import load_run, predict_patient

    with pytest.raises(IchproError, match="not a run folder"):
        load_run(tmp_path)
    run = load_run(finished_run[0])
    report = next((smoke_cohort / "reports").iterdir())
    ct = next((smoke_cohort / "ct").glob("*[0-9].nii.gz"))
    with pytest.raises(IchproError, match=r"cannot predict: CT .*missing.nii.gz does not exist"):
        predict_patient(run, tmp_path / "missing.nii.gz", "Age: 60")
    with pytest.raises(IchproError, match="cannot predict: .*is neither a NIfTI file"):
        predict_patient(run, report, "Age: 60")
    with pytest.raises(IchproError, match="report is empty"):
        predict_patient(run, ct, "  ")
    with pytest.raises(IchproError, match=r"report file .*notes/typo.txt does not exist"):
        predict_patient(run, ct, "notes/typo.txt")  # a path, not a report
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Âge: 60 ans, GCS 14".encode("latin-1"))
    with pytest.raises(IchproError, match=r"latin1.txt is not UTF-8 text"):
        predict_patient(run, ct, str(latin1))


def test_a_frozen_fit_encodes_each_ct_once_and_end_to_end_every_step(manifest, ct_cache, tmp_path,
                                                                     monkeypatch):
    """What makes frozen fits fast: the 3D encoder sees each CT once, not at every step."""
    from ichpro.models.encoders import VisionEncoder
    from ichpro.pretrain import ensure_pretrained

    ensure_pretrained(FAST, quiet=True)  # pretraining runs the encoder too: not counted here
    seen = []
    original = VisionEncoder.forward
    monkeypatch.setattr(VisionEncoder, "forward", lambda self, ct: seen.append(len(ct)) or original(self, ct))
    small = manifest.iloc[:40].reset_index(drop=True)
    quick = replace(FAST, train=replace(FAST.train, epochs=2, n_folds=2))
    end_to_end = replace(quick, model=replace(quick.model, freeze_vision=False))
    cross_validate(quick, small, tmp_path / "frozen", quiet=True, cache_dir=tmp_path / "cache")
    frozen_calls = sum(seen)
    seen.clear()
    cross_validate(end_to_end, small, tmp_path / "e2e", quiet=True, cache_dir=tmp_path / "cache")
    assert frozen_calls == len(small)
    # every epoch encodes the training and validation patients again, then the selected model the
    # validation patients (its recalibration) and the test fold
    assert sum(seen) == 2 * (2 * (16 + 4) + 4 + 20)  # folds x (epochs x (train + val) + val + test)
    seen.clear()
    again = cross_validate(quick, small, tmp_path / "frozen-again", quiet=True, cache_dir=tmp_path / "cache")
    assert len(again) == len(small) and not seen  # the disk cache: nothing encoded again


def test_the_model_card_of_an_ichpro_run_states_its_measured_numbers(finished_run, manifest):
    from ichpro.metrics import metrics_table
    from ichpro.model_card import model_card

    run, oof = finished_run
    card = model_card(run, manifest, n_boot=100)
    auc = metrics_table(oof["label"], oof["p_bad"], n_boot=100).set_index("metric").loc["auc"]
    assert f"| AUC | {auc['value']:.3f} ({auc['ci_low']:.3f} to {auc['ci_high']:.3f}) |" in card
    for section in ("## Intended use", "## Not for", "## Training data", "## Inputs", "## Decision curve",
                    "## Subgroups", "## Heat map", "## Known failure modes"):
        assert section in card
    assert "ICHPro (cross-self fusion; loss ce 1, imima 1, sdm 1, mlm 1)" in card
    assert "calibration slope (before Platt scaling)" in card and "`grad_cam` by default" in card
    assert f"- {len(oof)} patients, {int(oof['label'].sum())} bad outcomes" in card
    assert "Hospital Stay " in card  # the report fields it read, with how often each was given
