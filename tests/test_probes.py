"""Linear probes on text states: the layer holding the signal wins on inner validation only."""

import numpy as np
import torch
from transformers import BertConfig, BertModel

from ichpro.probes import layer_probe, pooled_layer_states
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
