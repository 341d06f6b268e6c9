"""The assembled ICHPro model: encoders -> VRT/TRT -> fusion structure -> header, plus the outputs
the VTMF loss needs (pooled embeddings, MLM logits) and every attention map."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ichpro.config import LossConfig, ModelConfig
from ichpro.errors import IchproError
from ichpro.models.encoders import TextEncoder, VisionEncoder, freeze
from ichpro.models.fusion import TRT, VRT, FusionStack, Grid, tokens
from ichpro.models.heads import MLMHead, SequenceHeader

#: loss terms that need the pooled vision and text embeddings
ALIGNMENT_TERMS = {"imima", "sdm", "cmpm", "cmfa"}


@dataclass
class ICHProOutput:
    """What one forward pass returns."""

    logits: torch.Tensor  # (B, 2)
    fused: torch.Tensor  # f_tbv, the text-based vision representation (B, C, 2d, 2h, 2w)
    attentions: dict[str, torch.Tensor]  # name -> (B, heads, queries, keys)
    vision_embedding: torch.Tensor | None = None  # (B, C) pooled, for the alignment losses
    text_embedding: torch.Tensor | None = None  # (B, C)
    attention_grids: dict[str, Grid] = field(default_factory=dict)  # name -> grid of the keys
    mlm_logits: torch.Tensor | None = None  # (N, vocabulary) at the N masked positions
    mlm_labels: torch.Tensor | None = None  # (N,) their targets: the original tokens' vocabulary indices
    vision_logits: torch.Tensor | None = None  # unimodal heads (gradient-blending loss)
    text_logits: torch.Tensor | None = None
    token_attention: torch.Tensor | None = None  # TRT's (B, heads, |G|, L): which tokens each cell reads

    def attention_volume(self, name: str, size: tuple[int, int, int]) -> torch.Tensor:
        """Attention received by each grid position of map ``name``, up-sampled to ``size``.

        Averaged over heads and queries and normalised to sum to 1 over the grid; returns
        (B, *size). The fusion grid spans the whole model input, so ``size`` = the input's
        (D, H, W) puts the map in the preprocessed CT's voxel space. For a joint (Self) map only
        the vision half of the keys is kept; for CMAF's vision-to-text map the keys are the
        text pseudo-volume's positions, which TRT aligns with the same grid.
        """
        grid = self.attention_grids[name]
        received = self.attentions[name].float().mean(dim=(1, 2))[:, : math.prod(grid)]
        received = received / received.sum(dim=1, keepdim=True)
        volume = F.interpolate(received.reshape(-1, 1, *grid), size=size, mode="trilinear",
                               align_corners=False)
        return volume[:, 0]


class ICHPro(nn.Module):
    """3D cross-modal network: CT + report -> good/bad outcome logits (see ``ichpro.models``)."""

    def __init__(self, cfg: ModelConfig, text_model: nn.Module, *, with_embeddings: bool = True,
                 with_mlm: bool = True, with_unimodal_heads: bool = False):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision_depth, cfg.vision_widths, cfg.vision_no_max_pool)
        if cfg.vision_weights:
            self.vision.load_weights(cfg.vision_weights)
        self.text = TextEncoder(text_model, cfg.text_layers)
        hidden = self.text.hidden_size
        if cfg.modality != "both" and (with_embeddings or with_mlm or with_unimodal_heads):
            raise IchproError(f"a {cfg.modality}-only model trains with cross-entropy alone: the other "
                              "loss terms need both modalities")
        self.vrt = VRT(self.vision.out_channels, cfg.dim, cfg.grid) if cfg.modality != "text" else None
        self.trt = (TRT(hidden, cfg.dim, cfg.max_tokens, cfg.grid, cfg.heads, cfg.trt)
                    if cfg.modality != "vision" else None)
        self.fusion = FusionStack(cfg.fusion, cfg.dim, cfg.heads, cfg.grid, cfg.modality, cfg.cmaf_pool)
        self.header = SequenceHeader(cfg.dim, cfg.header_blocks, cfg.header_growth)
        # only the branches the loss uses are built: every parameter then receives a gradient
        self.projections = (nn.ModuleDict({"vision": nn.Linear(cfg.dim, cfg.dim),
                                           "text": nn.Linear(hidden, cfg.dim)})
                            if with_embeddings or with_unimodal_heads else None)
        self.mlm = MLMHead(hidden, cfg.dim, cfg.heads, self.text.word_embeddings) if with_mlm else None
        self.unimodal = (nn.ModuleDict({"vision": nn.Linear(cfg.dim, 2), "text": nn.Linear(cfg.dim, 2)})
                         if with_unimodal_heads else None)
        if cfg.freeze_vision or cfg.modality == "text":  # an unused encoder is frozen too
            freeze(self.vision)
        if cfg.freeze_text or cfg.modality == "vision":
            freeze(self.text)
        self.train()

    def train(self, mode: bool = True) -> ICHPro:
        """Set train/eval mode; frozen encoders always stay in eval mode."""
        super().train(mode)
        for frozen, encoder in ((self.cfg.freeze_vision, self.vision), (self.cfg.freeze_text, self.text)):
            if frozen:
                encoder.eval()
        return self

    def encode(self, ct: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoders' outputs f_v (B, C_v, d, h, w) and f_t (B, L, H)."""
        return self.vision(ct), self.text(input_ids, attention_mask)

    def forward(self, attention_mask: torch.Tensor, ct: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, mlm_input_ids: torch.Tensor | None = None,
                mlm_labels: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                text_states: torch.Tensor | None = None, masked_text_states: torch.Tensor | None = None,
                **_: object) -> ICHProOutput:
        """Forward pass from a batch; extra entries (labels, ids, ...) are ignored.

        Frozen encoders' outputs can be passed precomputed (``vision_features`` instead of ``ct``,
        ``text_states`` instead of ``input_ids``, ``masked_text_states`` instead of
        ``mlm_input_ids``). The MLM branch runs when a masked report and its ``mlm_labels``
        (original token at masked positions, -100 elsewhere) are given.
        """
        v_grid = t_grid = token_attention = None
        if self.vrt is not None:
            v_grid = self.vrt(self.vision(ct) if vision_features is None else vision_features)
        if self.trt is not None:
            f_t = self.text(input_ids, attention_mask) if text_states is None else text_states
            t_grid, token_attention = self.trt(f_t, attention_mask)
        fused, attentions = self.fusion(v_grid, t_grid)
        out = ICHProOutput(logits=self.header(fused), fused=fused, attentions=attentions,
                           attention_grids=self.fusion.map_grids, token_attention=token_attention)
        if self.projections is not None:
            mask = attention_mask.unsqueeze(-1).to(f_t.dtype)
            out.vision_embedding = self.projections["vision"](v_grid.mean(dim=(2, 3, 4)))
            out.text_embedding = self.projections["text"]((f_t * mask).sum(1) / mask.sum(1).clamp_min(1))
        if masked_text_states is None and mlm_input_ids is not None:
            masked_text_states = self.text(mlm_input_ids, attention_mask)
        if self.mlm is not None and masked_text_states is not None and mlm_labels is not None:
            out.mlm_logits, out.mlm_labels = self.mlm(masked_text_states, tokens(v_grid), mlm_labels)
        if self.unimodal is not None:
            out.vision_logits = self.unimodal["vision"](out.vision_embedding)
            out.text_logits = self.unimodal["text"](out.text_embedding)
        return out


def build_model(cfg: ModelConfig, text_model: nn.Module, loss: LossConfig | None = None) -> ICHPro:
    """ICHPro with the branches its loss needs: pooled embeddings for the alignment terms, the MLM
    head for "mlm", unimodal heads for "blend"."""
    names = {name for name, _ in (loss or LossConfig()).terms}
    return ICHPro(cfg, text_model, with_embeddings=bool(names & ALIGNMENT_TERMS),
                  with_mlm="mlm" in names, with_unimodal_heads="blend" in names)
