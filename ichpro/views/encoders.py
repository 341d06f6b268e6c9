"""The two encoders as notebook 03 shows them: the energy of the vision feature map f_v on the CT, the
vision pretraining's history (:mod:`ichpro.pretrain`), and the encoders' sizes in every profile."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from ichpro.config import BRAIN_WINDOW, PROFILES, Profile
from ichpro.data import windowed
from ichpro.image_report import BLOOD_HU
from ichpro.models.comparators import count_parameters
from ichpro.models.encoders import TextEncoder, VisionEncoder
from ichpro.text import load_text_backbone
from ichpro.views.preprocessing import blood_slice

#: Bio_ClinicalBERT's vocabulary: the size of the BERT-base the sizes table counts for it
BIOCLINICALBERT_VOCAB = 28_996
#: the panels of a pretraining card's held-out history: (title, axis label, {column: line label})
PRETRAINING_PANELS = [
    ("loss: Dice loss + BCE + weighted volume MSE and findings", "loss", {"held_out_loss": "loss"}),
    ("haematoma segmentation", "Dice",
     {"held_out_dice": "soft Dice", "held_out_hard_dice": "Dice (map > 0.5)"}),
    ("haematoma volume", "mean absolute error (mL)", {"held_out_volume_mae_ml": "volume MAE"}),
]


def feature_energy(features: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The mean squared activation over the channels of feature maps (B, C, d, h, w), up-sampled
    trilinearly to ``size`` (D, H, W) and divided by each patient's maximum: (B, D, H, W) in [0, 1]."""
    energy = F.interpolate(features.pow(2).mean(1, keepdim=True), size=tuple(size), mode="trilinear")[:, 0]
    peak = energy.flatten(1).amax(1).clamp_min(torch.finfo(energy.dtype).tiny)
    return energy / peak[:, None, None, None]


def plot_feature_energy(ct: torch.Tensor, maps: dict[str, torch.Tensor], hu_window: tuple[float, float],
                        title: str = "") -> plt.Figure:
    """One patient's model input (D, H, W) beside its feature-energy maps (D, H, W, from
    :func:`feature_energy`) on the axial slice with the most blood-range voxels; the input is shown in the
    brain window (its image under ``hu_window``, the profile's window), every map on one [0, 1] scale."""
    k = blood_slice(ct, tuple(windowed(BLOOD_HU, hu_window)), axis=0)
    shown = windowed(BRAIN_WINDOW, hu_window)
    n = 1 + len(maps)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1.0, 3.6), layout="constrained")
    axes[0].imshow(np.asarray(ct[k]), cmap="gray", vmin=shown[0], vmax=shown[1])
    axes[0].set_title(f"{title}: input slice {k}", fontsize=9)
    for ax, (name, volume) in zip(axes[1:], maps.items()):
        image = ax.imshow(np.asarray(volume[k]), cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"mean squared activation of $f_v$\n({name})", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(image, ax=list(axes[1:]), shrink=0.85, label="share of the map's maximum")
    return fig


def plot_pretraining(card: dict) -> plt.Figure:
    """The held-out measures of a pretraining card (``card.json``) per epoch, with the kept epoch."""
    history = pd.DataFrame(card["history"]).set_index("epoch")
    fig, axes = plt.subplots(1, len(PRETRAINING_PANELS), figsize=(4 * len(PRETRAINING_PANELS), 3.2))
    for ax, (title, label, lines) in zip(axes, PRETRAINING_PANELS):
        shown = {column: name for column, name in lines.items() if column in history}
        for column, name in shown.items():
            ax.plot(history.index, history[column], marker="o", label=name)
        ax.axvline(card["best_epoch"], color="grey", ls="--", lw=1, label=f"kept: epoch {card['best_epoch']}")
        ax.set(xlabel="epoch", ylabel=label, xticks=history.index)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("vision pretraining, measured on held-out patients", fontsize=10)
    fig.tight_layout()
    return fig


def text_encoder(name: str, layers: int | None, reports: Sequence[str]) -> TextEncoder:
    """A profile's text encoder as ICHPro uses it (its first ``layers`` layers). ``bioclinicalbert`` is a
    BERT-base with Bio_ClinicalBERT's vocabulary and random weights (for its size: nothing is loaded)."""
    if name == "bioclinicalbert":
        model = BertModel(BertConfig(vocab_size=BIOCLINICALBERT_VOCAB), add_pooling_layer=False)
    else:
        model = load_text_backbone(name, reports=reports).model
    return TextEncoder(model, layers)


def encoder_sizes(reports: Sequence[str], profiles: dict[str, Profile] = PROFILES) -> pd.DataFrame:
    """Both encoders of each profile: vision depth, millions of parameters, f_v's channels C_v; text
    encoder, the layers ICHPro reads, hidden size H, millions of parameters (:func:`text_encoder`;
    ``reports`` give the tiny encoder its vocabulary)."""
    rows = []
    for name, profile in profiles.items():
        m = profile.model
        vision = VisionEncoder(m.vision_depth, m.vision_widths, m.vision_no_max_pool)
        text = text_encoder(m.text_encoder, m.text_layers, reports)
        rows.append({"profile": name, "vision": f"ResNet-{m.vision_depth}",
                     "vision M": count_parameters(vision) / 1e6, "C_v": vision.out_channels,
                     "text": m.text_encoder, "text layers": len(text.bert.encoder.layer),
                     "H": text.hidden_size, "text M": count_parameters(text) / 1e6})
    return pd.DataFrame(rows).set_index("profile")

