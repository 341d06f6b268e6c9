"""Linear probes on a frozen text encoder: how much of the outcome each layer's token states expose.

A probe is a logistic regression on a report's mean-pooled token states (padding excluded). It
chooses ``ModelConfig.text_layers`` without touching a test fold: :func:`layer_probe` fits each
layer's probe on the inner training part of every cross-validation fold and scores it on that
fold's inner validation split only (:func:`ichpro.train.split_folds`, the same splits that select
the models' checkpoints). :func:`probe_table` adds each layer's out-of-fold AUC, the probe
cross-validated on the test folds, to compare with the models (never used for a choice).

:func:`late_fusion_probe` measures what the frozen report states can add to an image logit (e.g. the
vision-only model's): a logistic regression on both, with the report read for the outcome
(:class:`OutcomeReader`), for its numbers (:class:`NumberReader`: age and GCS), or replaced by the
true numbers (:class:`GivenNumbers`), and how far such a fusion moves P(bad) when a report is edited.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers import BertModel

from ichpro.errors import IchproError
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


# --------------------------------------------------------------------------------------------
# Late-fusion probes: what a report's frozen states add to an image logit


class OutcomeReader:
    """Reads the report as the outcome asks: the probe's logit (1 column), fitted on the labels."""

    def fit(self, features: np.ndarray, labels: np.ndarray, numbers: np.ndarray | None) -> OutcomeReader:
        self.model = probe().fit(features, labels)
        return self

    def read(self, features: np.ndarray) -> np.ndarray:
        return self.model.decision_function(features)[:, None]


class NumberReader:
    """Reads the report's numbers: ridge regressions from the states to ``numbers`` (e.g. age and GCS),
    fitted on the patients' recorded values, not on the outcome."""

    def fit(self, features: np.ndarray, labels: np.ndarray, numbers: np.ndarray | None) -> NumberReader:
        if numbers is None:
            raise IchproError("NumberReader needs the recorded numbers to fit on (numbers=...)")
        ridge = RidgeCV(alphas=np.logspace(-1, 4, 11))
        self.model = make_pipeline(StandardScaler(), ridge).fit(features, numbers)
        return self

    def read(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict(features).reshape(len(features), -1)


class GivenNumbers:
    """No reading: the features are the numbers themselves (the clean-number ceiling)."""

    def fit(self, features: np.ndarray, labels: np.ndarray, numbers: np.ndarray | None) -> GivenNumbers:
        return self

    def read(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=float)


def late_fusion_probe(reader_factory, text: np.ndarray, image_logit: np.ndarray, labels: np.ndarray,
                      folds: Sequence, *, numbers: np.ndarray | None = None,
                      text_before: np.ndarray | None = None, text_after: np.ndarray | None = None,
                      inner_folds: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """Out-of-fold P(bad) of a logistic regression on what a reader takes from the report, beside an
    image logit (N,): the most a linear late fusion of the two gets from these report features.

    For each test fold the reader (``reader_factory()``: :class:`OutcomeReader`, :class:`NumberReader`
    or :class:`GivenNumbers`) is cross-fitted on the other patients (``inner_folds`` splits), so the
    fusion weights are learnt on readings of reports the reader did not fit; the test patients are
    read by a reader fitted on all the other patients. With ``text_before`` / ``text_after`` (the
    features of each patient's report before and after an edit) it also returns ``p_before`` and
    ``p_after`` from the patient's own out-of-fold probe. Returns ``p_bad`` (and those two).
    """
    image = np.asarray(image_logit, dtype=float)[:, None]
    fit = lambda rows: reader_factory().fit(text[rows], labels[rows],  # noqa: E731
                                            None if numbers is None else numbers[rows])
    inputs = {"p_bad": text, "p_before": text_before, "p_after": text_after}
    out = {key: np.full(len(labels), np.nan) for key, features in inputs.items() if features is not None}
    for fold in folds:
        rest = np.setdiff1d(np.arange(len(labels)), fold.test)
        splits = StratifiedKFold(inner_folds, shuffle=True, random_state=seed).split(rest, labels[rest])
        readings = [(inner, fit(rest[train]).read(text[rest[inner]])) for train, inner in splits]
        cross_read = np.empty((len(rest), readings[0][1].shape[1]))
        for inner, part in readings:
            cross_read[inner] = part
        fusion = LogisticRegression().fit(np.hstack([cross_read, image[rest]]), labels[rest])
        reader = fit(rest)
        for key in out:
            read = reader.read(inputs[key][fold.test])
            out[key][fold.test] = fusion.predict_proba(np.hstack([read, image[fold.test]]))[:, 1]
    return out
