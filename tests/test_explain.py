"""Explanations: Grad-CAM, attention maps, localisation numbers, counterfactual reports, inverse mapping."""

import math
from dataclasses import replace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import Resize

from ichpro import explain, heatmaps
from ichpro.config import get_profile
from ichpro.data import preprocess_transforms
from ichpro.errors import IchproError
from ichpro.gradcam import feature_grid
from ichpro.models import build_model
from ichpro.models.comparators import build_comparator
from ichpro.plots import binomial_ci
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
    maps = heatmaps.attention_maps(model, batch)
    assert set(maps) == set(out.attentions) and len(maps) == 3
    for name, volume in maps.items():
        assert volume.shape == (2, *SIZE) and volume.min() >= 0
        cells = math.prod(out.attention_grids[name])  # each voxel holds its cell's share
        torch.testing.assert_close(volume.mean(dim=(1, 2, 3)) * cells, torch.ones(2))
    name = next(iter(maps))
    assert list(heatmaps.attention_maps(model, batch, [name])) == [name]
    with pytest.raises(IchproError, match="no attention map 'nope'"):
        heatmaps.attention_maps(model, batch, ["nope"])


def test_gradient_weighted_attention_is_a_share_of_each_map_and_leaves_the_model_as_found(run, batch):
    model = run.models[0]
    model.train()
    maps = heatmaps.gradient_weighted_attention(model, batch)
    assert model.training and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        out = model(batch)
    assert set(maps) == {name + heatmaps.GRADIENT_WEIGHTED for name in out.attentions}
    for name, volume in maps.items():
        assert volume.shape == (2, *SIZE) and volume.min() >= 0
        cells = math.prod(out.attention_grids[name.removesuffix(heatmaps.GRADIENT_WEIGHTED)])
        mass = volume.mean(dim=(1, 2, 3)) * cells  # 1, or 0 for a map without a positive part
        assert all(torch.isclose(m, torch.tensor(1.0)) or m == 0 for m in mass)
    assert any(volume.std() > 0 for volume in maps.values())  # not all flat
    model.eval()


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
    methods = set(explain.map_grids(run))  # the attention maps, their gradient-weighted maps, Grad-CAM
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


def test_pointing_chance_is_the_share_of_the_brain_that_counts_as_a_hit():
    brain = np.ones((5, 5, 5), dtype=bool)
    centre, corner = np.zeros((5, 5, 5)), np.zeros((5, 5, 5))
    centre[2, 2, 2], corner[0, 0, 0] = 0.3, 1.0
    assert explain.pointing_chance(centre, brain) == pytest.approx(27 / 125)  # the voxel, 26 neighbours
    assert explain.pointing_chance(corner, brain) == pytest.approx(8 / 125)
    half = brain.copy()
    half[:, :, 3:] = False  # hits outside the brain do not count, blood outside it neither
    assert explain.pointing_chance(centre, half) == pytest.approx(18 / 75)
    share, brain = _volumes()
    deltas = [np.eye(1, share.size, k).reshape(share.shape) for k in np.flatnonzero(brain)]  # peak anywhere
    peaks = [explain.attention_in_mask(delta, share, brain)["pointing_hit"] for delta in deltas]
    assert explain.pointing_chance(share, brain) == pytest.approx(np.mean(peaks))


def test_grid_ceiling_is_the_ratio_of_the_best_cell():
    brain = np.ones((4, 4, 4), dtype=bool)
    block, slab = np.zeros((4, 4, 4)), np.zeros((4, 4, 4))
    block[:2, :2, :2] = 1.0  # fills one cell of a 2 x 2 x 2 grid: 1 / (8 / 64)
    slab[:1, :2, :2] = 1.0  # fills half of it: 0.5 / (4 / 64)
    assert explain.grid_ceiling(block, brain, (2, 2, 2)) == pytest.approx(8.0)
    assert explain.grid_ceiling(slab, brain, (2, 2, 2)) == pytest.approx(8.0)
    assert explain.grid_ceiling(slab, brain, (4, 4, 4)) == pytest.approx(16.0)  # the input grid: 1 / (4 / 64)
    assert explain.grid_ceiling(block, brain, (1, 1, 1)) == pytest.approx(1.0)  # one cell: uniform
    left = brain.copy()
    left[:, :, 2:] = False  # the brain is half the volume: volume share 8 / 32, the block's cell all brain
    assert explain.grid_ceiling(block, left, (2, 2, 2)) == pytest.approx(4.0)
    heat = np.zeros((4, 4, 4))
    heat[:2, :2, :2] = 1.0  # the map that reaches it
    assert explain.attention_in_mask(heat, block, left)["ratio"] == pytest.approx(4.0)


def test_localisation_statistics_per_method_in_table_order():
    table = pd.DataFrame({"patient_id": list("abcd") * 2, "method": ["z"] * 4 + ["y"] * 4,
                          "mass_inside": 0.1, "volume_share": 0.05,
                          "ratio": [2.0, 0.5, np.nan, 4.0, 1.0, 1.0, 1.0, 1.0],
                          "pointing_hit": [True, False, False, True] + [False] * 4,
                          "pointing_chance": [0.1, 0.2, 0.3, 0.4] * 2,
                          "grid_ceiling": [1.0, 2.0, 3.0, 10.0] * 2})
    stats = explain.localisation_statistics(table)
    assert list(stats.index) == ["z", "y"]
    assert list(stats.columns) == ["mass_inside", "volume_share", "ratio", "pointing_hit_rate", "n",
                                   "median_ratio", "share_above_1", "grid_ceiling", "pointing_chance",
                                   "pointing_ci_low", "pointing_ci_high"]
    z = stats.loc["z"]
    assert z["ratio"] == pytest.approx(6.5 / 3) and z["median_ratio"] == 2.0 and z["share_above_1"] == 0.5
    assert z["n"] == 4 and z["pointing_hit_rate"] == 0.5 and z["grid_ceiling"] == 2.5
    assert z["pointing_chance"] == pytest.approx(0.25)
    assert (z["pointing_ci_low"], z["pointing_ci_high"]) == pytest.approx(binomial_ci(2, 4))
    assert stats.loc["y", "share_above_1"] == 0 and stats.loc["y", "pointing_ci_low"] == 0


def test_patient_volumes_resize_as_training_does(manifest):
    record = manifest.iloc[0]
    ct, blood = explain.patient_volumes(record, SMOKE.preprocess)
    assert ct.shape == (1, *SIZE) and blood.shape == (2, *SIZE)
    small_ct, small_blood = explain.patient_volumes(record, SMOKE.preprocess, (8, 16, 16))
    assert small_ct.shape == (1, 8, 16, 16) and small_blood.shape == (2, 8, 16, 16)
    assert type(small_ct) is torch.Tensor
    torch.testing.assert_close(small_ct, Resize((8, 16, 16), mode="area")(ct).as_tensor())
    torch.testing.assert_close(small_blood.mean(dim=(1, 2, 3)), blood.mean(dim=(1, 2, 3)))  # volume kept
    ids = manifest["patient_id"][:2]
    cts, bloods = explain.patients_on_grid(manifest, ids, SMOKE.preprocess, (8, 16, 16))
    assert cts.shape == (2, 1, 8, 16, 16) and bloods.shape == (2, 2, 8, 16, 16)
    torch.testing.assert_close(cts[0], small_ct)
    with pytest.raises(IchproError, match="ICH.* has no mask_path"):
        explain.patient_volumes(record.drop("mask_path"), SMOKE.preprocess)


def test_maps_in_mask_and_baselines_score_each_map_of_each_patient(manifest):
    ids = list(manifest["patient_id"][:2])
    ct, blood = explain.patients_on_grid(manifest, ids, SMOKE.preprocess)
    maps = {"on the blood": blood[:, 0], "uniform": torch.ones_like(blood[:, 0]),
            "zero": torch.zeros_like(ct[:, 0])}
    found = explain.maps_in_mask(maps, ct, blood[:, 0], ids)
    assert list(found["method"]) == ["on the blood"] * 2 + ["uniform"] * 2 + ["zero"] * 2
    assert list(found["patient_id"]) == ids * 3
    zero = found[found["method"] == "zero"]
    assert zero["ratio"].isna().all() and not zero["pointing_hit"].any()  # no mass, no peak
    np.testing.assert_allclose(found.loc[found["method"] == "uniform", "ratio"], 1.0)
    assert found.loc[found["method"] == "on the blood", "pointing_hit"].all()
    grids = {"coarse": (1, 1, 1), "fine": SIZE}
    base = explain.localisation_baselines(ct, blood[:, 0], ids, grids)
    assert list(base.columns) == ["patient_id", "method", "pointing_chance", "grid_ceiling"]
    assert len(base) == 4
    coarse, fine = base[base["method"] == "coarse"], base[base["method"] == "fine"]
    np.testing.assert_allclose(coarse["grid_ceiling"], 1.0)
    assert (fine["grid_ceiling"] > 1).all()
    brain = explain.brain_of(ct[0, 0])
    assert fine["pointing_chance"].iloc[0] == pytest.approx(explain.pointing_chance(blood[0, 0], brain))


def test_map_grids_and_feature_grid_name_each_map_s_grid(run, batch):
    model = run.models[0]
    grids = explain.map_grids(run)
    assert set(grids) == set(explain.patient_maps(run, {k: v[:1] for k, v in batch.items()}))
    assert grids[heatmaps.GRAD_CAM] == tuple(model.vision(batch["ct"]).shape[2:])
    weighted = {k.removesuffix(heatmaps.GRADIENT_WEIGHTED): v for k, v in grids.items()
                if k.endswith(heatmaps.GRADIENT_WEIGHTED)}
    raw = {k: v for k, v in grids.items()
           if k != heatmaps.GRAD_CAM and not k.endswith(heatmaps.GRADIENT_WEIGHTED)}
    assert raw == weighted == model.fusion.map_grids  # a weighted map lies on its attention map's grid
    comparator = build_comparator("quantification", SMOKE.model).eval()
    ct = torch.zeros(1, 1, *SMOKE.model.comparator_input)
    assert feature_grid(comparator, {"ct": ct}) == tuple(comparator.encoder(ct).shape[2:])
    assert _hooks(comparator) == 0
    comparator.gradcam_layer = None
    with pytest.raises(IchproError, match="names no layer for Grad-CAM"):
        feature_grid(comparator, {"ct": ct})


def test_token_attention_shares_sum_to_one_over_the_report_s_tokens(run, manifest):
    report = manifest["report"].iloc[0]
    read = explain.token_attention(run, report)
    tokens = tokenize(run.text.tokenizer, [report], SMOKE.model.max_tokens)["input_ids"][0]
    assert len(read) == len(tokens) and read.sum() == pytest.approx(1.0) and (read >= 0).all()
    assert read.index[0].startswith("0:")
