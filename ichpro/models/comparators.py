"""The neighbouring systems of ICHPro's comparison, as trainable models with one interface.

Every comparator maps a batch dict to a :class:`ComparatorOutput` (prognosis logits (B, 2), 0 good
and 1 bad, plus auxiliary predictions) and returns its own training loss with ``loss(out, batch)``.
Each reads only the batch keys it needs:

=====================  ==========================================================================
key                    content
=====================  ==========================================================================
``ct``                 (B, 1, D, H, W) windowed CT in [0, 1]
``labels``             (B,) outcome, 0 good / 1 bad
``clinical``           (B, F) standardized :data:`CLINICAL_FEATURES` (see :func:`clinical_tensor`)
``gcs``, ``age``       (B,) raw GCS (3-15) and age in years (multi-task targets)
``volume_ml``          (B,) true haematoma volume (quantification target)
``image_text_ids``     (B, L) VDAFM's template text (:func:`image_report`, :func:`template_tokens`)
``image_text_mask``    (B, L) its attention mask
``vision_features``    (B, C, d, h, w) frozen vision-encoder features (late fusion)
``text_states``        (B, L, H) frozen text-encoder states of the report, with ``attention_mask``
=====================  ==========================================================================

:data:`COMPARATORS` builds each one by name at a ``size``: "smoke" and "cpu" (the profiles' small
widths) or "paper" (the published sizes where known).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121
from scipy import ndimage
from torch import nn

from ichpro.clinical import clinical_fields, fit_standardizer, standardize
from ichpro.config import PAPER_WINDOW, PROFILES
from ichpro.data import brain_mask, load_ct
from ichpro.errors import IchproError
from ichpro.losses import ce_loss, info_nce
from ichpro.models.encoders import RESNET_LAYERS, VisionEncoder

#: Columns of the ``clinical`` batch tensor: age, sex (male = 1), GCS, onset-to-CT minutes,
#: treatment (surgical = 1), each standardized with the training set's mean and std.
CLINICAL_FEATURES = ("age", "male", "gcs", "onset_to_ct_min", "surgical")
SIZES = ("smoke", "cpu", "paper")


@dataclass
class ComparatorOutput:
    """Prognosis logits (B, 2) and named auxiliary predictions."""

    logits: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


def clinical_tensor(df: pd.DataFrame, stats: dict[str, tuple[float, float]] | None = None
                    ) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
    """(N, F) float tensor of :data:`CLINICAL_FEATURES` from a manifest, and the stats used.

    Fields come from the manifest's columns, or the report where a column is empty
    (:func:`ichpro.clinical.clinical_fields`). Pass ``stats=None`` for the training set (its mean
    and std are returned) and those stats for any other set; a missing value becomes the training
    mean, i.e. 0 after standardization.
    """
    fields = clinical_fields(df)[list(CLINICAL_FEATURES)]
    stats = fit_standardizer(fields) if stats is None else stats
    return torch.as_tensor(standardize(fields, stats), dtype=torch.float32), stats


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- shared blocks


class Comparator(nn.Module):
    """Base class: the loss is the prognosis cross-entropy; subclasses add auxiliary terms.

    ``INPUTS`` names the batch keys the comparator reads (besides ``labels``); ``image_text`` stands
    for ``image_text_ids`` and ``image_text_mask``.
    """

    INPUTS: tuple[str, ...] = ("ct",)

    def auxiliary_predictions(self, out: ComparatorOutput) -> dict[str, torch.Tensor]:
        """Per-patient auxiliary predictions worth saving next to P(bad): name -> (B,) tensor."""
        return {}

    def loss(self, out: ComparatorOutput, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        ce = ce_loss(out.logits, batch["labels"])
        return ce, {"ce": ce.item()}


class ConvStack(nn.Sequential):
    """Blocks of 3^n convolution, BatchNorm, ReLU and 2x max-pooling, one per width (n = ``dims``)."""

    def __init__(self, widths: tuple[int, ...], dims: int = 3):
        conv, norm, pool = ((nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d) if dims == 3
                            else (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d))
        layers = []
        for c_in, c_out in zip((1, *widths[:-1]), widths):
            layers += [conv(c_in, c_out, 3, padding=1, bias=False), norm(c_out), nn.ReLU(inplace=True),
                       pool(2, ceil_mode=True)]  # ceil: a 1-voxel axis (few slices) stays 1
        super().__init__(*layers)
        self.out_channels = widths[-1]


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis after the channel one: (B, C, ...) -> (B, C)."""
    return x.flatten(2).mean(dim=2)


def mlp(in_dim: int, hidden: int, out_dim: int = 2, dropout: float = 0.1) -> nn.Sequential:
    """Linear, ReLU, dropout, linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, out_dim))


def _bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def _symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    return (info_nce(a, b, temperature) + info_nce(b, a, temperature)) / 2


# --------------------------------------------------------------------------- multi-task DenseNet


def encode_ordinal_gcs(gcs: torch.Tensor) -> torch.Tensor:
    """Cumulative two-bit code [GCS <= 12, GCS <= 8] of the classes 13-15 / 9-12 / 3-8: (B, 2)."""
    return torch.stack([gcs <= 12, gcs <= 8], dim=-1).float()


def decode_ordinal_gcs(probs: torch.Tensor) -> torch.Tensor:
    """Class 0 (13-15), 1 (9-12) or 2 (3-8) from the bits' probabilities (B, 2).

    The class is the number of leading bits above 0.5, so an inconsistent code such as [0, 1]
    decodes to the class its first bit allows (0), never skipping a level.
    """
    return (probs > 0.5).long().cumprod(dim=-1).sum(dim=-1)


class MultiTaskDenseNet(Comparator):
    """Pérez del Barrio, Cobo et al. (2024): a 3D DenseNet-121 predicting prognosis, GCS and age.

    Original: MONAI ``DenseNet121`` on 1x40x301x301 CT (HU 15-100), heads for prognosis (BCE), GCS
    (binary <= 8, or three ordinal classes 13-15 / 9-12 / 3-8 coded by two cumulative bits) and age
    (binary >= 80); loss 0.4 prognosis + 0.3 GCS + 0.3 age. Kept: backbone, heads, codes, weights
    (renormalised over the tasks present, so ``gcs_task=None, age_task=False`` is the single-task
    baseline). Changed: prognosis uses two-logit cross-entropy like every comparator here; the
    block configuration and growth rate shrink for the CPU sizes, which also drop the stem's
    max-pooling so a 16-slice input survives the four down-samplings. Oversampling and early
    stopping on balanced accuracy belong to the training loop, not to the model.
    """

    TASK_WEIGHTS = {"ce": 0.4, "gcs": 0.3, "age": 0.3}
    INPUTS = ("ct", "gcs", "age")

    def __init__(self, gcs_task: str | None = None, age_task: bool = False, init_features: int = 64,
                 growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 stem_pool: bool = True):
        super().__init__()
        if gcs_task not in (None, "binary", "ordinal"):
            raise IchproError(f"gcs_task must be None, 'binary' or 'ordinal', not {gcs_task!r}")
        net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=init_features,
                          growth_rate=growth_rate, block_config=block_config)
        if not stem_pool:
            net.features.pool0 = nn.Identity()
        channels = net.class_layers.out.in_features
        self.backbone = nn.Sequential(net.features, *list(net.class_layers)[:-1])  # ReLU, pool, flatten
        self.gcs_task = gcs_task
        heads = {"prognosis": 2, "gcs": {None: 0, "binary": 1, "ordinal": 2}[gcs_task], "age": int(age_task)}
        self.heads = nn.ModuleDict({name: nn.Linear(channels, k) for name, k in heads.items() if k})

    def forward(self, batch: dict) -> ComparatorOutput:
        h = self.backbone(batch["ct"])
        out = {name: head(h) for name, head in self.heads.items()}
        return ComparatorOutput(out.pop("prognosis"), out)

    def auxiliary_predictions(self, out: ComparatorOutput) -> dict[str, torch.Tensor]:
        """``gcs_class`` (0: 13-15, 1: 9-12, 2: 3-8) or ``p_gcs_le8``, and ``p_age_ge80``."""
        preds = {}
        if "gcs" in out.aux:
            probs = out.aux["gcs"].float().sigmoid()
            if self.gcs_task == "ordinal":
                preds["gcs_class"] = decode_ordinal_gcs(probs)
            else:
                preds["p_gcs_le8"] = probs[:, 0]
        if "age" in out.aux:
            preds["p_age_ge80"] = out.aux["age"].float().sigmoid()[:, 0]
        return preds

    def gcs_targets(self, gcs: torch.Tensor) -> torch.Tensor:
        """Targets of the GCS head: (B, 1) [GCS <= 8] or (B, 2) ordinal bits."""
        return encode_ordinal_gcs(gcs) if self.gcs_task == "ordinal" else (gcs <= 8).float()[:, None]

    def loss(self, out: ComparatorOutput, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        terms = {"ce": ce_loss(out.logits, batch["labels"])}
        if "gcs" in out.aux:
            terms["gcs"] = _bce(out.aux["gcs"], self.gcs_targets(batch["gcs"]))
        if "age" in out.aux:
            terms["age"] = _bce(out.aux["age"][:, 0], batch["age"] >= 80)
        weights = {name: self.TASK_WEIGHTS[name] for name in terms}
        total = sum(weights[name] * value for name, value in terms.items()) / sum(weights.values())
        return total, {name: value.item() for name, value in terms.items()}


# --------------------------------------------------------------------------- plain image baselines


class Small3DCNN(Comparator):
    """Pérez del Barrio et al.'s baseline: four Conv3d blocks (16-32-64-128), global pool, linear."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.features = ConvStack(widths)
        self.head = nn.Linear(self.features.out_channels, 2)

    def forward(self, batch: dict) -> ComparatorOutput:
        return ComparatorOutput(self.head(global_pool(self.features(batch["ct"]))))


class SliceCNN2D(Comparator):
    """A 2D CNN on every axial slice; slice features pooled over the volume, then a linear head.

    ``pooling="attention"``: gated attention weights over slices (returned as ``aux["slice_weights"]``,
    (B, D)); ``"meanmax"``: mean and max of the slice features concatenated.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), pooling: str = "attention"):
        super().__init__()
        if pooling not in ("attention", "meanmax"):
            raise IchproError(f"pooling must be 'attention' or 'meanmax', not {pooling!r}")
        self.features = ConvStack(widths, dims=2)
        c = self.features.out_channels
        self.attention = (nn.Sequential(nn.Linear(c, c // 2), nn.Tanh(), nn.Linear(c // 2, 1))
                          if pooling == "attention" else None)
        self.head = nn.Linear(c if self.attention is not None else 2 * c, 2)

    def forward(self, batch: dict) -> ComparatorOutput:
        ct = batch["ct"]
        b, _, d, h, w = ct.shape
        slices = global_pool(self.features(ct.transpose(1, 2).reshape(b * d, 1, h, w))).reshape(b, d, -1)
        if self.attention is None:
            return ComparatorOutput(self.head(torch.cat([slices.mean(1), slices.amax(1)], dim=1)))
        weights = self.attention(slices).squeeze(-1).softmax(dim=1)
        pooled = (weights.unsqueeze(-1) * slices).sum(1)
        return ComparatorOutput(self.head(pooled), {"slice_weights": weights})


class ImageGCSLateFusion(Comparator):
    """GCS-ICHNet's idea: 3D CNN image features concatenated with the standardized GCS, then an MLP.

    The GCS is the ``gcs`` column of the ``clinical`` tensor (standardized with training stats).
    """

    INPUTS = ("ct", "clinical")

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), hidden: int = 64):
        super().__init__()
        self.features = ConvStack(widths)
        self.head = mlp(self.features.out_channels + 1, hidden)

    def forward(self, batch: dict) -> ComparatorOutput:
        image = global_pool(self.features(batch["ct"]))
        gcs = batch["clinical"][:, CLINICAL_FEATURES.index("gcs"), None].to(image.dtype)
        return ComparatorOutput(self.head(torch.cat([image, gcs], dim=1)))


class ConcatLateFusion(Comparator):
    """Late fusion of frozen encoders: pooled ``vision_features`` ++ masked-mean ``text_states`` -> MLP."""

    INPUTS = ("vision_features", "text_states")

    def __init__(self, vision_channels: int, text_dim: int, hidden: int = 128):
        super().__init__()
        self.norm = nn.LayerNorm(vision_channels + text_dim)
        self.head = mlp(vision_channels + text_dim, hidden)

    def forward(self, batch: dict) -> ComparatorOutput:
        mask = batch["attention_mask"].unsqueeze(-1).to(batch["text_states"].dtype)
        text = (batch["text_states"] * mask).sum(1) / mask.sum(1).clamp_min(1)
        joint = torch.cat([global_pool(batch["vision_features"]), text], dim=1)
        return ComparatorOutput(self.head(self.norm(joint)))


# --------------------------------------------------------------------------- joint quantification


class JointQuantification(Comparator):
    """Gong et al. (2023): a shared ResNet with a haematoma-volume regression head and a prognosis head.

    Original: a weight-shared upstream feature extractor trained on both tasks, two downstream heads,
    Grad-CAM maps; multi-task beats single-task. Kept: shared 3D ResNet (:class:`VisionEncoder`),
    both heads, the multi- vs single-task comparison (``volume_weight=0`` builds no volume head).
    Our choices (not published): the head regresses log1p(volume mL) with a smooth-L1 (or MSE) loss
    weighted by ``volume_weight``. ``aux["volume_ml"]`` is the predicted volume in mL.
    """

    INPUTS = ("ct", "volume_ml")

    def __init__(self, depth: int = 50, widths: tuple[int, int, int, int] = (64, 128, 256, 512),
                 no_max_pool: bool = False, volume_weight: float = 1.0, volume_loss: str = "smooth_l1"):
        super().__init__()
        if volume_loss not in ("smooth_l1", "mse"):
            raise IchproError(f"volume_loss must be 'smooth_l1' or 'mse', not {volume_loss!r}")
        self.encoder = VisionEncoder(depth, widths, no_max_pool)
        c = self.encoder.out_channels
        self.prognosis = nn.Linear(c, 2)
        self.volume = nn.Linear(c, 1) if volume_weight > 0 else None
        self.volume_weight = volume_weight
        self.volume_loss = F.smooth_l1_loss if volume_loss == "smooth_l1" else F.mse_loss

    def forward(self, batch: dict) -> ComparatorOutput:
        return self.from_features(self.encoder(batch["ct"]))

    def from_features(self, maps: torch.Tensor) -> ComparatorOutput:
        """The heads on the shared encoder's feature maps (B, C, d, h, w) (Grad-CAM hooks these)."""
        h = global_pool(maps)
        out = ComparatorOutput(self.prognosis(h))
        if self.volume is not None:
            log_volume = self.volume(h)[:, 0]
            out.aux = {"log1p_volume": log_volume, "volume_ml": torch.expm1(log_volume).clamp_min(0)}
        return out

    def auxiliary_predictions(self, out: ComparatorOutput) -> dict[str, torch.Tensor]:
        """``volume_ml_pred``: the predicted haematoma volume (mL), when there is a volume head."""
        return {"volume_ml_pred": out.aux["volume_ml"].float()} if "volume_ml" in out.aux else {}

    def loss(self, out: ComparatorOutput, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        ce, terms = super().loss(out, batch)
        if self.volume is None:
            return ce, terms
        volume = self.volume_loss(out.aux["log1p_volume"].float(), torch.log1p(batch["volume_ml"].float()))
        return ce + self.volume_weight * volume, {**terms, "volume": volume.item()}


# --------------------------------------------------------------------------- VDAFM


#: Blood on a non-contrast CT (HU); the paper's window [15, 400] keeps it well inside [0, 1].
BLOOD_HU = (50.0, 100.0)
_REPORT = ("Hyperdense haematoma of {volume} ml in the {side} hemisphere, {level} third. "
           "Blood {reach} the midline.")
_NO_BLOOD = "No hyperdense haematoma."
_CHOICES = {"side": ("right", "left"), "level": ("inferior", "middle", "superior"),
            "reach": ("reaches", "does not reach"), "volume": ("less than 1",)}
_TOKEN = re.compile(r"[a-z]+|\d|[^\sa-z\d]")
_WRITTEN = " ".join([re.sub(r"\{\w+\}", " ", _REPORT), _NO_BLOOD, "0123456789", *sum(_CHOICES.values(), ())])
#: The template's whole vocabulary: padding, unknown, digits, and every word and mark it writes.
TEMPLATE_VOCAB = ("[pad]", "[unk]", *sorted(set(_TOKEN.findall(_WRITTEN.lower()))))
TEMPLATE_MAX_TOKENS = 48


def measure_ct(ct: torch.Tensor, voxel_ml: float, window: tuple[float, float] = PAPER_WINDOW,
               blood_hu: tuple[float, float] = BLOOD_HU, midline_band: float = 0.1) -> dict:
    """Haematoma measurements of a windowed, skull-stripped CT (1, D, H, W) on the model's axes.

    Voxels whose HU (undoing ``window``) lies in ``blood_hu`` are blood; the largest connected
    blob is the haematoma. Returns its ``volume_ml`` (voxels x ``voxel_ml``), the ``side`` of its
    centroid (W runs from the patient's right to left), the ``level`` (third of the slices,
    D inferior -> superior) and ``near_midline`` (a blood voxel within ``midline_band`` of the
    width from the central column). Without skull stripping, partial-volume bone edges pass as blood.
    """
    lo, hi = window
    hu = lo + ct[0].detach().float().cpu().numpy() * (hi - lo)
    labels, n = ndimage.label((hu >= blood_hu[0]) & (hu <= blood_hu[1]))
    if n == 0:
        return {"volume_ml": 0.0, "side": None, "level": None, "near_midline": False}
    sizes = np.bincount(labels.ravel())[1:]
    blob = labels == 1 + int(np.argmax(sizes))
    z, _, x = (idx.astype(float) for idx in np.nonzero(blob))
    depth, width = hu.shape[0], hu.shape[2]
    centre = (width - 1) / 2
    return {
        "volume_ml": float(blob.sum() * voxel_ml),
        "side": "right" if x.mean() < centre else "left",
        "level": _CHOICES["level"][min(int(3 * (z.mean() + 0.5) / depth), 2)],
        "near_midline": bool((np.abs(x - centre) <= midline_band * width).any()),
    }


def measure_ct_file(path: str) -> dict:
    """:func:`measure_ct` of a CT file at its own resolution: skull-stripped, in the paper's window,
    voxels in (slice, row, column) order with columns running from the patient's right to left
    (RAS x, the patient's left to right, reversed)."""
    hu, affine = load_ct(path)
    lo, hi = PAPER_WINDOW
    windowed = np.where(brain_mask(hu), np.clip((hu - lo) / (hi - lo), 0.0, 1.0), 0.0)
    ct = torch.from_numpy(np.ascontiguousarray(windowed[::-1].transpose(2, 1, 0)))[None]
    return measure_ct(ct, abs(np.linalg.det(affine[:3, :3])) / 1000, (lo, hi))


def image_report(measurements: dict) -> str:
    """Deterministic semi-structured text from :func:`measure_ct`'s measurements.

    VDAFM has a language model write this text from the image; no language model is available
    offline, so a fixed template writes it from the image-derived measurements instead.
    """
    volume = measurements["volume_ml"]
    if volume <= 0:
        return _NO_BLOOD
    reach = _CHOICES["reach"][0 if measurements["near_midline"] else 1]
    return _REPORT.format(volume=_CHOICES["volume"][0] if volume < 1 else f"{volume:.0f}",
                          side=measurements["side"], level=measurements["level"], reach=reach)


def template_tokens(texts: list[str], max_tokens: int = TEMPLATE_MAX_TOKENS
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) in :data:`TEMPLATE_VOCAB` (one token per word, mark or digit) and the mask."""
    index = {token: i for i, token in enumerate(TEMPLATE_VOCAB)}
    rows = [[index.get(t, 1) for t in _TOKEN.findall(text.lower())][:max_tokens] for text in texts]
    length = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, (ids != 0).long()


class TemplateTextEncoder(nn.Module):
    """Token and position embeddings and one transformer layer over the template text: (B, L, dim)."""

    def __init__(self, dim: int, heads: int, max_tokens: int = TEMPLATE_MAX_TOKENS):
        super().__init__()
        self.tokens = nn.Embedding(len(TEMPLATE_VOCAB), dim, padding_idx=0)
        self.positions = nn.Embedding(max_tokens, dim)
        self.layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return self.layer(x, src_key_padding_mask=mask == 0)


class FeatureTokens(nn.Module):
    """One token per clinical feature: value x w_f + b_f, (B, F) -> (B, F, dim)."""

    def __init__(self, n_features: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_features, dim) * dim**-0.5)
        self.bias = nn.Parameter(torch.zeros(n_features, dim))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return values.unsqueeze(-1).to(self.weight.dtype) * self.weight + self.bias


class VisionQuery(nn.Module):
    """Attention from the pooled vision vector (one query) over a modality's tokens: (B, dim), (B, L)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, vision: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        read, weights = self.attention(vision.unsqueeze(1), tokens, tokens, key_padding_mask=padding)
        return self.norm(read[:, 0]), weights[:, 0]


class VDAFM(Comparator):
    """Chen et al.: tri-modal fusion (image, clinical table, image-derived text) guided by vision.

    Original (ischaemic stroke, MRI): an LLM writes semi-structured diagnostic text from the image;
    the Vision-Conditioned Dual Alignment Fusion Module uses visual features as a conditional prior
    that attends over the text, and a dual (image-text, image-table) contrastive loss aligns the
    modalities. Kept: the three modalities, the vision vector as the query of attention over the
    text tokens and over the table's feature tokens, fusion of the three vectors, and
    loss = CE + ``align_weight`` x (InfoNCE(image, text) + InfoNCE(image, table)), each symmetric.
    Changed: the text comes from a template (:func:`image_report`), not an LLM, and is encoded by
    a small trainable encoder (:class:`TemplateTextEncoder`), or, with ``text_dim``, projected from
    frozen text-encoder states of the template given as ``image_text_states`` (B, L, text_dim).
    """

    INPUTS = ("ct", "clinical", "image_text")

    def __init__(self, depth: int = 50, widths: tuple[int, int, int, int] = (64, 128, 256, 512),
                 no_max_pool: bool = False, dim: int = 256, heads: int = 8, text_dim: int | None = None,
                 align_weight: float = 0.1, temperature: float = 0.07):
        super().__init__()
        self.encoder = VisionEncoder(depth, widths, no_max_pool)
        self.vision = nn.Linear(self.encoder.out_channels, dim)
        self.text = TemplateTextEncoder(dim, heads) if text_dim is None else nn.Linear(text_dim, dim)
        self.table = FeatureTokens(len(CLINICAL_FEATURES), dim)
        self.text_query, self.table_query = VisionQuery(dim, heads), VisionQuery(dim, heads)
        self.head = mlp(3 * dim, dim)
        self.align_weight, self.temperature = align_weight, temperature

    def forward(self, batch: dict) -> ComparatorOutput:
        v = self.vision(global_pool(self.encoder(batch["ct"])))
        mask = batch["image_text_mask"]
        tokens = (self.text(batch["image_text_ids"], mask) if isinstance(self.text, TemplateTextEncoder)
                  else self.text(batch["image_text_states"]))
        t, text_weights = self.text_query(v, tokens, mask == 0)
        c, table_weights = self.table_query(v, self.table(batch["clinical"]))
        return ComparatorOutput(self.head(torch.cat([v, t, c], dim=1)), {
            "vision_embedding": v, "text_embedding": t, "table_embedding": c,
            "text_attention": text_weights, "table_attention": table_weights})

    def loss(self, out: ComparatorOutput, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        ce, terms = super().loss(out, batch)
        v = out.aux["vision_embedding"]
        text = _symmetric_info_nce(v, out.aux["text_embedding"], self.temperature)
        table = _symmetric_info_nce(v, out.aux["table_embedding"], self.temperature)
        total = ce + self.align_weight * (text + table)
        return total, {**terms, "align_text": text.item(), "align_table": table.item()}


# --------------------------------------------------------------------------- registry


#: Widths of the small CNNs (Small3DCNN, SliceCNN2D, ImageGCSLateFusion) per size.
CNN_WIDTHS = {"smoke": (8, 16, 32, 64), "cpu": (16, 32, 64, 128), "paper": (16, 32, 64, 128)}
#: DenseNet per size; "paper" is DenseNet-121 as published. The small sizes train on 16x32x32
#: CTs (``ModelConfig.comparator_input``), too few slices for the stem's max-pooling on top of the
#: four down-samplings.
DENSENET_SIZES = {
    "smoke": dict(init_features=16, growth_rate=8, block_config=(2, 2, 2, 2), stem_pool=False),
    "cpu": dict(init_features=16, growth_rate=8, block_config=(2, 4, 8, 4), stem_pool=False),
    "paper": dict(init_features=64, growth_rate=32, block_config=(6, 12, 24, 16), stem_pool=True),
}
#: Shared 3D ResNet of JointQuantification and VDAFM per size; "paper" is ICHPro's ResNet-50.
RESNET_SIZES = {
    "smoke": dict(depth=10, widths=(8, 16, 32, 64), no_max_pool=True),
    "cpu": dict(depth=18, widths=(16, 32, 64, 128), no_max_pool=False),
    "paper": dict(depth=50, widths=(64, 128, 256, 512), no_max_pool=False),
}
#: Hidden size of each profile's text encoder (tiny BERT, MiniLM, BioClinicalBERT).
TEXT_HIDDEN = {"smoke": 64, "cpu": 384, "paper": 768}


def _checked(size: str) -> str:
    if size not in SIZES:
        raise IchproError(f"unknown comparator size {size!r}; choose one of {', '.join(SIZES)}")
    return size


def _densenet(size: str, gcs_task: str | None = None, age_task: bool = False) -> MultiTaskDenseNet:
    return MultiTaskDenseNet(gcs_task, age_task, **DENSENET_SIZES[_checked(size)])


def _quantification(size: str, volume_weight: float = 1.0) -> JointQuantification:
    return JointQuantification(**RESNET_SIZES[_checked(size)], volume_weight=volume_weight)


def _vdafm(size: str) -> VDAFM:
    m = PROFILES[_checked(size)].model
    return VDAFM(**RESNET_SIZES[size], dim=m.dim, heads=m.heads)


def _concat_late(size: str) -> ConcatLateFusion:
    """Sized for the profile's frozen encoders, which produce ``vision_features`` and ``text_states``."""
    m = PROFILES[_checked(size)].model
    channels = m.vision_widths[3] * (4 if RESNET_LAYERS[m.vision_depth][0] == "bottleneck" else 1)
    return ConcatLateFusion(channels, TEXT_HIDDEN[size])


def _cnn(cls: type[Comparator], size: str) -> Comparator:
    return cls(CNN_WIDTHS[_checked(size)])


#: name -> constructor taking ``size`` ("smoke" | "cpu" | "paper").
COMPARATORS: dict[str, Callable[[str], Comparator]] = {
    "densenet": _densenet,
    "densenet+bin_age": partial(_densenet, age_task=True),
    "densenet+bin_gcs": partial(_densenet, gcs_task="binary"),
    "densenet+bin_gcs+bin_age": partial(_densenet, gcs_task="binary", age_task=True),
    "densenet+ord_gcs": partial(_densenet, gcs_task="ordinal"),
    "densenet+ord_gcs+bin_age": partial(_densenet, gcs_task="ordinal", age_task=True),
    "small3dcnn": partial(_cnn, Small3DCNN),
    "quantification": _quantification,
    "quantification_single": partial(_quantification, volume_weight=0.0),
    "vdafm": _vdafm,
    "slice2d": partial(_cnn, SliceCNN2D),
    "image+gcs": partial(_cnn, ImageGCSLateFusion),
    "concat_late": _concat_late,
}


def build_comparator(name: str, size: str) -> Comparator:
    """The comparator ``name`` of :data:`COMPARATORS` at ``size`` (clear error for an unknown name)."""
    if name not in COMPARATORS:
        raise IchproError(f"unknown comparator {name!r}; choose one of {', '.join(COMPARATORS)}")
    return COMPARATORS[name](size)
