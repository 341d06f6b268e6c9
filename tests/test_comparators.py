"""Comparator models and clinical baselines: shapes, gradients, overfitting, hand-computed values."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from ichpro.clinical import clinical_scores, logistic_regression_cv
from ichpro.cohort import sample_clinical
from ichpro.config import PAPER_WINDOW, get_profile
from ichpro.data import make_folds
from ichpro.image_report import image_report, measure_ct, template_tokens
from ichpro.models.comparators import (
    CLINICAL_FEATURES,
    COMPARATORS,
    ClinicalStandardizer,
    HeadOutputs,
    build_comparator,
    clinical_tensor,
    count_parameters,
    decode_ordinal_gcs,
    encode_ordinal_gcs,
)
from ichpro.reports import Report, render
from ichpro.text import TINY_SIZES

CT_SHAPE = (16, 32, 32)
SMOKE = get_profile("smoke").model
SMOKE_VISION_CHANNELS = 64  # the smoke profile's frozen ResNet-10, widths (8, 16, 32, 64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one intra-op thread is faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    measurements = [{"volume_ml": 12.0 * i, "side": ("left", "right")[i % 2], "level": "middle",
                     "near_midline": i % 2 == 0} for i in range(n)]
    ids, mask = template_tokens([image_report(m) for m in measurements])
    tokens = 9
    return {
        "ct": torch.rand(n, 1, *CT_SHAPE, generator=g),
        "labels": torch.tensor([0, 1, 1, 0])[:n],
        "clinical": torch.randn(n, len(CLINICAL_FEATURES), generator=g),
        "gcs": torch.tensor([15.0, 10.0, 5.0, 3.0])[:n],
        "age": torch.tensor([50.0, 85.0, 70.0, 91.0])[:n],
        "volume_ml": torch.tensor([5.0, 40.0, 0.5, 80.0])[:n],
        "image_text_ids": ids, "image_text_mask": mask,
        "vision_features": torch.randn(n, SMOKE_VISION_CHANNELS, 1, 2, 2, generator=g),
        "text_states": torch.randn(n, tokens, TINY_SIZES["hidden_size"], generator=g),
        "attention_mask": torch.ones(n, tokens, dtype=torch.long),
    }


def build(name, seed=0):
    torch.manual_seed(seed)
    return build_comparator(name, SMOKE, TINY_SIZES["hidden_size"])


# --------------------------------------------------------------------------- every comparator


def test_registry_holds_every_comparator():
    densenets = {"densenet", "densenet+bin_age", "densenet+bin_gcs", "densenet+bin_gcs+bin_age",
                 "densenet+ord_gcs", "densenet+ord_gcs+bin_age"}
    others = {"small3dcnn", "quantification", "quantification_single", "vdafm", "slice2d", "image+gcs",
              "concat_late"}
    assert set(COMPARATORS) == densenets | others


@pytest.mark.parametrize("name", list(COMPARATORS))
def test_shapes_finite_loss_and_a_gradient_for_every_parameter(name):
    model = build(name)
    batch = make_batch(n=2)
    out = model(batch)
    assert out.logits.shape == (2, 2)
    assert set(out.auxiliary) == set(model.auxiliary_tasks)
    assert all(value.shape == (2,) for value in out.auxiliary.values())
    assert all(value.shape[0] == 2 for value in model.head_outputs(batch).aux.values())
    loss, terms = out.loss, out.terms
    assert model({k: v for k, v in batch.items() if k != "labels"}).loss is None  # prediction: no loss
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert "ce" in terms
    assert all(v.ndim == 0 and not v.requires_grad and torch.isfinite(v) for v in terms.values())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["densenet+ord_gcs+bin_age", "quantification", "vdafm"])
def test_a_few_adam_steps_overfit_a_fixed_batch(name):
    model = build(name)
    batch = make_batch()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        loss = model(batch).loss
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# --------------------------------------------------------------------------- multi-task DenseNet


def test_ordinal_gcs_code_and_its_inverse():
    code = encode_ordinal_gcs(torch.tensor([15.0, 10.0, 5.0]))
    assert code.tolist() == [[0, 0], [1, 0], [1, 1]]
    assert decode_ordinal_gcs(code).tolist() == [0, 1, 2]
    # an inconsistent code never skips a level
    assert decode_ordinal_gcs(torch.tensor([[0.2, 0.9], [0.7, 0.4]])).tolist() == [0, 1]
    edges = encode_ordinal_gcs(torch.tensor([13.0, 12.0, 9.0, 8.0, 3.0]))
    assert decode_ordinal_gcs(edges).tolist() == [0, 1, 1, 2, 2]


def _softplus(x):
    return math.log1p(math.exp(x))


def _bce(x, y):
    return _softplus(x) - x * y


HAND_BATCH = {"labels": torch.tensor([0, 1]), "gcs": torch.tensor([10.0, 5.0]),
              "age": torch.tensor([50.0, 85.0])}
HAND_CE = (_softplus(-2.0) + _softplus(-1.0)) / 2  # logits [2, 0] label 0; [0, 1] label 1
HAND_AGE = (_bce(0.0, 0) + _bce(3.0, 1)) / 2


def test_multitask_loss_is_the_published_weighting_on_a_hand_case():
    aux = {"gcs": torch.tensor([[1.0, -1.0], [0.5, 2.0]]), "age": torch.tensor([[0.0], [3.0]])}
    out = HeadOutputs(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), aux)
    gcs = (_bce(1.0, 1) + _bce(-1.0, 0) + _bce(0.5, 1) + _bce(2.0, 1)) / 4  # bits of GCS 10 and 5
    total, terms = build("densenet+ord_gcs+bin_age").loss(out, HAND_BATCH)
    assert total.item() == pytest.approx(0.4 * HAND_CE + 0.3 * gcs + 0.3 * HAND_AGE, rel=1e-6)
    assert terms == pytest.approx({"ce": HAND_CE, "gcs": gcs, "age": HAND_AGE}, rel=1e-6)


def test_multitask_weights_are_renormalised_over_the_tasks_present():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    age_only = HeadOutputs(logits, {"age": torch.tensor([[0.0], [3.0]])})
    total, _ = build("densenet+bin_age").loss(age_only, HAND_BATCH)
    assert total.item() == pytest.approx((0.4 * HAND_CE + 0.3 * HAND_AGE) / 0.7, rel=1e-6)
    binary_gcs = HeadOutputs(logits, {"gcs": torch.tensor([[1.0], [-2.0]])})  # GCS 10 > 8, 5 <= 8
    total, _ = build("densenet+bin_gcs").loss(binary_gcs, HAND_BATCH)
    gcs = (_bce(1.0, 0) + _bce(-2.0, 1)) / 2
    assert total.item() == pytest.approx((0.4 * HAND_CE + 0.3 * gcs) / 0.7, rel=1e-6)
    total, _ = build("densenet").loss(HeadOutputs(logits), HAND_BATCH)
    assert total.item() == pytest.approx(HAND_CE, rel=1e-6)


# --------------------------------------------------------------------------- other comparators


def test_quantification_heads():
    batch = make_batch(n=2)
    model = build("quantification")
    out = model.head_outputs(batch)
    assert torch.allclose(out.aux["volume_ml"], torch.expm1(out.aux["log1p_volume"]).clamp_min(0))
    assert torch.equal(model(batch).auxiliary["volume_ml_pred"], out.aux["volume_ml"])
    single = build("quantification_single")
    assert "volume" not in single(batch).terms and single.targets == () and single.auxiliary_tasks == ()


def test_attention_pooling_weights():
    batch = make_batch(n=2)
    batch["image_text_mask"][0, -3:] = 0  # the first report is shorter
    out = build("vdafm").head_outputs(batch)
    assert out.aux["text_attention"][0, -3:].abs().max() == 0
    assert torch.allclose(out.aux["text_attention"].sum(1), torch.ones(2))
    weights = build("slice2d").head_outputs(batch).aux["slice_weights"]
    assert weights.shape == (2, CT_SHAPE[0]) and torch.allclose(weights.sum(1), torch.ones(2))


def _windowed(hu):
    lo, hi = PAPER_WINDOW
    return torch.as_tensor((np.clip(hu, lo, hi) - lo) / (hi - lo), dtype=torch.float32)[None]


@pytest.mark.parametrize(("centre", "side", "level", "near_midline"),
                         [((16, 30, 16), "right", "middle", False), ((4, 30, 41), "left", "inferior", True)])
def test_measure_ct_finds_a_known_blob(centre, side, level, near_midline):
    rng = np.random.default_rng(0)
    shape, radius, voxel_ml = (32, 64, 64), 6.0, 0.05
    hu = 30.0 + rng.normal(0, 3, shape)  # brain
    grid = np.indices(shape)
    blob = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
    hu[blob] = 65.0 + rng.normal(0, 3, int(blob.sum()))
    m = measure_ct(_windowed(hu), voxel_ml)
    assert m["volume_ml"] == pytest.approx(4 / 3 * math.pi * radius**3 * voxel_ml, rel=0.1)
    assert (m["side"], m["level"], m["near_midline"]) == (side, level, near_midline)


def test_image_report_is_deterministic_and_in_the_template_vocabulary():
    m = {"volume_ml": 23.4, "side": "left", "level": "middle", "near_midline": True}
    text = image_report(m)
    assert text == image_report(dict(m)) == (
        "Hyperdense haematoma of 23 ml in the left hemisphere, middle third. Blood reaches the midline.")
    assert image_report({**m, "volume_ml": 0.4}) != text
    assert image_report(measure_ct(_windowed(np.full((8, 16, 16), 30.0)), 0.1)) == "No hyperdense haematoma."
    ids, mask = template_tokens([text, image_report({**m, "volume_ml": 0.4, "near_midline": False})])
    assert (ids[mask == 1] > 1).all()  # no padding, no unknown token


# --------------------------------------------------------------------------- clinical baselines


def test_clinical_scores_from_columns_and_from_a_report():
    report = render(Report(age=60, sex="Male", gcs=4, position="Right cerebellar hemorrhage", volume_ml=12.0))
    manifest = pd.DataFrame({
        "age": [82.0, np.nan, 70.0], "sex": ["Female", None, "Male"], "gcs": [11.0, np.nan, 15.0],
        "volume_ml": [35.0, np.nan, 10.0], "ivh": [1, 0, np.nan], "location": ["deep", None, "lobar"],
        "report": ["", report, ""],
    })
    scores = clinical_scores(manifest)
    # GCS 11 -> 1, >= 30 mL -> 1, IVH -> 1, supratentorial -> 0, age >= 80 -> 1
    # GCS 4 -> 2, 12 mL -> 0, no IVH -> 0, infratentorial -> 1, age 60 -> 0
    assert scores["ich_score"].tolist()[:2] == [4, 3]
    # FUNC: 30-60 mL -> 2, age >= 80 -> 0, deep -> 1, GCS >= 9 -> 2, no impairment -> 1
    # < 30 mL -> 4, age < 70 -> 2, infratentorial -> 0, GCS <= 8 -> 0, no impairment -> 1
    assert scores["func_score"].tolist()[:2] == [6, 7]
    # IVH unknown: no ICH score; FUNC needs no IVH: < 30 mL 4, age 70-79 1, lobar 2, GCS 2, 1
    assert np.isnan(scores.loc[2, "ich_score"]) and scores.loc[2, "func_score"] == 10
    assert (scores["ich_score_risk"].iloc[:2] == scores["ich_score"].iloc[:2]).all()
    assert (scores["func_score_risk"].iloc[:2] == -scores["func_score"].iloc[:2]).all()


def test_clinical_scores_need_every_input():
    manifest = pd.DataFrame({"age": [70.0], "gcs": [14.0], "volume_ml": [20.0], "ivh": [0],
                             "report": ["Position: Supratentorial hemorrhage"]})
    scores = clinical_scores(manifest)
    assert scores.loc[0, "ich_score"] == 0  # supratentorial is enough for the ICH score
    assert np.isnan(scores.loc[0, "func_score"])  # FUNC tells lobar from deep


def test_clinical_standardizer_uses_training_stats_and_keeps_them_with_the_weights():
    train = pd.DataFrame({"age": [60.0, 80.0], "sex": ["Male", "Female"], "gcs": [15.0, 7.0],
                          "onset_to_ct_min": [60.0, 180.0],
                          "treatment": ["Conservative treatment", "Craniotomy"]})
    standardizer = ClinicalStandardizer()
    standardizer.fit(clinical_tensor(train))
    # each column has two values: standardized to -1 and +1 (ddof 0)
    x = standardizer(clinical_tensor(train))
    assert x.dtype == torch.float32
    assert x.tolist() == [[-1.0, 1.0, 1.0, -1.0, -1.0], [1.0, -1.0, -1.0, 1.0, 1.0]]
    test = pd.DataFrame({"age": [70.0, np.nan], "sex": [None, "Male"], "gcs": [11.0, 3.0],
                         "onset_to_ct_min": [120.0, np.nan], "treatment": [None, None]})
    raw = clinical_tensor(test)
    assert torch.isnan(raw[1, 0]) and raw[1, 2] == 3.0  # raw values, NaN where unknown
    y = standardizer(raw)
    assert y[0].tolist() == [0.0] * 5  # the training means, or missing
    assert y[1].tolist() == pytest.approx([0.0, 1.0, -2.0, 0.0, 0.0])
    restored = ClinicalStandardizer()
    restored.load_state_dict(standardizer.state_dict())  # the statistics travel with the weights
    assert torch.equal(restored(raw), y)


def test_a_comparator_reading_clinical_fits_its_standardizer_on_the_training_patients():
    model = build("image+gcs")
    clinical = torch.tensor([[60.0, 1, 15, 60, 0], [80.0, 0, 7, 180, 1]], dtype=torch.float64)
    model.fit_training_patients({"clinical": clinical})
    assert model.clinical.mean.tolist() == [70.0, 0.5, 11.0, 120.0, 0.5]
    build("small3dcnn").fit_training_patients({})  # reads no clinical field: nothing to fit


def _cohort(n=160, seed=0):
    t = sample_clinical(n, np.random.default_rng(seed))
    return t[["label", "age", "sex", "gcs", "volume_ml", "ivh", "location", "midline_shift_mm",
              "onset_to_ct_min", "treatment"]]


def test_logistic_regression_is_out_of_fold():
    manifest = _cohort()
    folds = make_folds(manifest["label"], n_splits=4, seed=0)
    p = logistic_regression_cv(manifest, folds, seed=0)
    assert p.shape == (len(manifest),) and ((p > 0) & (p < 1)).all()
    assert np.array_equal(p, logistic_regression_cv(manifest, folds, seed=0))
    y = manifest["label"].to_numpy()
    assert np.mean(p[y == 1]) > np.mean(p[y == 0])  # informative
    flipped = manifest.assign(label=np.where(folds == 0, 1 - y, y))
    q = logistic_regression_cv(flipped, folds, seed=0)
    assert np.allclose(q[folds == 0], p[folds == 0])  # fold 0's labels never reach fold 0's model
    assert not np.allclose(q[folds != 0], p[folds != 0])
