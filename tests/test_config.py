"""Configs are checked when they are built: one sentence naming the field, its option and an allowed value."""

import pytest

from ichpro.config import (
    PROFILES,
    LossConfig,
    ModelConfig,
    PreprocessConfig,
    PretrainConfig,
    TrainConfig,
    get_profile,
    profile_from_dict,
)
from ichpro.errors import IchproError


@pytest.mark.parametrize(("config", "field", "value", "words"), [
    (TrainConfig, "epochs", 0, r"TrainConfig.epochs \(--epochs\) is 0: use a whole number >= 1"),
    (TrainConfig, "epochs", -3, r"--epochs"),
    (TrainConfig, "epochs", 2.5, r"--epochs"),
    (TrainConfig, "batch_size", 0, r"TrainConfig.batch_size \(--batch-size\) is 0"),
    (TrainConfig, "batch_size", -8, r"--batch-size"),
    (TrainConfig, "lr", -1e-3, r"TrainConfig.lr \(--lr\) is -0.001: use a learning rate > 0"),
    (TrainConfig, "lr", float("nan"), r"--lr"),
    (TrainConfig, "n_folds", 1, r"\(--folds\) is 1: use at least 2 folds"),
    (TrainConfig, "grad_accumulation", 0, r"\(--grad-accumulation\) is 0"),
    (TrainConfig, "val_fraction", 1.0, r"val_fraction is 1.0: use a share between 0 and 1"),
    (TrainConfig, "patience", 0, r"patience is 0"),
    (TrainConfig, "lr_schedule", "step", r"use one of constant, cosine"),
    (TrainConfig, "calibration", "isotonic", r"use one of none, platt"),
    (TrainConfig, "amp", "fp8", r"\(--amp\) is 'fp8': use one of auto, bf16, fp16, off"),
    (TrainConfig, "device", "gpu", r"\(--device\) is 'gpu': use auto, cpu, cuda or cuda:N"),
    (TrainConfig, "weight_decay", -0.1, r"weight_decay is -0.1"),
    (ModelConfig, "vision_depth", 20, r"vision_depth is 20: use one of 10, 18, 34, 50"),
    (ModelConfig, "fusion", "self-x", r"\(--fusion\) is .self-x.: use one of self, cross"),
    (ModelConfig, "modality", "audio", r"use one of both, vision, text"),
    (ModelConfig, "trt", "pooled", r"use one of queries, positional"),
    (ModelConfig, "grid", (2, 0, 4), r"grid is \(2, 0, 4\): give three whole numbers >= 1"),
    (ModelConfig, "heads", 5, r"heads is 5: use a whole number >= 1 that divides the fusion width dim = 256"),
    (ModelConfig, "text_layers", 0, r"text_layers is 0"),
    (ModelConfig, "comparator_size", "large", r"use one of smoke, cpu, paper"),
    (ModelConfig, "vision_dropout", 1.0, r"\(--vision-dropout\) is 1.0: use a share in \[0, 1\)"),
    (ModelConfig, "vision_dropout", -0.1, r"vision_dropout \(--vision-dropout\) is -0.1"),
    (PreprocessConfig, "spatial_size", (16, 64), r"spatial_size is \(16, 64\): give three whole numbers"),
    (PreprocessConfig, "hu_window", (400.0, 15.0), r"low < high"),
    (LossConfig, "temperature", 0.0, r"temperature is 0.0: use a temperature > 0"),
    (LossConfig, "mlm_probability", 1.5, r"mlm_probability is 1.5"),
    (LossConfig, "mlm_vocabulary", "words", r"mlm_vocabulary is 'words': use one of full, reports"),
    (PretrainConfig, "held_out", 0.0, r"held_out is 0.0"),
    (PretrainConfig, "epochs", 0, r"PretrainConfig.epochs is 0"),
])
def test_a_bad_field_is_rejected_when_the_config_is_built(config, field, value, words):
    with pytest.raises(IchproError, match=words):
        config(**{field: value})


@pytest.mark.parametrize(("terms", "words"), [
    ((("ce", 0.0),), r"\(--loss\).*learns only from ce or blend: give one of them a weight > 0"),
    ((("sdm", 1.0), ("mlm", 1.0)), r"learns only from ce or blend"),
    ((("ce", 1.0), ("focal", 1.0)), r"unknown loss term 'focal' \(--loss\)"),
    ((("ce", 1.0), ("ce", 1.0)), r"'ce' is given twice"),
    ((("ce", -1.0),), r"must be finite and >= 0"),
    ((), r"no loss terms given"),
])
def test_a_loss_without_a_supervised_term_or_with_bad_terms_is_rejected(terms, words):
    with pytest.raises(IchproError, match=words):
        LossConfig(terms=terms)


def test_blend_alone_is_a_supervised_loss_and_weights_become_floats():
    assert LossConfig(terms=(("blend", 1), ("sdm", 0))).terms == (("blend", 1.0), ("sdm", 0.0))


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_profile_is_valid_and_survives_its_json_round_trip(name):
    from dataclasses import asdict

    profile = get_profile(name)
    assert profile_from_dict(asdict(profile)) == profile
