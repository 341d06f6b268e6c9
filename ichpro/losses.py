"""Loss terms of ICHPro and of the paper's comparators, and the weighted composite used in training.

Each term is a pure function: tensors in, a differentiable scalar tensor out. Inside every term
autocast is switched off and floating-point inputs are cast to float32, so similarities, softmaxes
and KL divergences stay in float32 when the model runs under ``torch.autocast(bfloat16)``.

Notation: a batch of B patients; v_i, t_i the pooled vision and text embeddings of patient i;
y_i its outcome label (0 good, 1 bad); x^ = x / ||x||; tau the temperature; Y_ij = [y_i == y_j]
the label matrix and q_ij = Y_ij / sum_k Y_ik its row distribution.

* CE: cross-entropy of the fused classifier's logits (B, 2).
* InfoNCE(a, b) = mean_i -log softmax_j(a^_i . b^_j / tau)[j = i]: patient i's own pair is the
  positive (one direction).
* SupCon(z) (Khosla et al. 2020, L_out) = mean over anchors i with P(i) non-empty of
  -1/|P(i)| sum_{p in P(i)} log[exp(z^_i . z^_p / tau) / sum_{a != i} exp(z^_i . z^_a / tau)],
  with P(i) = {p != i : y_p == y_i}; 0 when no anchor has a positive.
* IMIMA (intra- and inter-modality alignment), with w = softmax(m) for learnable logits m in R^2:
  IMIMA = w_0 . 1/2 [InfoNCE(v, t) + InfoNCE(t, v)] + w_1 . 1/2 [SupCon(v) + SupCon(t)].
* SDM (similarity distribution matching, IRRA, Jiang & Ye 2023) with p_ij = softmax_j(v^_i . t^_j / tau):
  SDM = mean_i sum_j p_ij (log p_ij - log(q_ij + eps)), plus the same with v and t swapped.
  Here Y comes from the outcome label (IRRA uses person ids). The official ICHPro code builds an
  all-positive label matrix, which makes q uniform; we use the real labels.
* MLM: cross-entropy over the masked tokens only (label -100 elsewhere).
* CMPM (cross-modal projection matching, Zhang & Lu 2018): as SDM but with p_ij = softmax_j(v_i . t^_j),
  the projection of v_i on the normalised t_j (no temperature), plus the symmetric term.
* CMFA: cross-modal hardest-negative triplet plus affinity alignment (see ``cmfa_loss``).
* Blend (gradient blending, Wang, Tran & Feiszli 2020): weighted CE of the fused and unimodal heads.
* Numbers (beyond the paper): mean squared error of the patient's age and GCS read from the fused
  representation the header classifies, each standardised by :data:`NUMBER_SCALES`. The outcome
  labels alone do not teach the fusion to keep the report's numbers (``bench/fusion_headroom.py``).

ICHPro's loss is VTMF = CE + IMIMA + alpha . SDM + beta . MLM. Cross-entropy is always part of
training: the official code forgot it, and without a supervised term the classifier never learns.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ichpro.config import LossConfig, loss_terms
from ichpro.errors import IchproError

#: CLI shorthand for ICHPro's own loss.
VTMF = LossConfig().terms  # CE + IMIMA + SDM + MLM, all weights 1

_EMBEDDINGS = ("vision_embedding", "text_embedding")
_EMBEDDING_HINT = "the model must return pooled vision and text embeddings"
#: The forward inputs each term needs (besides labels), and how to provide them.
_INPUTS: dict[str, tuple[tuple[str, ...], str]] = {
    "ce": (("logits",), "pass the classifier logits"),
    "imima": (_EMBEDDINGS, _EMBEDDING_HINT),
    "sdm": (_EMBEDDINGS, _EMBEDDING_HINT),
    "mlm": (("mlm_logits", "mlm_labels"), "build the model with the MLM branch"),
    "blend": (("logits", "vision_logits", "text_logits"), "build the model with unimodal heads"),
    "cmpm": (_EMBEDDINGS, _EMBEDDING_HINT),
    "cmfa": (_EMBEDDINGS, _EMBEDDING_HINT),
    "numbers": (("numbers", "numbers_target"), "build ICHPro with the numbers head (loss term 'numbers')"),
}
#: the numbers the "numbers" term regresses, in order, with the centre and scale that standardise them
NUMBER_SCALES = (("age", 65.0, 15.0), ("gcs", 10.0, 4.0))


def _float32(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run ``fn`` with autocast off and its floating-point tensor arguments cast to float32."""

    def cast(value):
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> torch.Tensor:
        device = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).device
        with torch.autocast(device_type=device.type, enabled=False):
            return fn(*map(cast, args), **{key: cast(value) for key, value in kwargs.items()})

    return wrapper


def _mean_over(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the ``rows`` that are true, 0 (still in the graph) when none is: no
    data-dependent shape or branch, so a term also runs under ``torch.func.vmap`` (a batched fit)."""
    rows = rows.to(values.dtype)
    return (values * rows).sum() / rows.sum().clamp(min=1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix (B, B) of the rows of ``a`` and ``b``."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def _same_label(labels: torch.Tensor) -> torch.Tensor:
    """Boolean label matrix Y_ij = [y_i == y_j]."""
    return labels[:, None] == labels[None, :]


def _check_pair(vision: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise IchproError unless vision and text are (B, E) and labels is (B,)."""
    if vision.ndim != 2 or vision.shape != text.shape or labels.shape != vision.shape[:1]:
        raise IchproError(f"expected vision and text embeddings of the same shape (B, E) and labels (B,); "
                          f"got {tuple(vision.shape)}, {tuple(text.shape)} and {tuple(labels.shape)}")


def _kl_to_labels(scores: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """mean_i KL(softmax(scores_i) || q_i) with q the row-normalised label matrix (IRRA's form)."""
    same = _same_label(labels).float()
    q = same / same.sum(dim=1, keepdim=True)
    log_p = F.log_softmax(scores, dim=1)
    return (log_p.exp() * (log_p - torch.log(q + eps))).sum(dim=1).mean()


@_float32
def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, C) against integer labels (B,)."""
    return F.cross_entropy(logits, labels.long())


@_float32
def info_nce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE from anchor to positive: row i's positive is row i of ``positive`` (one direction)."""
    logits = _cosine(anchor, positive) / temperature
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The mean of InfoNCE from ``a`` to ``b`` and from ``b`` to ``a``."""
    return (info_nce(a, b, temperature) + info_nce(b, a, temperature)) / 2


@_float32
def supervised_contrastive(emb: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon (L_out) within one modality; anchors without a same-label partner are skipped."""
    self_mask = torch.eye(len(emb), dtype=torch.bool, device=emb.device)
    positives = _same_label(labels) & ~self_mask
    logits = (_cosine(emb, emb) / temperature).masked_fill(self_mask, -math.inf)
    log_prob = F.log_softmax(logits, dim=1).masked_fill(~positives, 0.0)
    per_anchor = -log_prob.sum(dim=1) / positives.sum(dim=1).clamp(min=1)
    return _mean_over(per_anchor, positives.any(dim=1))


@_float32
def imima_loss(vision: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, temperature: float,
               mix_logits: torch.Tensor) -> torch.Tensor:
    """IMIMA: softmax(mix_logits)-weighted sum of inter-modal InfoNCE and intra-modal SupCon."""
    _check_pair(vision, text, labels)
    inter = symmetric_info_nce(vision, text, temperature)
    intra = (supervised_contrastive(vision, labels, temperature)
             + supervised_contrastive(text, labels, temperature)) / 2
    weights = F.softmax(mix_logits, dim=0)
    return weights[0] * inter + weights[1] * intra


@_float32
def sdm_loss(vision: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, temperature: float,
             eps: float = 1e-8) -> torch.Tensor:
    """IRRA's similarity distribution matching, image-to-text plus text-to-image."""
    _check_pair(vision, text, labels)
    scores = _cosine(vision, text) / temperature
    return _kl_to_labels(scores, labels, eps) + _kl_to_labels(scores.T, labels, eps)


@_float32
def mlm_loss(mlm_logits: torch.Tensor, mlm_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (..., V) over the masked tokens (labels (...) != -100); 0 if none.

    The model gives logits (N, V) at its N masked positions only; (B, L, V) with -100 labels at the
    unmasked positions works too.
    """
    labels = mlm_labels.reshape(-1).long()
    per_token = F.cross_entropy(mlm_logits.reshape(-1, mlm_logits.shape[-1]), labels, ignore_index=-100,
                                reduction="none")
    return _mean_over(per_token, labels != -100)


@_float32
def cmpm_loss(vision: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
              eps: float = 1e-8) -> torch.Tensor:
    """Cross-modal projection matching: KL from projection softmax to label distribution, both ways."""
    _check_pair(vision, text, labels)
    i2t = vision @ F.normalize(text, dim=1).T
    t2i = text @ F.normalize(vision, dim=1).T
    return _kl_to_labels(i2t, labels, eps) + _kl_to_labels(t2i, labels, eps)


def _hardest_negative_triplet(similarity: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean hinge [margin - s_ii + max_{j: y_j != y_i} s_ij]_+ over rows that have a negative."""
    negatives = ~_same_label(labels)
    anchors = negatives.any(dim=1)
    hardest = similarity.masked_fill(~negatives, -math.inf).amax(dim=1)
    hinge = F.relu(margin - similarity.diagonal() + hardest).masked_fill(~anchors, 0.0)
    return _mean_over(hinge, anchors)


@_float32
def cmfa_loss(vision: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
              margin: float = 0.2) -> torch.Tensor:
    """CMFA comparator (our reading): cross-modal hardest-negative triplet + affinity alignment.

    The paper's comparator row is "CE + triplet + cross-modal affinity" with no more detail; the
    CE part is added by the composite. Triplet: on the cosine similarity s_ij = v^_i . t^_j, the
    anchor v_i, its positive t_i and the hardest negative t_j with a different label, hinge with
    ``margin``, averaged over anchors that have a negative; the t -> v direction is added to it.
    Affinity: mean squared difference of the intra-modal cosine matrices v^ v^T and t^ t^T.
    """
    _check_pair(vision, text, labels)
    similarity = _cosine(vision, text)
    triplet = (_hardest_negative_triplet(similarity, labels, margin)
               + _hardest_negative_triplet(similarity.T, labels, margin))
    affinity = F.mse_loss(_cosine(vision, vision), _cosine(text, text))
    return triplet + affinity


@_float32
def blend_loss(fused_logits: torch.Tensor, vision_logits: torch.Tensor, text_logits: torch.Tensor,
               labels: torch.Tensor, weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
               ) -> torch.Tensor:
    """Gradient-blending style loss: fixed-weight sum of the fused, vision and text heads' CE.

    Wang, Tran & Feiszli (2020) estimate the weights from each head's overfitting-to-generalisation
    ratio on held-out data; we keep fixed weights.
    """
    heads = (fused_logits, vision_logits, text_logits)
    return sum(w * ce_loss(logits, labels) for w, logits in zip(weights, heads, strict=True))


@_float32
def numbers_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of predicted (B, 2) against raw age and GCS (B, 2), both standardised by
    :data:`NUMBER_SCALES` (the prediction is on the standardised scale)."""
    centre = target.new_tensor([c for _, c, _ in NUMBER_SCALES])
    scale = target.new_tensor([s for _, _, s in NUMBER_SCALES])
    return F.mse_loss(predicted, (target - centre) / scale)


def _format(terms: Sequence[tuple[str, float]]) -> str:
    """Loss terms in the CLI syntax, e.g. "ce=1,sdm=0.5"."""
    return ",".join(f"{name}={weight:g}" for name, weight in terms)


class CompositeLoss(nn.Module):
    """Weighted sum of named terms; every term's value is reported separately."""

    def __init__(self, terms: Mapping[str, float] | Sequence[tuple[str, float]], temperature: float = 0.07):
        super().__init__()
        pairs = list(terms.items()) if isinstance(terms, Mapping) else list(terms)
        self.terms = loss_terms(pairs)
        if not temperature > 0:
            raise IchproError(f"loss temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        # IMIMA's learnable inter/intra mixing logits, trained with the model.
        self.imima_mix = nn.Parameter(torch.zeros(2)) if "imima" in self.names else None

    @classmethod
    def from_config(cls, cfg: LossConfig) -> CompositeLoss:
        """Build the loss from a profile's LossConfig."""
        return cls(cfg.terms, temperature=cfg.temperature)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the terms, in order."""
        return tuple(name for name, _ in self.terms)

    def extra_repr(self) -> str:
        """Terms and temperature, for print(module)."""
        return f"terms=({_format(self.terms)}), temperature={self.temperature:g}"

    def forward(self, *, labels: torch.Tensor, logits: torch.Tensor | None,
                vision_embedding: torch.Tensor | None = None, text_embedding: torch.Tensor | None = None,
                mlm_logits: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                vision_logits: torch.Tensor | None = None, text_logits: torch.Tensor | None = None,
                numbers: torch.Tensor | None = None, numbers_target: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (total = sum of weight . term, {"total": ..., term: unweighted value, ...}); the
        values are detached scalar tensors (no ``.item()``: the loss also runs under ``vmap``)."""
        inputs = {"logits": logits, "vision_embedding": vision_embedding, "text_embedding": text_embedding,
                  "mlm_logits": mlm_logits, "mlm_labels": mlm_labels,
                  "vision_logits": vision_logits, "text_logits": text_logits,
                  "numbers": numbers, "numbers_target": numbers_target}
        values = {name: self._term(name, labels, inputs) for name in self.names}
        total = sum(weight * values[name] for name, weight in self.terms)
        report = {"total": total.detach()}
        report.update((name, value.detach()) for name, value in values.items())
        return total, report

    def _term(self, name: str, labels: torch.Tensor, inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Value of one (unweighted) term; IchproError if one of its inputs is missing."""
        needed, hint = _INPUTS[name]
        if any(inputs[key] is None for key in needed):
            raise IchproError(f"{name} needs {' and '.join(needed)}: {hint}")
        v, t, tau = inputs["vision_embedding"], inputs["text_embedding"], self.temperature
        compute = {
            "ce": lambda: ce_loss(inputs["logits"], labels),
            "imima": lambda: imima_loss(v, t, labels, tau, self.imima_mix),
            "sdm": lambda: sdm_loss(v, t, labels, tau),
            "mlm": lambda: mlm_loss(inputs["mlm_logits"], inputs["mlm_labels"]),
            "blend": lambda: blend_loss(inputs["logits"], inputs["vision_logits"], inputs["text_logits"],
                                        labels),
            "cmpm": lambda: cmpm_loss(v, t, labels),
            "cmfa": lambda: cmfa_loss(v, t, labels),
            "numbers": lambda: numbers_loss(inputs["numbers"], inputs["numbers_target"]),
        }
        return compute[name]()


def parse_loss_spec(spec: str) -> tuple[tuple[str, float], ...]:
    """Parse the CLI syntax "ce=1,imima=1,sdm=0.5,mlm=0.5" ("vtmf" = VTMF, a bare name = weight 1)."""
    terms: list[tuple[str, float]] = []
    for item in (part.strip() for part in spec.split(",")):
        name, sep, weight = (piece.strip() for piece in item.partition("="))
        if not name:
            raise IchproError(f"bad loss spec {spec!r}: empty term; write e.g. 'ce=1,imima=1,sdm=0.5'")
        if name == "vtmf":
            if sep:
                raise IchproError(f"bad loss spec {spec!r}: 'vtmf' is shorthand for "
                                  f"{_format(VTMF)} and takes no weight; write the terms out instead")
            terms.extend(VTMF)
            continue
        try:
            terms.append((name, float(weight) if sep else 1.0))
        except ValueError:
            raise IchproError(f"bad loss spec {spec!r}: weight of {name!r} is {weight!r}, "
                              f"not a number; write e.g. '{name}=0.5'") from None
    return loss_terms(terms)
