"""The assembled ICHPro model: encoders -> VRT/TRT -> fusion structure -> header, plus the outputs
the VTMF loss needs (pooled embeddings, MLM logits), every attention map, and the loss itself."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ichpro.config import LossConfig, ModelConfig
from ichpro.errors import IchproError
from ichpro.losses import NUMBER_SCALES, CompositeLoss
from ichpro.models.contract import ModelOutput, PrognosisModel
from ichpro.models.encoders import TextEncoder, VisionEncoder, freeze, masked_mean
from ichpro.models.fusion import TRT, VRT, FusionStack, tokens
from ichpro.models.heads import MLMHead, SequenceHeader

#: loss terms that need the pooled vision and text embeddings
ALIGNMENT_TERMS = {"imima", "sdm", "cmpm", "cmfa"}


class ICHPro(PrognosisModel):
    """3D cross-modal network: CT + report -> good/bad outcome logits (see ``ichpro.models``).

    ``objective`` (a :class:`~ichpro.losses.CompositeLoss`, IMIMA's learnable mix included) gives
    the loss when the batch holds labels; ``mlm_vocabulary="reports"`` restricts the MLM head to
    the words of the training reports (:meth:`fit_training_patients`).
    """

    gradcam_layer = "vision"

    def __init__(self, cfg: ModelConfig, text_model: nn.Module, *, with_embeddings: bool = True,
                 with_mlm: bool = True, with_unimodal_heads: bool = False, with_numbers: bool = False,
                 objective: CompositeLoss | None = None, mlm_vocabulary: str = "full"):
        super().__init__()
        self.cfg, self.mlm_vocabulary = cfg, mlm_vocabulary
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
        # beyond the paper: age and GCS read from the fused representation (loss term "numbers")
        self.numbers = nn.Linear(cfg.dim, len(NUMBER_SCALES)) if with_numbers else None
        self.objective = objective
        if cfg.freeze_vision or cfg.modality == "text":  # an unused encoder is frozen too
            freeze(self.vision)
        if cfg.freeze_text or cfg.modality == "vision":
            freeze(self.text)
        self.frozen_prefixes = (("vision.",) if cfg.freeze_vision else ()) + (
            ("text.", "mlm.word_embeddings.") if cfg.freeze_text else ())
        self.inputs = self._inputs()
        both = self.vrt is not None and self.trt is not None
        self.training_draws = ("vision_dropout_draw",) if cfg.vision_dropout > 0 and both else ()
        self.targets = (("mlm_labels",) if self.mlm is not None else ()) + (
            tuple(name for name, _, _ in NUMBER_SCALES) if self.numbers is not None else ())
        self.train()

    def _inputs(self) -> tuple[str, ...]:
        """The report's tokens, and the CT and masked report or, with frozen encoders, their outputs."""
        cfg, keys = self.cfg, ["input_ids", "attention_mask"]
        if cfg.modality != "text":
            keys.append("vision_features" if cfg.freeze_vision else "ct")
        if cfg.modality != "vision" and cfg.freeze_text:
            keys.append("text_states")
        if self.mlm is not None:
            keys.append("masked_text_states" if cfg.freeze_text else "mlm_input_ids")
        return tuple(keys)

    def fit_training_patients(self, patients: Mapping[str, torch.Tensor]) -> None:
        """Restrict the MLM head to the training reports' words (``mlm_vocabulary="reports"``), decoded
        over the cohort's words when ``patients`` holds them (``cohort_words``), so that every fold's
        head has one shape."""
        if self.mlm is not None and self.mlm_vocabulary == "reports":
            self.mlm.restrict_vocabulary(patients["input_ids"][patients["attention_mask"].bool()],
                                         patients.get("cohort_words"))

    def encodes_each_step(self) -> bool:
        """The CT or a trainable text encoder is encoded at every step."""
        return super().encodes_each_step() or any(p.requires_grad for p in self.text.parameters())

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

    def forward(self, batch: Mapping[str, torch.Tensor]) -> ModelOutput:
        """Forward pass from a batch (``attention_mask`` and the CT and report); other keys are ignored.

        Frozen encoders' outputs can be passed precomputed (``vision_features`` instead of ``ct``,
        ``text_states`` instead of ``input_ids``, ``masked_text_states`` instead of
        ``mlm_input_ids``). The MLM branch runs when a masked report and its ``mlm_labels``
        (original token at masked positions, -100 elsewhere) are given; the loss when ``labels`` (and,
        with MLM, ``mlm_labels``) are.
        """
        attention_mask, ct, input_ids = batch["attention_mask"], batch.get("ct"), batch.get("input_ids")
        vision_features, text_states = batch.get("vision_features"), batch.get("text_states")
        mlm_input_ids, mlm_labels = batch.get("mlm_input_ids"), batch.get("mlm_labels")
        masked_text_states = batch.get("masked_text_states")
        v_grid = t_grid = token_attention = None
        if self.vrt is not None:
            v_grid = self.vrt(self.vision(ct) if vision_features is None else vision_features)
        if self.trt is not None:
            f_t = self.text(input_ids, attention_mask) if text_states is None else text_states
            t_grid, token_attention = self.trt(f_t, attention_mask)
        v_grid_fused = self._vision_dropout(v_grid, batch.get("vision_dropout_draw"))
        fused, attentions = self.fusion(v_grid_fused, t_grid)
        out = ModelOutput(logits=self.header(fused), fused=fused, attentions=attentions,
                          attention_grids=self.fusion.map_grids, token_attention=token_attention)
        if self.projections is not None:
            out.vision_embedding = self.projections["vision"](v_grid.mean(dim=(2, 3, 4)))
            out.text_embedding = self.projections["text"](masked_mean(f_t, attention_mask))
        if masked_text_states is None and mlm_input_ids is not None:
            masked_text_states = self.text(mlm_input_ids, attention_mask)
        if self.mlm is not None and masked_text_states is not None and mlm_labels is not None:
            out.mlm_logits, out.mlm_labels = self.mlm(masked_text_states, tokens(v_grid), mlm_labels,
                                                      batch.get("mlm_decoded"))
        if self.unimodal is not None:
            out.vision_logits = self.unimodal["vision"](out.vision_embedding)
            out.text_logits = self.unimodal["text"](out.text_embedding)
        numbers_target = None
        if self.numbers is not None:
            out.numbers = self.numbers(fused.mean(dim=(2, 3, 4)))
            if self.is_labelled(batch):
                numbers_target = torch.stack([batch[name] for name, _, _ in NUMBER_SCALES], dim=1)
        if self.objective is not None and self.is_labelled(batch):
            out.loss, out.terms = self.objective(
                labels=batch["labels"], logits=out.logits, vision_embedding=out.vision_embedding,
                text_embedding=out.text_embedding, mlm_logits=out.mlm_logits, mlm_labels=out.mlm_labels,
                vision_logits=out.vision_logits, text_logits=out.text_logits, numbers=out.numbers,
                numbers_target=numbers_target)
        return out

    def _vision_dropout(self, v_grid: torch.Tensor | None, draw: torch.Tensor | None) -> torch.Tensor | None:
        """In training, zero the vision grid of a ``cfg.vision_dropout`` share of the samples (only
        where the fusion reads it: the alignment terms and MLM still see the CT): those whose
        uniform ``draw`` (B,) is below the rate (the engine draws it from the fold's generator; drawn
        here when not given)."""
        rate = self.cfg.vision_dropout
        if not self.training or rate == 0 or v_grid is None or self.trt is None:
            return v_grid
        if draw is None:
            draw = torch.rand(v_grid.shape[0], device=v_grid.device)
        keep = (draw >= rate).to(v_grid.dtype)
        return v_grid * keep.view(-1, *([1] * (v_grid.dim() - 1)))


def build_model(cfg: ModelConfig, text_model: nn.Module, loss: LossConfig | None = None) -> ICHPro:
    """ICHPro with its objective (the loss config's :class:`~ichpro.losses.CompositeLoss`) and the
    branches it needs: pooled embeddings for the alignment terms, the MLM head for "mlm", unimodal
    heads for "blend", the age and GCS head for "numbers"."""
    loss = loss or LossConfig()
    names = {name for name, _ in loss.terms}
    return ICHPro(cfg, text_model, with_embeddings=bool(names & ALIGNMENT_TERMS),
                  with_mlm="mlm" in names, with_unimodal_heads="blend" in names,
                  with_numbers="numbers" in names,
                  objective=CompositeLoss.from_config(loss), mlm_vocabulary=loss.mlm_vocabulary)
