"""The neighbouring systems of ICHPro's comparison, as trainable models with one interface.

Every comparator is a :class:`~ichpro.models.contract.PrognosisModel`: it maps a batch dict to a
:class:`~ichpro.models.contract.ModelOutput` (prognosis logits (B, 2), 0 good and 1 bad, its own
training loss when the batch holds labels, and auxiliary predictions). Inside, ``head_outputs``
computes the raw :class:`HeadOutputs` that ``loss`` and ``auxiliary_predictions`` read. Each
reads only the batch keys it declares (``inputs``, and ``targets`` for its loss):

=====================  ==========================================================================
key                    content
=====================  ==========================================================================
``ct``                 (B, 1, D, H, W) windowed CT in [0, 1]
``labels``             (B,) outcome, 0 good / 1 bad
``clinical``           (B, F) raw :data:`CLINICAL_FEATURES`, NaN where unknown; the model standardizes
                       them with its training patients' statistics (:class:`ClinicalStandardizer`)
``gcs``, ``age``       (B,) raw GCS (3-15) and age in years (multi-task targets)
``volume_ml``          (B,) true haematoma volume (quantification target)
``image_text_ids``     (B, L) VDAFM's template text (:mod:`ichpro.image_report`)
``image_text_mask``    (B, L) its attention mask
``vision_features``    (B, C, d, h, w) frozen vision-encoder features (late fusion)
``text_states``        (B, L, H) frozen text-encoder states of the report, with ``attention_mask``
=====================  ==========================================================================

:data:`COMPARATORS` builds each one by name at the ``ModelConfig.comparator_size`` of the profile:
"smoke" and "cpu" (small widths) or "paper" (the published sizes where known).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import pandas as pd
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121
from torch import nn

from ichpro.clinical import clinical_fields, fit_standardizer
from ichpro.config import ModelConfig
from ichpro.errors import IchproError
from ichpro.image_report import TEMPLATE_MAX_TOKENS, TEMPLATE_VOCAB
from ichpro.losses import ce_loss, symmetric_info_nce
from ichpro.models.contract import ModelOutput, PrognosisModel
from ichpro.models.encoders import RESNET_LAYERS, VisionEncoder, masked_mean

#: Columns of the ``clinical`` batch tensor: age, sex (male = 1), GCS, onset-to-CT minutes,
#: treatment (surgical = 1), each standardized with the training set's mean and std.
CLINICAL_FEATURES = ("age", "male", "gcs", "onset_to_ct_min", "surgical")


@dataclass
class HeadOutputs:
    """A comparator's raw outputs: prognosis logits (B, 2), its other heads' outputs by name, and
    its attention maps as ``ModelOutput`` holds them (name -> (B, heads, queries, keys), and grids)."""

    logits: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    attentions: dict[str, torch.Tensor] = field(default_factory=dict)
    attention_grids: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def clinical_tensor(df: pd.DataFrame) -> torch.Tensor:
    """(N, F) float64 tensor of raw :data:`CLINICAL_FEATURES` of a manifest, NaN where unknown.

    Fields come from the manifest's columns, or the report where a column is empty
    (:func:`ichpro.clinical.clinical_fields`).
    """
    return torch.as_tensor(clinical_fields(df)[list(CLINICAL_FEATURES)].to_numpy(float), dtype=torch.float64)


class ClinicalStandardizer(nn.Module):
    """(value - mean) / std of each clinical feature with its training patients' statistics
    (:func:`ichpro.clinical.fit_standardizer`, kept as buffers so they are saved with the weights);
    a missing value becomes the training mean, i.e. 0."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(len(CLINICAL_FEATURES), dtype=torch.float64))
        self.register_buffer("std", torch.ones(len(CLINICAL_FEATURES), dtype=torch.float64))

    def fit(self, clinical: torch.Tensor) -> None:
        """Take the mean and std from the raw (N, F) ``clinical`` tensor of the training patients."""
        stats = fit_standardizer(pd.DataFrame(clinical.cpu().numpy(), columns=list(CLINICAL_FEATURES)))
        self.mean.copy_(torch.tensor([m for m, _ in stats.values()], dtype=torch.float64))
        self.std.copy_(torch.tensor([s for _, s in stats.values()], dtype=torch.float64))

    def forward(self, clinical: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num((clinical.double() - self.mean) / self.std, nan=0.0).float()


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- shared blocks


class Comparator(PrognosisModel):
    """Base class: the loss is the prognosis cross-entropy; subclasses add auxiliary terms.

    A subclass implements :meth:`head_outputs`; ``forward`` adds the loss (with labels) and the
    auxiliary predictions. One that reads ``clinical`` standardizes it with ``self.clinical``, a
    :class:`ClinicalStandardizer` fitted on its fold's training patients.
    """

    def head_outputs(self, batch: dict) -> HeadOutputs:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: dict) -> ModelOutput:
        heads = self.head_outputs(batch)
        out = ModelOutput(heads.logits, auxiliary=self.auxiliary_predictions(heads),
                          attentions=heads.attentions, attention_grids=heads.attention_grids)
        if self.is_labelled(batch):
            out.loss, out.terms = self.loss(heads, batch)
        return out

    def fit_training_patients(self, patients: dict) -> None:
        """Fit the clinical standardization, for a comparator that reads ``clinical``."""
        if "clinical" in self.inputs:
            self.clinical.fit(patients["clinical"])

    def auxiliary_predictions(self, out: HeadOutputs) -> dict[str, torch.Tensor]:
        """Per-patient auxiliary predictions worth saving next to P(bad): name -> (B,) tensor."""
        return {}

    def loss(self, out: HeadOutputs, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = ce_loss(out.logits, batch["labels"])
        return ce, {"ce": ce.detach()}


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
    gradcam_layer = "backbone.0"

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
        self.targets = ("gcs",) * bool(gcs_task) + ("age",) * age_task
        self.auxiliary_tasks = ({None: (), "binary": ("p_gcs_le8",), "ordinal": ("gcs_class",)}[gcs_task]
                                + ("p_age_ge80",) * age_task)

    def head_outputs(self, batch: dict) -> HeadOutputs:
        h = self.backbone(batch["ct"])
        out = {name: head(h) for name, head in self.heads.items()}
        return HeadOutputs(out.pop("prognosis"), out)

    def auxiliary_predictions(self, out: HeadOutputs) -> dict[str, torch.Tensor]:
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

    def loss(self, out: HeadOutputs, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = {"ce": ce_loss(out.logits, batch["labels"])}
        if "gcs" in out.aux:
            terms["gcs"] = _bce(out.aux["gcs"], self.gcs_targets(batch["gcs"]))
        if "age" in out.aux:
            terms["age"] = _bce(out.aux["age"][:, 0], batch["age"] >= 80)
        weights = {name: self.TASK_WEIGHTS[name] for name in terms}
        total = sum(weights[name] * value for name, value in terms.items()) / sum(weights.values())
        return total, {name: value.detach() for name, value in terms.items()}


# --------------------------------------------------------------------------- plain image baselines


class Small3DCNN(Comparator):
    """Pérez del Barrio et al.'s baseline: four Conv3d blocks (16-32-64-128), global pool, linear."""

    gradcam_layer = "features"

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.features = ConvStack(widths)
        self.head = nn.Linear(self.features.out_channels, 2)

    def head_outputs(self, batch: dict) -> HeadOutputs:
        return HeadOutputs(self.head(global_pool(self.features(batch["ct"]))))


class SliceCNN2D(Comparator):
    """A 2D CNN on every axial slice; slice features pooled over the volume with gated attention
    weights (returned as ``aux["slice_weights"]``, (B, D), and as the attention map
    ``slice_attention`` over a (D, 1, 1) grid, the heat map it draws), then a linear head."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.features = ConvStack(widths, dims=2)
        c = self.features.out_channels
        self.attention = nn.Sequential(nn.Linear(c, c // 2), nn.Tanh(), nn.Linear(c // 2, 1))
        self.head = nn.Linear(c, 2)

    def head_outputs(self, batch: dict) -> HeadOutputs:
        ct = batch["ct"]
        b, _, d, h, w = ct.shape
        slices = global_pool(self.features(ct.transpose(1, 2).reshape(b * d, 1, h, w))).reshape(b, d, -1)
        weights = self.attention(slices).squeeze(-1).softmax(dim=1)
        pooled = (weights.unsqueeze(-1) * slices).sum(1)
        return HeadOutputs(self.head(pooled), {"slice_weights": weights},
                           {"slice_attention": weights[:, None, None, :]}, {"slice_attention": (d, 1, 1)})


class ImageGCSLateFusion(Comparator):
    """GCS-ICHNet's idea: 3D CNN image features concatenated with the standardized GCS, then an MLP.

    The GCS is the ``gcs`` column of the ``clinical`` tensor (standardized with training stats).
    """

    inputs = ("ct", "clinical")
    gradcam_layer = "features"

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), hidden: int = 64):
        super().__init__()
        self.features = ConvStack(widths)
        self.clinical = ClinicalStandardizer()
        self.head = mlp(self.features.out_channels + 1, hidden)

    def head_outputs(self, batch: dict) -> HeadOutputs:
        image = global_pool(self.features(batch["ct"]))
        gcs = self.clinical(batch["clinical"])[:, CLINICAL_FEATURES.index("gcs"), None].to(image.dtype)
        return HeadOutputs(self.head(torch.cat([image, gcs], dim=1)))


class ConcatLateFusion(Comparator):
    """Late fusion of frozen encoders: pooled ``vision_features`` ++ masked-mean ``text_states`` -> MLP.

    Grad-CAM weighs the frozen feature maps (``vision_map``, an identity they pass through).
    """

    inputs = ("vision_features", "text_states", "attention_mask")
    gradcam_layer = "vision_map"

    def __init__(self, vision_channels: int, text_dim: int, hidden: int = 128):
        super().__init__()
        self.vision_map = nn.Identity()
        self.norm = nn.LayerNorm(vision_channels + text_dim)
        self.head = mlp(vision_channels + text_dim, hidden)

    def head_outputs(self, batch: dict) -> HeadOutputs:
        text = masked_mean(batch["text_states"], batch["attention_mask"])
        joint = torch.cat([global_pool(self.vision_map(batch["vision_features"])), text], dim=1)
        return HeadOutputs(self.head(self.norm(joint)))


# --------------------------------------------------------------------------- joint quantification


class JointQuantification(Comparator):
    """Gong et al. (2023): a shared ResNet with a haematoma-volume regression head and a prognosis head.

    Original: a weight-shared upstream feature extractor trained on both tasks, two downstream heads,
    Grad-CAM maps; multi-task beats single-task. Kept: shared 3D ResNet (:class:`VisionEncoder`),
    both heads, the multi- vs single-task comparison (``volume_weight=0`` builds no volume head).
    Our choices (not published): the head regresses log1p(volume mL) with a smooth-L1 loss
    weighted by ``volume_weight``. ``aux["volume_ml"]`` is the predicted volume in mL.
    """

    gradcam_layer = "encoder"

    def __init__(self, depth: int = 50, widths: tuple[int, int, int, int] = (64, 128, 256, 512),
                 no_max_pool: bool = False, volume_weight: float = 1.0):
        super().__init__()
        self.encoder = VisionEncoder(depth, widths, no_max_pool)
        c = self.encoder.out_channels
        self.prognosis = nn.Linear(c, 2)
        self.volume = nn.Linear(c, 1) if volume_weight > 0 else None
        self.volume_weight = volume_weight
        if self.volume is not None:
            self.targets, self.auxiliary_tasks = ("volume_ml",), ("volume_ml_pred",)

    def head_outputs(self, batch: dict) -> HeadOutputs:
        h = global_pool(self.encoder(batch["ct"]))
        out = HeadOutputs(self.prognosis(h))
        if self.volume is not None:
            log_volume = self.volume(h)[:, 0]
            out.aux = {"log1p_volume": log_volume, "volume_ml": torch.expm1(log_volume).clamp_min(0)}
        return out

    def auxiliary_predictions(self, out: HeadOutputs) -> dict[str, torch.Tensor]:
        """``volume_ml_pred``: the predicted haematoma volume (mL), when there is a volume head."""
        return {"volume_ml_pred": out.aux["volume_ml"].float()} if "volume_ml" in out.aux else {}

    def loss(self, out: HeadOutputs, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce, terms = super().loss(out, batch)
        if self.volume is None:
            return ce, terms
        volume = F.smooth_l1_loss(out.aux["log1p_volume"].float(), torch.log1p(batch["volume_ml"].float()))
        return ce + self.volume_weight * volume, {**terms, "volume": volume.detach()}


# --------------------------------------------------------------------------- VDAFM


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
    Changed: the text comes from a template (:func:`ichpro.image_report.image_report`), not an LLM,
    and is encoded by a small trainable encoder (:class:`TemplateTextEncoder`).
    """

    inputs = ("ct", "clinical", "image_text_ids", "image_text_mask")
    gradcam_layer = "encoder"

    def __init__(self, depth: int = 50, widths: tuple[int, int, int, int] = (64, 128, 256, 512),
                 no_max_pool: bool = False, dim: int = 256, heads: int = 8,
                 align_weight: float = 0.1, temperature: float = 0.07):
        super().__init__()
        self.encoder = VisionEncoder(depth, widths, no_max_pool)
        self.vision = nn.Linear(self.encoder.out_channels, dim)
        self.text = TemplateTextEncoder(dim, heads)
        self.clinical = ClinicalStandardizer()
        self.table = FeatureTokens(len(CLINICAL_FEATURES), dim)
        self.text_query, self.table_query = VisionQuery(dim, heads), VisionQuery(dim, heads)
        self.head = mlp(3 * dim, dim)
        self.align_weight, self.temperature = align_weight, temperature

    def head_outputs(self, batch: dict) -> HeadOutputs:
        v = self.vision(global_pool(self.encoder(batch["ct"])))
        mask = batch["image_text_mask"]
        tokens = self.text(batch["image_text_ids"], mask)
        t, text_weights = self.text_query(v, tokens, mask == 0)
        c, table_weights = self.table_query(v, self.table(self.clinical(batch["clinical"])))
        return HeadOutputs(self.head(torch.cat([v, t, c], dim=1)), {
            "vision_embedding": v, "text_embedding": t, "table_embedding": c,
            "text_attention": text_weights, "table_attention": table_weights})

    def loss(self, out: HeadOutputs, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce, terms = super().loss(out, batch)
        v = out.aux["vision_embedding"]
        text = symmetric_info_nce(v, out.aux["text_embedding"], self.temperature)
        table = symmetric_info_nce(v, out.aux["table_embedding"], self.temperature)
        total = ce + self.align_weight * (text + table)
        return total, {**terms, "align_text": text.detach(), "align_table": table.detach()}


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
def _densenet(cfg: ModelConfig, text_hidden: int | None, gcs_task: str | None = None,
              age_task: bool = False) -> MultiTaskDenseNet:
    return MultiTaskDenseNet(gcs_task, age_task, **DENSENET_SIZES[cfg.comparator_size])


def _quantification(cfg: ModelConfig, text_hidden: int | None, volume_weight: float = 1.0
                    ) -> JointQuantification:
    return JointQuantification(**RESNET_SIZES[cfg.comparator_size], volume_weight=volume_weight)


def _vdafm(cfg: ModelConfig, text_hidden: int | None) -> VDAFM:
    return VDAFM(**RESNET_SIZES[cfg.comparator_size], dim=cfg.dim, heads=cfg.heads)


def _concat_late(cfg: ModelConfig, text_hidden: int | None) -> ConcatLateFusion:
    """Sized for the profile's frozen encoders, which produce ``vision_features`` and ``text_states``."""
    if text_hidden is None:
        raise IchproError("concat_late reads the text encoder's states: give its hidden size")
    channels = cfg.vision_widths[3] * (4 if RESNET_LAYERS[cfg.vision_depth][0] == "bottleneck" else 1)
    return ConcatLateFusion(channels, text_hidden)


def _cnn(cls: type[Comparator], cfg: ModelConfig, text_hidden: int | None) -> Comparator:
    return cls(CNN_WIDTHS[cfg.comparator_size])


#: name -> constructor taking the ModelConfig (its ``comparator_size``: "smoke" | "cpu" | "paper", and
#: the frozen encoders' sizes) and the text encoder's hidden size.
COMPARATORS: dict[str, Callable[[ModelConfig, int | None], Comparator]] = {
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


def build_comparator(name: str, cfg: ModelConfig, text_hidden: int | None = None) -> Comparator:
    """The comparator ``name`` of :data:`COMPARATORS` at ``cfg.comparator_size``, reading its CT at
    ``cfg.comparator_input`` (None: the preprocessed size); ``text_hidden``, the text encoder's
    hidden size, is needed by the late fusion of the frozen encoders only. Clear error for an
    unknown name."""
    if name not in COMPARATORS:
        raise IchproError(f"unknown comparator {name!r}; choose one of {', '.join(COMPARATORS)}")
    model = COMPARATORS[name](cfg, text_hidden)
    model.ct_size = None if cfg.comparator_input is None else tuple(cfg.comparator_input)
    return model
