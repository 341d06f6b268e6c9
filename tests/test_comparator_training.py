"""Comparators in the engine and Table 4: inputs, training runs, clinical baselines, auxiliary metrics."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ichpro.batches import BatchSource
from ichpro.clinical import CLINICAL_BASELINES, clinical_baseline_cv, clinical_scores
from ichpro.config import get_profile
from ichpro.errors import IchproError, ManifestError
from ichpro.experiments import (
    NOT_IN_TABLE4,
    TABLES,
    auxiliary_metrics,
    row_costs,
    row_folder,
    row_profile,
    table_rows,
    to_markdown,
)
from ichpro.gradcam import grad_cam
from ichpro.image_report import measure_ct_file
from ichpro.manifest import haematoma_volumes
from ichpro.models import PrognosisModel
from ichpro.models.comparators import COMPARATORS, build_comparator
from ichpro.predict import load_run, predict_patient, save_heatmap
from ichpro.text import load_text_backbone
from ichpro.train import cross_validate, prepare_vision_weights

SMOKE = get_profile("smoke")
FAST = replace(SMOKE, train=replace(SMOKE.train, epochs=2, n_folds=3))


def comparator_profile(name: str):
    return replace(FAST, model=replace(FAST.model, comparator=name))


@pytest.fixture(scope="module")
def truth(smoke_cohort):
    return pd.read_csv(smoke_cohort / "truth.csv")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("comparator_cache")


@pytest.fixture(scope="module")
def multitask_run(manifest, cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("multitask")
    oof = cross_validate(comparator_profile("densenet+ord_gcs+bin_age"), manifest, run, quiet=True,
                         cache_dir=cache)
    return run, oof


def test_table4_has_every_comparator_and_clinical_baseline_once_but_the_declared_few():
    names = [r.model.get("comparator") for r in table_rows("table4_comparison")]
    assert set(NOT_IN_TABLE4) <= set(COMPARATORS)
    wanted = [n for n in [*COMPARATORS, *CLINICAL_BASELINES] if n not in NOT_IN_TABLE4]
    assert sorted(n for n in names if n) == sorted(wanted)
    assert names.count(None) == 2 and TABLES["table4_comparison"][0] == "4_comparison"  # ICHPro and ours


def test_unknown_comparator_is_refused_by_name():
    with pytest.raises(IchproError, match="unknown comparator 'resnet'.*densenet"):
        build_comparator("resnet", SMOKE.model)


def test_haematoma_volume_comes_from_the_mask_else_the_column(manifest, truth):
    head = manifest.head(6).reset_index(drop=True)
    np.testing.assert_allclose(haematoma_volumes(head), truth["volume_ml"].head(6), rtol=0.05, atol=0.2)
    noted = head.assign(mask_path=[None] * 6)
    np.testing.assert_allclose(haematoma_volumes(noted), head["volume_ml"])
    with pytest.raises(ManifestError, match="neither a mask_path nor a volume_ml"):
        haematoma_volumes(noted.drop(columns="volume_ml"))


def test_template_measurements_find_the_side_and_volume_of_the_haematoma(manifest, truth):
    for i in range(4):
        m = measure_ct_file(manifest["ct_path"][i])
        assert m["side"] == truth["side"][i]
        assert m["volume_ml"] == pytest.approx(truth["volume_ml"][i], rel=0.15, abs=1.0)


class Reader(PrognosisModel):
    """A model that only declares what it reads."""

    inputs = ("ct", "clinical", "image_text_ids", "image_text_mask")
    targets = ("gcs", "age", "volume_ml")
    ct_size = (16, 32, 32)


def test_the_source_holds_what_a_model_declares_and_clinical_is_standardized_on_training_patients(
        manifest, cache):
    profile = comparator_profile("vdafm")
    text = load_text_backbone("tiny", reports=manifest["report"].tolist(), seed=0)
    source = BatchSource(manifest, profile, text, cache)
    source.prepare(Reader(), lambda: pytest.fail("no encoder output is read"), torch.device("cpu"), 0,
                   quiet=True)
    batch = source.batch([0, 1, 2], torch.device("cpu"))
    assert batch["ct"].shape == (3, 1, *Reader.ct_size)
    assert batch["image_text_ids"].shape == batch["image_text_mask"].shape
    assert torch.equal(batch["gcs"], torch.tensor(manifest["gcs"][:3].to_numpy(), dtype=torch.float32))
    model = build_comparator("vdafm", SMOKE.model)
    train = np.arange(0, len(manifest), 2)
    model.fit_training_patients(source.training_patients(train))
    clinical = model.clinical(source.features["clinical"])
    assert clinical[train].mean(0).abs().max() < 1e-5  # centred on the training patients
    assert clinical[np.setdiff1d(np.arange(len(manifest)), train)].mean(0).abs().max() > 1e-3
    without_targets = BatchSource(manifest, profile, text, cache)
    without_targets.prepare(Reader(), None, torch.device("cpu"), 0, with_targets=False, quiet=True)
    assert not {"gcs", "age", "volume_ml"} & set(without_targets.batch([0], torch.device("cpu")))


def test_a_comparator_cross_validates_with_its_auxiliary_predictions(multitask_run, manifest):
    run, oof = multitask_run
    assert sorted(oof["patient_id"]) == sorted(manifest["patient_id"])
    assert {"gcs_class", "p_age_ge80"} <= set(oof.columns)
    assert set(oof["gcs_class"]) <= {0, 1, 2} and oof["p_age_ge80"].between(0, 1).all()
    metrics = pd.read_csv(run / "metrics.csv")
    assert {"train_ce", "train_gcs", "train_age"} <= set(metrics.columns)
    expected = sum(p.numel() for p in build_comparator("densenet+ord_gcs+bin_age", SMOKE.model).parameters())
    assert json.loads((run / "parameters.json").read_text())["trainable"] == expected


def test_a_finished_comparator_run_is_reproduced_exactly(multitask_run, manifest, cache, tmp_path):
    _, oof = multitask_run
    again = cross_validate(comparator_profile("densenet+ord_gcs+bin_age"), manifest, tmp_path / "again",
                           quiet=True, cache_dir=cache)
    np.testing.assert_allclose(again["p_bad"], oof["p_bad"], rtol=1e-5)


def test_quantification_predicts_volumes_and_its_grad_cam_is_a_normalised_map(manifest, cache, tmp_path):
    oof = cross_validate(comparator_profile("quantification"), manifest, tmp_path, quiet=True,
                         cache_dir=cache)
    assert (oof["volume_ml_pred"] >= 0).all()
    model = build_comparator("quantification", SMOKE.model).train()
    ct = torch.rand(2, 1, 16, 32, 32)
    maps = grad_cam(model, {"ct": ct}, size=(16, 64, 64))  # on the preprocessed grid
    assert maps.shape == (2, 16, 64, 64) and maps.min() >= 0 and maps.amax(dim=(1, 2, 3)).le(1 + 1e-6).all()
    assert model.training and all(p.grad is None for p in model.parameters())
    assert grad_cam(build_comparator("small3dcnn", SMOKE.model), {"ct": ct}).shape == (2, 16, 32, 32)
    with pytest.raises(IchproError, match="SliceCNN2D names no layer for Grad-CAM"):
        grad_cam(build_comparator("slice2d", SMOKE.model), {"ct": ct})


@pytest.mark.parametrize("name", ["image+gcs", "concat_late"])
def test_predict_on_a_comparator_run_gives_its_out_of_fold_p_bad_and_a_grad_cam(name, manifest, cache,
                                                                               tmp_path):
    run_dir = tmp_path / "run"
    prepare_vision_weights(comparator_profile(name), quiet=True)  # concat_late reads the frozen encoder
    oof = cross_validate(comparator_profile(name), manifest, run_dir, quiet=True, cache_dir=cache)
    run = load_run(run_dir)
    for _, row in oof.iloc[[0, 45, 90]].iterrows():
        patient = manifest.set_index("patient_id").loc[row["patient_id"]]
        prediction = predict_patient(run, patient["ct_path"], patient["report"])
        # the fold's clinical standardization and calibration travel with its weights
        assert prediction.p_bad_per_fold[int(row["fold"])] == pytest.approx(row["p_bad"], abs=1e-5)
    assert prediction.heatmap_name == "grad_cam"
    assert prediction.heatmap.shape == prediction.ct.shape == SMOKE.preprocess.spatial_size
    nifti, png = save_heatmap(prediction, tmp_path / "patient")
    assert nifti.name == "patient_grad_cam.nii.gz" and png.is_file()


def test_concat_late_fusion_needs_frozen_encoders(manifest, cache, tmp_path):
    profile = comparator_profile("concat_late")
    unfrozen = replace(profile, model=replace(profile.model, freeze_vision=False))
    with pytest.raises(IchproError, match="frozen encoders"):
        cross_validate(unfrozen, manifest, tmp_path, quiet=True, cache_dir=cache)


@pytest.mark.parametrize("name", CLINICAL_BASELINES)
def test_a_clinical_baseline_runs_on_the_same_folds(name, manifest, tmp_path):
    oof = cross_validate(comparator_profile(name), manifest, tmp_path, quiet=True)
    assert sorted(oof["patient_id"]) == sorted(manifest["patient_id"])
    assert oof["p_bad"].between(0, 1).all() and set(oof["fold"]) == {0, 1, 2}
    assert json.loads((tmp_path / "parameters.json").read_text())["trainable"] >= 2
    with pytest.raises(IchproError, match=f"clinical baseline '{name}'.*no model to load"):
        load_run(tmp_path)


def test_a_score_keeps_its_own_auc_within_each_fold(manifest):
    folds = np.arange(len(manifest)) % 3
    p_bad, n_parameters = clinical_baseline_cv("ich_score", manifest, folds)
    risk = clinical_scores(manifest)["ich_score_risk"].to_numpy()
    labels = manifest["label"].to_numpy()
    assert n_parameters == 2
    for k in range(3):
        fold = folds == k
        own = roc_auc_score(labels[fold], risk[fold])
        assert roc_auc_score(labels[fold], p_bad[fold]) == pytest.approx(own)
    with pytest.raises(IchproError, match="unknown clinical baseline"):
        clinical_baseline_cv("apache", manifest, folds)


def test_auxiliary_metrics_on_hand_made_predictions():
    manifest = pd.DataFrame({"patient_id": ["a", "b", "c", "d"], "gcs": [15.0, 10, 5, 14],
                             "age": [85.0, 60, 90, 40], "volume_ml": [10.0, 20, 30, 40], "label": 0})
    perfect = pd.DataFrame({"patient_id": ["a", "b", "c", "d"], "gcs_class": [0, 1, 2, 0],
                            "p_age_ge80": [0.9, 0.1, 0.8, 0.2], "volume_ml_pred": [10.0, 20, 30, 40]})
    wrong = perfect.assign(gcs_class=[2, 1, 0, 2], volume_ml_pred=[12.0, 22, 32, 42],
                           p_gcs_le8=[0.9, 0.8, 0.1, 0.7])
    table = auxiliary_metrics({"perfect": perfect, "wrong": wrong}, manifest)
    value = table.set_index(["row", "task", "metric"])["value"]
    assert value["perfect", "GCS (3 ordinal classes)", "balanced accuracy"] == 1
    assert value["perfect", "GCS (3 ordinal classes)", "quadratic-weighted kappa"] == 1
    assert value["perfect", "age >= 80", "AUC"] == 1
    assert value["perfect", "haematoma volume (mL)", "MAE (mL)"] == 0
    assert value["wrong", "haematoma volume (mL)", "MAE (mL)"] == pytest.approx(2)
    assert value["wrong", "haematoma volume (mL)", "R^2"] == pytest.approx(1 - 16 / 500)
    assert value["wrong", "GCS (3 ordinal classes)", "quadratic-weighted kappa"] < 0
    assert value["wrong", "GCS <= 8", "AUC"] == 0  # the one GCS <= 8 patient gets the lowest P


def test_costs_come_from_the_run_folders_and_show_in_markdown(tmp_path):
    rows = table_rows("table4_comparison")[:2]
    folder = row_folder(tmp_path, SMOKE, rows[0], 0)
    folder.mkdir(parents=True)
    (folder / "parameters.json").write_text(json.dumps({"trainable": 1234}))
    (folder / "timing.json").write_text(json.dumps({"seconds": 50.0}))
    costs = row_costs(rows, SMOKE, tmp_path)
    assert costs["params"].iloc[0] == 1234
    assert costs["seconds_per_fold"].iloc[0] == 50.0 / row_profile(SMOKE, rows[0]).train.n_folds
    assert costs[["params", "seconds_per_fold"]].iloc[1].isna().all()
    line = {"row": "x", "n_seeds": 1, "difference": np.nan, "ceiling_auc": 0.9, "params": 1234,
            "seconds_per_fold": 10.0}
    for m in ("accuracy", "recall", "precision", "f1", "auc"):
        line.update({f"paper_{m}": np.nan, m: 0.5, f"{m}_ci_low": 0.4, f"{m}_ci_high": 0.6})
    markdown = to_markdown(pd.DataFrame([line]))
    assert "trainable params | s / fold" in markdown and "| 1,234 | 10.0 |" in markdown


def test_cli_trains_a_comparator_and_refuses_an_unknown_one(smoke_cohort, tmp_path, capsys):
    from ichpro.cli import main

    data = str(smoke_cohort / "manifest.csv")
    assert main(["train", "--comparator", "ich_score", "--profile", "smoke", "--data", data,
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "out-of-fold predictions" in capsys.readouterr().out
    assert main(["train", "--comparator", "gcs_ichnet", "--profile", "smoke", "--data", data,
                 "--out", str(tmp_path / "other")]) == 2
    assert "unknown comparator 'gcs_ichnet'" in capsys.readouterr().err


def test_cli_trains_a_comparator_with_its_table4_settings_then_evaluates_and_predicts_its_run(
        smoke_cohort, manifest, tmp_path, capsys):
    from ichpro.cli import main

    run = tmp_path / "small3dcnn"
    assert main(["train", "--comparator", "small3dcnn", "--profile", "smoke", "--data",
                 str(smoke_cohort / "manifest.csv"), "--out", str(run), "--epochs", "1", "--folds", "2",
                 "--quiet"]) == 0
    train = json.loads((run / "run.json").read_text())["config"]["train"]
    table4 = next(r for r in table_rows("table4_comparison") if r.model.get("comparator") == "small3dcnn")
    assert {k: train[k] for k in table4.train} == table4.train and train["epochs"] == 1  # the option wins
    capsys.readouterr()
    assert main(["evaluate", str(run), "--n-boot", "50"]) == 0
    assert "auc" in capsys.readouterr().out
    patient = manifest.iloc[0]
    assert main(["predict", "--checkpoint", str(run), "--ct", patient["ct_path"],
                 "--report", patient["report"], "--heatmap", str(tmp_path / "patient")]) == 0
    out = capsys.readouterr().out
    assert "P(bad outcome)" in out and "patient_grad_cam.png" in out


@pytest.fixture(scope="module")
def few_patients(manifest):
    """Twelve patients of each outcome: enough for two folds of a one-epoch run."""
    return pd.concat([manifest[manifest["label"] == k].head(12) for k in (0, 1)]).reset_index(drop=True)


@pytest.mark.parametrize("name", list(COMPARATORS))
def test_predict_draws_a_heat_map_of_every_trainable_comparator(name, few_patients, cache, tmp_path, capsys):
    from ichpro.cli import main

    profile = replace(comparator_profile(name), train=replace(FAST.train, epochs=1, n_folds=2))
    prepare_vision_weights(profile, quiet=True)
    cross_validate(profile, few_patients, tmp_path / "run", quiet=True, cache_dir=cache)
    patient = few_patients.iloc[0]
    assert main(["predict", "--checkpoint", str(tmp_path / "run"), "--ct", patient["ct_path"],
                 "--report", patient["report"], "--heatmap", str(tmp_path / "map")]) == 0
    out = capsys.readouterr().out
    kind = "slice_attention" if name == "slice2d" else "grad_cam"  # the 2D network has no Grad-CAM layer
    assert (tmp_path / f"map_{kind}.png").is_file() and (tmp_path / f"map_{kind}.nii.gz").is_file()
    assert "ichpro card" in out  # no card yet: predict says how to write it
