"""Explanations: Grad-CAM, attention maps, localisation numbers, counterfactual reports, inverse mapping."""

import math
from dataclasses import replace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ichpro import explain
from ichpro.config import get_profile
from ichpro.data import preprocess_transforms
from ichpro.errors import IchproError
from ichpro.models import build_model
from ichpro.predict import TrainedRun
from ichpro.reports import ReportStyle, parse, render
from ichpro.text import load_text_backbone, tokenize

SMOKE = get_profile("smoke")
SIZE = SMOKE.preprocess.spatial_size


def _model(text, seed):
    """A random smoke model (no pretrained vision encoder needed), in eval mode."""
    torch.manual_seed(seed)
    return build_model(SMOKE.model, text.model, SMOKE.loss).eval()


@pytest.fixture(scope="module")
def text(manifest):
    return load_text_backbone("tiny", reports=manifest["report"].tolist(), seed=0)


@pytest.fixture(scope="module")
def run(text):
    return TrainedRun(SMOKE, text, [_model(text, seed=0)])


@pytest.fixture(scope="module")
def patients(manifest, smoke_cohort):
    """One patient of each stored orientation (RAS, LPS), preprocessed with their blood shares."""
    pipeline = preprocess_transforms(SMOKE.preprocess, with_blood=True)
    axcodes = [nib.aff2axcodes(nib.load(p).affine) for p in manifest["ct_path"]]
    first = [axcodes.index(codes) for codes in dict.fromkeys(axcodes)]
    out = []
    for row in manifest.iloc[first].to_dict("records"):
        mask_path = smoke_cohort / row["mask_path"]
        data = pipeline({"ct": row["ct_path"], "blood": str(mask_path)})
        out.append({**data, "ct_path": row["ct_path"], "mask_path": mask_path, "report": row["report"]})
    return out


@pytest.fixture(scope="module")
def batch(patients, text):
    batch = tokenize(text.tokenizer, [p["report"] for p in patients], SMOKE.model.max_tokens)
    batch["ct"] = torch.stack([p["ct"] for p in patients])
    return batch


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def test_grad_cam_is_normalised_and_leaves_the_model_as_it_was(text, batch):
    model = _model(text, seed=1).train()
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    assert not all(flags) and any(flags)  # frozen encoders, trainable fusion
    cam = explain.grad_cam(model, batch)
    assert cam.shape == (2, *SIZE) and not cam.requires_grad
    assert cam.min() >= 0
    torch.testing.assert_close(cam.amax(dim=(1, 2, 3)), torch.ones(2))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters()) and _hooks(model) == 0
    swapped = {**batch, **{key: batch[key].flip(0) for key in ("input_ids", "attention_mask")}}
    assert not torch.allclose(explain.grad_cam(model, swapped), cam)  # the report reaches the gradient


def test_grad_cam_follows_its_formula(run, batch):
    model = run.models[0]
    features = model.vision(batch["ct"]).detach().requires_grad_(True)
    logits = model({"attention_mask": batch["attention_mask"], "vision_features": features,
                    "input_ids": batch["input_ids"]}).logits
    (grads,) = torch.autograd.grad(logits[:, 1].sum(), features)
    cam = F.relu((grads.mean(dim=(2, 3, 4), keepdim=True) * features).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=SIZE, mode="trilinear", align_corners=False)[:, 0].detach()
    expected = cam / cam.amax(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(explain.grad_cam(model, batch), expected, atol=1e-5, rtol=1e-4)


def test_attention_maps_cover_every_fusion_map(run, batch):
    model = run.models[0]
    with torch.no_grad():
        out = model(batch)
    maps = explain.attention_maps(model, batch)
    assert set(maps) == set(out.attentions) and len(maps) == 3
    for name, volume in maps.items():
        assert volume.shape == (2, *SIZE) and volume.min() >= 0
        cells = math.prod(out.attention_grids[name])  # each voxel holds its cell's share
        torch.testing.assert_close(volume.mean(dim=(1, 2, 3)) * cells, torch.ones(2))
    name = next(iter(maps))
    assert list(explain.attention_maps(model, batch, [name])) == [name]
    with pytest.raises(IchproError, match="no attention map 'nope'"):
        explain.attention_maps(model, batch, ["nope"])


def _volumes():
    brain = np.ones((4, 8, 8), dtype=bool)
    brain[:, :, 0] = False
    share = np.zeros((4, 8, 8))
    share[1:3, 2:4, 2:4] = 1.0
    return share, brain


def test_a_map_on_the_haematoma_scores_one_and_hits():
    share, brain = _volumes()
    found = explain.attention_in_mask(share * 3, share, brain)
    assert found["mass_inside"] == pytest.approx(1.0) and found["pointing_hit"]
    assert found["volume_share"] == pytest.approx(8 / brain.sum())
    assert found["ratio"] == pytest.approx(brain.sum() / 8)


def test_a_uniform_map_scores_like_chance():
    share, brain = _volumes()
    found = explain.attention_in_mask(np.ones_like(share), share, brain)
    assert found["ratio"] == pytest.approx(1.0)
    assert found["mass_inside"] == pytest.approx(found["volume_share"])


def test_a_map_elsewhere_scores_zero_and_misses():
    share, brain = _volumes()
    heat = np.zeros_like(share)
    heat[3, 7, 7] = 1.0
    found = explain.attention_in_mask(heat, share, brain)
    assert found["mass_inside"] == 0 and found["ratio"] == 0 and not found["pointing_hit"]


def test_pointing_tolerance_is_one_voxel_and_the_brain_bounds_the_map():
    share, brain = _volumes()
    diagonal, two_away = np.zeros_like(share), np.zeros_like(share)
    diagonal[3, 4, 4] = 1.0
    two_away[1, 2, 5] = 1.0
    assert explain.attention_in_mask(diagonal, share, brain)["pointing_hit"]
    assert not explain.attention_in_mask(two_away, share, brain)["pointing_hit"]
    outside = share.copy()
    outside[0, 0, 0] = 100.0  # outside the brain: ignored
    found = explain.attention_in_mask(outside, share * 0.5, brain)
    assert found["mass_inside"] == pytest.approx(0.5) and found["pointing_hit"]


def test_localisation_table_scores_every_method_of_each_patient(run, smoke_cohort, manifest):
    ids = manifest["patient_id"].head(2).tolist()
    table = explain.localisation_table(run, smoke_cohort / "manifest.csv", ids)
    with pytest.raises(IchproError, match="'nobody' is not in manifest"):
        explain.localisation_table(run, smoke_cohort / "manifest.csv", ["nobody"])
    methods = {*run.models[0].fusion.map_grids, explain.GRAD_CAM}
    assert list(table.columns) == ["patient_id", "label", "method", *explain.MEASURES]
    assert len(table) == 2 * len(methods) and set(table["method"]) == methods
    assert (table.groupby("patient_id")["volume_share"].nunique() == 1).all()
    assert (table["volume_share"] > 0).all()
    np.testing.assert_allclose(table["ratio"], table["mass_inside"] / table["volume_share"])
    labels = manifest.set_index("patient_id")["label"]
    assert (table["label"].to_numpy() == labels.loc[table["patient_id"]].to_numpy()).all()
    summary = explain.localisation_summary(table)
    assert set(summary.index) == methods and list(summary.columns) == list(explain.MEASURES)
    assert summary["pointing_hit"].between(0, 1).all()


def test_localisation_needs_masks(run, smoke_cohort, tmp_path):
    rows = pd.read_csv(smoke_cohort / "manifest.csv").head(2).drop(columns="mask_path")
    for column in ("ct_path", "report_path"):
        rows[column] = [str(smoke_cohort / p) for p in rows[column]]
    rows.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(IchproError, match="no mask_path column"):
        explain.localisation_table(run, tmp_path / "manifest.csv")


def test_brain_covers_the_haematoma_and_not_the_background(patients):
    ct, blood = patients[0]["ct"][0].numpy(), patients[0]["blood"][0].numpy()
    brain = explain.brain_of(ct)
    assert (blood * brain).sum() / blood.sum() > 0.99
    assert brain[ct > 0].all() and not brain[0, 0, 0]


def test_edit_report_changes_only_the_given_fields(manifest):
    original = parse(manifest["report"].iloc[1])
    styled = render(original, ReportStyle(separator="; ", synonym=1, hours=True))
    edited = explain.edit_report(styled, gcs=5, age=85)
    assert parse(edited) == replace(original, gcs=5, age=85)
    assert "GCS Score" not in explain.edit_report(styled, gcs=None)
    with pytest.raises(IchproError, match="unknown report field.*glasgow"):
        explain.edit_report(styled, glasgow=5)


def test_counterfactual_report_moves_the_prediction(run, patients):
    patient = patients[0]
    result = explain.counterfactual(run, patient["ct_path"], patient["report"], {"gcs": 3, "age": 95})
    assert "GCS Score: 3" in result["report_after"] and "Age: 95" in result["report_after"]
    assert parse(result["report_before"]) == parse(patient["report"])
    assert 0 < result["p_bad_before"] < 1 and 0 < result["p_bad_after"] < 1
    assert abs(result["p_bad_after"] - result["p_bad_before"]) > 1e-5
    before, after = result["attention_before"], result["attention_after"]
    assert set(before) == set(after) and all(v.shape == SIZE for v in after.values())
    same = explain.counterfactual(run, patient["ct"], patient["report"], {})
    assert same["p_bad_after"] == same["p_bad_before"]
    assert same["p_bad_before"] == pytest.approx(result["p_bad_before"], abs=1e-6)


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_maps_go_back_onto_the_original_haematoma(patients):
    assert len(patients) == 2  # a RAS and an LPS file
    for patient in patients:
        image = nib.load(patient["ct_path"])
        haematoma = (patient["blood"][0] > 0.5).float()
        back = explain.to_original_grid(haematoma, patient["ct_path"], SMOKE.preprocess)
        assert back.shape == image.shape
        assert _dice(back > 0.5, np.asarray(nib.load(patient["mask_path"]).dataobj) == 1) > 0.6
    with pytest.raises(IchproError, match="not the model grid"):
        explain.to_original_grid(np.zeros((4, 4, 4)), patients[0]["ct_path"], SMOKE.preprocess)


def test_counterfactual_table_asks_each_patient_s_own_fold_model(text, manifest, smoke_cohort):
    models = [_model(text, seed=0), _model(text, seed=1)]
    two_folds = TrainedRun(SMOKE, text, models)
    truth = pd.read_csv(smoke_cohort / "truth.csv")
    better_off = truth[(truth["gcs"] > 5) & (truth["age"] < 85)]  # the edit makes both worse
    ids = better_off["patient_id"].astype(str).tolist()[:2]
    oof = pd.DataFrame({"patient_id": ids, "fold": [1, 0], "p_bad": 0.5, "label": 0})
    table = explain.counterfactual_table(two_folds, manifest, oof, ids, {"gcs": 5, "age": 85}, truth)
    assert list(table.columns) == ["patient_id", "fold", "p_before", "p_after", "oracle_p_before",
                                   "oracle_p_after"]
    row = manifest.set_index(manifest["patient_id"].astype(str)).loc[ids[0]]
    own = explain.counterfactual(TrainedRun(SMOKE, text, [models[1]]), row["ct_path"], row["report"],
                                 {"gcs": 5, "age": 85})
    assert table.loc[0, "p_before"] == pytest.approx(own["p_bad_before"], abs=1e-6)
    assert table.loc[0, "p_after"] == pytest.approx(own["p_bad_after"], abs=1e-6)
    true = truth.set_index(truth["patient_id"].astype(str)).loc[ids]
    assert np.allclose(table["oracle_p_before"], true["p_bad_oracle"])  # the generator's own P(bad)
    assert (table["oracle_p_after"] > table["oracle_p_before"]).all()
