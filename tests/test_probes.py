"""Linear probes on text states: the layer holding the signal wins on inner validation only; late-fusion
probes add what the report holds beyond the image, read for the outcome or for its numbers."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from transformers import BertConfig, BertModel

from ichpro.errors import IchproError
from ichpro.probes import (
    GivenNumbers,
    NumberReader,
    OutcomeReader,
    late_fusion_probe,
    layer_probe,
    pooled_layer_states,
)
from ichpro.train import split_folds


def test_the_layer_that_holds_the_label_wins_the_inner_validation_probe():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    noise = rng.normal(size=(200, 8))
    signal = noise.copy()
    signal[:, 0] += 2.5 * labels
    folds = split_folds(labels, 5, 0.2, seed=0)
    scores = layer_probe(np.stack([noise, signal]), labels, folds)
    assert list(scores.index) == [0, 1]
    assert scores.loc[1, "inner_val_auc"] > 0.85 and abs(scores.loc[0, "inner_val_auc"] - 0.5) < 0.15


def test_the_probe_never_sees_a_test_fold():
    labels = np.tile([0, 1], 50)
    fold = split_folds(labels, 5, 0.2, seed=0)[0]
    features = np.random.default_rng(0).normal(size=(1, 100, 3))
    features[0, fold.test] = np.nan  # scikit-learn would raise on any of these
    assert np.isfinite(layer_probe(features, labels, [fold]).loc[0, "inner_val_auc"])


def test_pooled_states_exclude_padding_and_cover_every_layer():
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32))
    ids = torch.tensor([[2, 7, 9, 3, 0, 0], [2, 7, 9, 3, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    pooled = pooled_layer_states(bert, ids, mask)
    assert pooled.shape == (3, 2, 16)
    alone = pooled_layer_states(bert, ids[:1, :4], mask[:1, :4])
    np.testing.assert_allclose(pooled[:, 0], alone[:, 0], atol=1e-5)


def _two_signal_cohort(n: int = 300, seed: int = 0):
    """Outcome from an image score and a number (say, age) the report's features encode linearly."""
    rng = np.random.default_rng(seed)
    image, age = rng.normal(size=n), rng.normal(size=n)
    labels = (image + 1.5 * age + 0.5 * rng.normal(size=n) > 0).astype(int)
    mixing = rng.normal(size=(1, 12))
    text = age[:, None] @ mixing + 0.3 * rng.normal(size=(n, 12))
    return image, age, labels, text, mixing


def test_late_fusion_adds_the_report_to_the_image_and_follows_an_edited_number():
    image, age, labels, text, mixing = _two_signal_cohort()
    folds = split_folds(labels, 5, 0.2, seed=0)
    edited = text + 2.0 * mixing  # every report now states an age 2 sd higher
    fused = late_fusion_probe(NumberReader, text, image, labels, folds, numbers=age[:, None],
                              text_before=text, text_after=edited)
    assert roc_auc_score(labels, fused["p_bad"]) > roc_auc_score(labels, image) + 0.1
    np.testing.assert_allclose(fused["p_before"], fused["p_bad"])
    assert (fused["p_after"] > fused["p_before"]).all()
    by_outcome = late_fusion_probe(OutcomeReader, text, image, labels, folds)["p_bad"]
    given = late_fusion_probe(GivenNumbers, age[:, None], image, labels, folds)["p_bad"]
    auc = {name: roc_auc_score(labels, p) for name, p in (("image", image), ("outcome", by_outcome),
                                                              ("given", given))}
    assert auc["image"] + 0.1 < auc["outcome"] <= auc["given"]


def test_the_late_fusion_probe_never_sees_a_test_fold():
    image, age, labels, text, _ = _two_signal_cohort()
    folds = split_folds(labels, 5, 0.2, seed=0)
    scrambled = labels.copy()
    scrambled[folds[0].test] = 1 - scrambled[folds[0].test]  # the test fold's labels flipped
    numbers = np.where(np.isin(np.arange(len(age)), folds[0].test), np.nan, age)[:, None]
    first = late_fusion_probe(NumberReader, text, image, labels, folds[:1], numbers=numbers)["p_bad"]
    second = late_fusion_probe(NumberReader, text, image, scrambled, folds[:1], numbers=numbers)["p_bad"]
    np.testing.assert_allclose(first[folds[0].test], second[folds[0].test])


def test_the_number_reader_needs_the_numbers():
    image, _, labels, text, _ = _two_signal_cohort(n=100)
    with pytest.raises(IchproError, match="numbers"):
        late_fusion_probe(NumberReader, text, image, labels, split_folds(labels, 5, 0.2, seed=0))
