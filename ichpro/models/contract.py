"""The one contract between every trainable model and the engine (:mod:`ichpro.train`), prediction
and explanation: in the spirit of nanoGPT's ``forward(idx, targets) -> logits, loss``.

A :class:`PrognosisModel` takes a batch (a dict of tensors), reads the keys it declares in
``inputs``, and returns a :class:`ModelOutput`: the good/bad logits, and, when the batch holds
``labels`` (and the ``targets`` the objective reads), the loss with its named terms. The model owns
its objective, learnable loss weights included, so wrapping the model in DistributedDataParallel
synchronises every learned weight. The scikit-learn clinical baselines are a separate kind of row
(:mod:`ichpro.clinical`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ichpro.models.fusion import Grid


@dataclass
class ModelOutput:
    """What one forward pass of any model returns; fields a model does not produce stay empty."""

    logits: torch.Tensor  # (B, 2): 0 good, 1 bad outcome
    loss: torch.Tensor | None = None  # the objective, when the batch holds labels
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # its named (unweighted) terms, detached
    auxiliary: dict[str, torch.Tensor] = field(default_factory=dict)  # auxiliary task -> (B,) prediction
    attentions: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, heads, queries, keys)
    attention_grids: dict[str, Grid] = field(default_factory=dict)  # name -> grid of the keys
    fused: torch.Tensor | None = None  # ICHPro's f_tbv, the text-based vision representation
    vision_embedding: torch.Tensor | None = None  # (B, C) pooled, for the alignment losses
    text_embedding: torch.Tensor | None = None  # (B, C)
    mlm_logits: torch.Tensor | None = None  # (N, vocabulary) at the N masked positions
    mlm_labels: torch.Tensor | None = None  # (N,) their targets: the decoded vocabulary's indices
    vision_logits: torch.Tensor | None = None  # unimodal heads (gradient-blending loss)
    text_logits: torch.Tensor | None = None
    numbers: torch.Tensor | None = None  # (B, 2) standardised age and GCS read from ``fused``
    token_attention: torch.Tensor | None = None  # TRT's (B, heads, |G|, L): which tokens each cell reads

    def attention_volume(self, name: str, size: Grid) -> torch.Tensor:
        """Attention received by each grid position of map ``name``, up-sampled to ``size``.

        Averaged over heads and queries and normalised to sum to 1 over the grid; returns
        (B, *size). The fusion grid spans the whole model input, so ``size`` = the input's
        (D, H, W) puts the map in the preprocessed CT's voxel space. For a joint (Self) map only
        the vision half of the keys is kept; for CMAF's vision-to-text map the keys are the
        text pseudo-volume's positions, which TRT aligns with the same grid. A map without mass
        stays all zero.
        """
        grid = self.attention_grids[name]
        received = self.attentions[name].float().mean(dim=(1, 2))[:, : math.prod(grid)]
        received = received / received.sum(dim=1, keepdim=True).clamp_min(torch.finfo(received.dtype).tiny)
        volume = F.interpolate(received.reshape(-1, 1, *grid), size=size, mode="trilinear",
                               align_corners=False)
        return volume[:, 0]


class PrognosisModel(nn.Module):
    """Base class of every trainable model: what it reads, predicts and explains with.

    * ``inputs``: the batch keys ``forward`` reads (``labels`` aside); ``ct`` is the preprocessed CT
      resized to ``ct_size`` when that is set. :class:`ichpro.batches.BatchSource` lists the keys.
    * ``targets``: further keys only the objective reads (auxiliary-task targets, ICHPro's MLM
      labels); prediction does without them, and without them or ``labels`` there is no loss.
    * ``training_draws``: keys of per-patient uniform draws in [0, 1) that a training batch holds for
      the model's random choices (ICHPro's vision dropout), drawn from the fold's own generator, so
      that a fold trains alike alone or batched beside others (:mod:`ichpro.ensemble`).
    * ``auxiliary_tasks``: the names of ``ModelOutput.auxiliary``, saved beside P(bad).
    * ``gradcam_layer``: the submodule whose 3D feature maps (B, C, d, h, w) Grad-CAM weighs
      (None: the model has none).
    * ``frozen_prefixes``: state-dict prefixes of frozen encoders, rebuilt from config and seed
      rather than saved (:mod:`ichpro.checkpoints`).
    """

    inputs: tuple[str, ...] = ("ct",)
    targets: tuple[str, ...] = ()
    training_draws: tuple[str, ...] = ()
    auxiliary_tasks: tuple[str, ...] = ()
    gradcam_layer: str | None = None
    ct_size: Grid | None = None
    frozen_prefixes: tuple[str, ...] = ()

    def is_labelled(self, batch: Mapping[str, torch.Tensor]) -> bool:
        """Whether the batch holds what the objective reads: ``labels`` and every one of ``targets``."""
        return "labels" in batch and all(key in batch for key in self.targets)

    def fit_training_patients(self, patients: Mapping[str, torch.Tensor]) -> None:
        """Fit what the model takes from its fold's training patients before training (default:
        nothing). ``patients`` holds their ``input_ids``, ``attention_mask`` and, when the model
        reads it, ``clinical``; and ``cohort_words``, the token ids of the whole cohort's reports."""

    def encodes_each_step(self) -> bool:
        """Whether a training step runs an encoder (a CNN on the CT, a trainable text encoder). Such a
        model trains one fold at a time: batched, its convolutions run slower (``bench/batched_fit.py``)."""
        return "ct" in self.inputs

    def forward(self, batch: Mapping[str, torch.Tensor]) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError
