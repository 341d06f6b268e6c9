"""Vision pretraining: loss values, the card, weights that reload, resume, and the profile wiring."""

import math
from dataclasses import replace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from ichpro.config import PretrainConfig, get_profile
from ichpro.errors import IchproError
from ichpro.models.encoders import VisionEncoder
from ichpro.pretrain import (
    PretrainNet,
    pretrain_loss,
    pretrain_vision,
    pretrained_path,
    with_vision_weights,
)

SMOKE = get_profile("smoke")
TINY = replace(SMOKE, pretrain=PretrainConfig(n_patients=24, epochs=2, batch_size=8))


@pytest.fixture(scope="module")
def small_cohort(smoke_cohort, tmp_path_factory):
    """The first 32 patients of the smoke cohort (absolute paths), for quick pretraining runs."""
    folder = tmp_path_factory.mktemp("pretrain_cohort")
    for name in ("manifest.csv", "truth.csv"):
        table = pd.read_csv(smoke_cohort / name).iloc[:32]
        for column in ("ct_path", "mask_path"):
            if column in table:
                table[column] = [str(smoke_cohort / p) for p in table[column]]
        table.to_csv(folder / name, index=False)
    return folder


def test_loss_is_small_for_a_perfect_prediction_and_large_for_a_wrong_one():
    blood = torch.zeros(1, 2, 4, 4, 4)
    blood[0, 0, 1:3, 1:3, 1:3] = 1
    volume_ml = torch.tensor([7.0])
    right = torch.where(blood > 0, 20.0, -20.0)
    target = {"blood": blood, "volume_ml": volume_ml}
    total, terms = pretrain_loss({"blood": right, "volume": torch.log1p(volume_ml)}, target,
                                 volume_weight=1.0)
    # channel 1 is empty and predicted empty: its Dice term is (0 + 1) / (0 + 0 + 1) -> loss 0
    assert total.item() == pytest.approx(0.0, abs=1e-6) and terms["volume_mse"] == pytest.approx(0.0)
    wrong, _ = pretrain_loss({"blood": -right, "volume": torch.log1p(volume_ml) + 2}, target,
                             volume_weight=1.0)
    assert wrong.item() > 4 + 0.5  # MSE 4, plus Dice and BCE of a fully wrong map


def test_findings_term_equals_its_hand_computed_value():
    blood = torch.zeros(1, 2, 4, 4, 4)
    out = {"blood": torch.full_like(blood, -30.0), "volume": torch.zeros(1), "ivh": torch.zeros(1),
           "midline_shift": torch.log1p(torch.tensor([3.0])) + 0.5, "location": torch.zeros(1, 4)}
    target = {"blood": blood, "volume_ml": torch.zeros(1), "ivh": torch.ones(1),
              "midline_shift_mm": torch.tensor([3.0]), "location": torch.tensor([2])}
    total, terms = pretrain_loss(out, target, volume_weight=1.0, radiology_weight=0.5)
    # BCE of logit 0 is log 2, the shift is 0.5 off on the log1p scale, the location logits are uniform
    expected = math.log(2) + 0.25 + math.log(4)
    assert terms["findings"] == pytest.approx(expected, rel=1e-5)
    assert total.item() == pytest.approx(0.5 * expected, abs=1e-4)  # empty blood predicted empty: ~0


def test_pretraining_writes_a_card_and_weights_that_reload(small_cohort, tmp_path):
    card = pretrain_vision(TINY, tmp_path, quiet=True, cohort=small_cohort)
    assert card["train_patients"] + card["held_out_patients"] == 32
    assert [h["epoch"] for h in card["history"]] == [1, 2]
    assert 0 <= card["held_out"]["held_out_dice"] <= 1 and card["held_out"]["held_out_volume_mae_ml"] > 0
    assert "haematoma soft Dice" in (tmp_path / "card.md").read_text()
    cfg = SMOKE.model
    encoder = VisionEncoder(cfg.vision_depth, cfg.vision_widths, cfg.vision_no_max_pool)
    encoder.load_weights(tmp_path / "vision.safetensors")
    saved = load_file(str(tmp_path / "vision.safetensors"))
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_resumed_pretraining_equals_an_uninterrupted_one(small_cohort, tmp_path):
    one_epoch = replace(TINY, pretrain=replace(TINY.pretrain, epochs=1))
    pretrain_vision(one_epoch, tmp_path / "resumed", quiet=True, cohort=small_cohort)
    resumed = pretrain_vision(TINY, tmp_path / "resumed", resume=True, quiet=True, cohort=small_cohort)
    straight = pretrain_vision(TINY, tmp_path / "straight", quiet=True, cohort=small_cohort)
    assert resumed["history"] == [{**h} for h in straight["history"]]
    a, b = (load_file(str(tmp_path / d / "vision.safetensors")) for d in ("resumed", "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_profiles_point_at_their_pretrained_encoder():
    path = pretrained_path(SMOKE)
    assert pretrained_path(TINY) != path  # another pretraining config, another cache entry
    smaller = replace(SMOKE, preprocess=replace(SMOKE.preprocess, spatial_size=(8, 32, 32)))
    assert pretrained_path(smaller) != path
    given = replace(SMOKE, model=replace(SMOKE.model, vision_weights="/weights/medicalnet.pth"))
    assert with_vision_weights(given) is given  # a weights file given by the user wins
    assert with_vision_weights(get_profile("paper")).model.vision_weights is None  # no pretraining
    missing = replace(SMOKE, pretrain=replace(SMOKE.pretrain, seed=12345))
    with pytest.raises(IchproError, match="ichpro pretrain-vision --profile smoke"):
        with_vision_weights(missing)


def test_segmentation_head_output_matches_the_input_size_and_starts_at_the_blood_prior():
    net = PretrainNet(SMOKE).eval()
    out = net(torch.rand(2, 1, *SMOKE.preprocess.spatial_size))
    assert out["blood"].shape == (2, 2, *SMOKE.preprocess.spatial_size) and out["volume"].shape == (2,)
    assert 0.005 < out["blood"].sigmoid().mean() < 0.05  # blood is rare: the head starts near its prior
    no_findings = replace(SMOKE, pretrain=replace(SMOKE.pretrain, radiology_weight=0.0))
    assert "location" not in PretrainNet(no_findings)(torch.rand(1, 1, *SMOKE.preprocess.spatial_size))


def test_findings_head_reads_ivh_shift_and_location_and_the_card_reports_them(small_cohort, tmp_path):
    findings = replace(TINY, pretrain=replace(TINY.pretrain, radiology_weight=0.25))
    out = PretrainNet(findings).eval()(torch.rand(2, 1, *SMOKE.preprocess.spatial_size))
    assert out["ivh"].shape == out["midline_shift"].shape == (2,) and out["location"].shape == (2, 4)
    card = pretrain_vision(findings, tmp_path, quiet=True, cohort=small_cohort)
    held_out = card["held_out"]
    assert 0 <= held_out["held_out_location_accuracy"] <= 1 and held_out["held_out_shift_mae_mm"] >= 0
    assert "location accuracy" in (tmp_path / "card.md").read_text()
    assert pretrained_path(findings) != pretrained_path(TINY)


def test_the_kept_encoder_is_the_best_held_out_epoch(small_cohort, tmp_path):
    three = replace(TINY, pretrain=replace(TINY.pretrain, epochs=3))
    card = pretrain_vision(three, tmp_path, quiet=True, cohort=small_cohort)
    losses = [h["held_out_loss"] for h in card["history"]]
    assert card["best_epoch"] == 1 + losses.index(min(losses))
    assert card["held_out"] == card["history"][card["best_epoch"] - 1]
    kept, best = (load_file(str(tmp_path / name)) for name in ("vision.safetensors", "best.safetensors"))
    assert all(torch.equal(kept[k], best[k]) for k in kept)
    assert f"kept: epoch {card['best_epoch']}" in (tmp_path / "card.md").read_text()



def test_a_damaged_pretrained_encoder_is_refused_then_pretrained_again(small_cohort, tmp_path, monkeypatch,
                                                                         capsys):
    from ichpro import pretrain

    profile = replace(TINY, pretrain=replace(TINY.pretrain, seed=4321))
    monkeypatch.setattr(pretrain, "pretrained_path", lambda p: tmp_path / "enc" / "vision.safetensors")
    monkeypatch.setattr(pretrain, "pretraining_cohort", lambda p, quiet=False: small_cohort)
    pretrain.ensure_pretrained(profile, quiet=True)
    weights = tmp_path / "enc" / "vision.safetensors"
    good = weights.read_bytes()
    assert with_vision_weights(profile).model.vision_weights == str(weights)
    weights.write_bytes(good[:-5] + bytes([good[-5] ^ 0xFF]) + good[-4:])
    with pytest.raises(IchproError, match="missing or damaged"):
        with_vision_weights(profile)
    pretrain.ensure_pretrained(profile, quiet=True)
    assert "is damaged (its hash is not its card's): pretraining it again" in capsys.readouterr().err
    assert weights.read_bytes() == good  # pretraining is deterministic
