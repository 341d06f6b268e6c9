"""Heat maps of one batch, each on the model input's voxel grid (D, H, W): a fusion attention map
(ICHPro's CMAF and MHSAF), the same map weighted by its gradient, or Grad-CAM (any model that names a
layer for it). :func:`heatmap` draws the kind asked for; :data:`DEFAULT_HEATMAP` is the kind a user
gets unless they choose.

The functions put the model in eval mode while they work and leave it as they found it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ichpro.errors import IchproError
from ichpro.gradcam import explaining, grad_cam
from ichpro.models import ICHPro, ModelOutput, PrognosisModel

GRAD_CAM = "grad_cam"  # method name of Grad-CAM in the localisation table
GRADIENT_WEIGHTED = "_x_gradient"  # suffix of a gradient-weighted attention map's method name
#: The heat map a user gets by default where the model draws it: Grad-CAM, the map notebook 11's
#: localisation table (``figures/attention_localisation_summary.csv``) measures closest to the
#: haematoma for ICHPro (the largest share of a map's mass on it relative to a uniform map, with a
#: pointing rate above chance; a test holds it to that table). A model without a Grad-CAM layer (the
#: 2D slice network) gets its first attention map.
DEFAULT_HEATMAP = GRAD_CAM


def attention_volumes(out: ModelOutput, size: tuple[int, int, int], names: Sequence[str] | None
             ) -> dict[str, torch.Tensor]:
    """The named attention maps of a forward pass on the input grid (all of them by default)."""
    names = list(out.attentions) if names is None else list(names)
    unknown = [name for name in names if name not in out.attentions]
    if unknown:
        raise IchproError(f"no attention map {unknown[0]!r} in this model; "
                          f"it has {', '.join(out.attentions)}")
    return {name: out.attention_volume(name, size) for name in names}


def forward(model: ICHPro, batch: Mapping[str, torch.Tensor]) -> ModelOutput:
    """One forward pass in eval mode, without gradients."""
    with explaining(model), torch.no_grad():
        return model(batch)


def attention_maps(model: ICHPro, batch: Mapping[str, torch.Tensor], names: Sequence[str] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Each fusion attention map on the input grid: name -> (B, D, H, W), each voxel holding the
    share of attention its grid cell receives (see ``ModelOutput.attention_volume``)."""
    return attention_volumes(forward(model, batch), tuple(batch["ct"].shape[2:]), names)


def gradient_weighted_attention(model: ICHPro, batch: Mapping[str, torch.Tensor], target_class: int = 1,
                                size: tuple[int, int, int] | None = None) -> dict[str, torch.Tensor]:
    """Each fusion attention map weighted by its gradient, on the input grid: name +
    :data:`GRADIENT_WEIGHTED` -> (B, *size), summing to 1 over the grid (``size``: default the batch's CT).

    The rule of Chefer, Gur & Wolf (ICCV 2021) for one attention layer: the positive part of
    (d logit / d A) * A, averaged over heads and queries, where ``logit`` is ``target_class``'s
    (1 = bad outcome). A key cell counts by the attention it receives where that attention raises
    the logit; the raw map (:func:`attention_maps`) counts all attention alike, whether or not the
    prediction uses it. A patient whose map has no positive part gets an all-zero map.
    """
    with explaining(model), torch.enable_grad():
        out = model(batch)
        names = list(out.attentions)
        grads = torch.autograd.grad(out.logits[:, target_class].sum(), [out.attentions[n] for n in names])
    weighted = ModelOutput(
        logits=out.logits.detach(),
        attentions={name + GRADIENT_WEIGHTED: (grad * out.attentions[name]).detach().float().clamp(min=0)
                    for name, grad in zip(names, grads)},
        attention_grids={name + GRADIENT_WEIGHTED: out.attention_grids[name] for name in names})
    return attention_volumes(weighted, size or tuple(batch["ct"].shape[2:]), None)


def heatmap_kinds(model: PrognosisModel, batch: Mapping[str, torch.Tensor]) -> list[str]:
    """The heat maps ``model`` can draw: its fusion attention maps, each weighted by its gradient,
    and Grad-CAM where the model names a layer for it."""
    names = list(forward(model, batch).attentions)
    return [*names, *(name + GRADIENT_WEIGHTED for name in names),
            *([GRAD_CAM] if model.gradcam_layer is not None else [])]


def choose_heatmap(model: PrognosisModel, batch: Mapping[str, torch.Tensor], kind: str | None = None) -> str:
    """``kind`` if the model draws it (:func:`heatmap_kinds`), else a clear error; None: the model's
    default (:data:`DEFAULT_HEATMAP` where it draws it, else its first map)."""
    kinds = heatmap_kinds(model, batch)
    if not kinds:
        raise IchproError(f"{type(model).__name__} draws no heat map (no attention map, no Grad-CAM layer)")
    if kind is None:
        return DEFAULT_HEATMAP if DEFAULT_HEATMAP in kinds else kinds[0]
    if kind not in kinds:
        raise IchproError(f"{type(model).__name__} draws no heat map {kind!r}; it draws {', '.join(kinds)}")
    return kind


def heatmap(model: PrognosisModel, batch: Mapping[str, torch.Tensor], kind: str,
            size: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The heat map ``kind`` (:func:`heatmap_kinds`) of a batch on the grid ``size`` (default: the
    batch's CT; give it for a model that reads cached features): (B, *size)."""
    kind = choose_heatmap(model, batch, kind)
    size = tuple(batch["ct"].shape[2:]) if size is None else tuple(size)
    if kind == GRAD_CAM:
        return grad_cam(model, batch, size)
    if kind.endswith(GRADIENT_WEIGHTED):
        return gradient_weighted_attention(model, batch, size=size)[kind]
    return attention_volumes(forward(model, batch), size, [kind])[kind]


def describe_heatmap(kind: str) -> str:
    """What a heat map kind is, for a figure's title."""
    if kind == GRAD_CAM:
        return "Grad-CAM"
    if kind.endswith(GRADIENT_WEIGHTED):
        return f"attention {kind.removesuffix(GRADIENT_WEIGHTED)} × its gradient"
    return f"raw attention {kind}"
