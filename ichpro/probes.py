"""Linear probes on a frozen text encoder: how much of the outcome each layer's token states expose.

A probe is a logistic regression on a report's mean-pooled token states (padding excluded). It
chooses ``ModelConfig.text_layers`` without touching a test fold: :func:`layer_probe` fits each
layer's probe on the inner training part of every cross-validation fold and scores it on that
fold's inner validation split only (:func:`ichpro.train.split_folds`, the same splits that select
the models' checkpoints). :func:`probe_table` adds each layer's out-of-fold AUC, the probe
cross-validated on the test folds, to compare with the models (never used for a choice).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers import BertModel

from ichpro.metrics import classification_metrics, metrics_table


@torch.no_grad()
def pooled_layer_states(model: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        batch_size: int = 64) -> np.ndarray:
    """Mean-pooled token states after every layer: (layers + 1, N, H), index 0 = the embeddings."""
    model.eval()
    pooled = []
    for start in range(0, len(input_ids), batch_size):
        ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        weights = mask.unsqueeze(-1).float()
        pooled.append(torch.stack([(h * weights).sum(1) / weights.sum(1) for h in hidden]))
    return torch.cat(pooled, dim=1).numpy()


def probe() -> object:
    """The probe: standardised features, L2-regularised logistic regression."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))


def layer_probe(pooled: np.ndarray, labels: np.ndarray, folds: Sequence) -> pd.DataFrame:
    """Inner-validation AUC of a probe on each layer (rows: layer 0 = embeddings ... L).

    ``folds``: :class:`ichpro.train.Fold` objects; each layer's probe is fitted on every fold's
    ``train`` patients and scored on its ``val`` patients. Columns: ``inner_val_auc`` (mean over
    folds) and ``inner_val_auc_sd``.
    """
    rows = []
    for layer, features in enumerate(pooled):
        aucs = [classification_metrics(labels[f.val], probe().fit(features[f.train], labels[f.train])
                                       .predict_proba(features[f.val])[:, 1])["auc"] for f in folds]
        rows.append({"layer": layer, "inner_val_auc": float(np.mean(aucs)),
                     "inner_val_auc_sd": float(np.std(aucs))})
    return pd.DataFrame(rows).set_index("layer")


def out_of_fold_probe(features: np.ndarray, labels: np.ndarray, folds: Sequence) -> np.ndarray:
    """Out-of-fold P(bad) of a probe on one layer's features (N, H): each test fold predicted by a
    probe fitted on all its other patients (the fold's training and inner validation patients)."""
    p = np.full(len(labels), np.nan)
    for fold in folds:
        rest = np.setdiff1d(np.arange(len(labels)), fold.test)
        p[fold.test] = probe().fit(features[rest], labels[rest]).predict_proba(features[fold.test])[:, 1]
    return p


def probe_table(pooled: np.ndarray, labels: np.ndarray, folds: Sequence, n_boot: int = 1000,
                seed: int = 0) -> pd.DataFrame:
    """:func:`layer_probe` with each layer's out-of-fold AUC and its 95 % bootstrap CI
    (``out_of_fold_auc``, ``out_of_fold_auc_ci_low``, ``out_of_fold_auc_ci_high``)."""
    table = layer_probe(pooled, labels, folds)
    scores = pd.DataFrame([metrics_table(labels, out_of_fold_probe(features, labels, folds), n_boot, seed,
                                         metrics=("auc",)).iloc[0] for features in pooled], index=table.index)
    return table.assign(out_of_fold_auc=scores["value"], out_of_fold_auc_ci_low=scores["ci_low"],
                        out_of_fold_auc_ci_high=scores["ci_high"])
