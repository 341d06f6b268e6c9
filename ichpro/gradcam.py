"""Grad-CAM of any model of the contract (:mod:`ichpro.models.contract`) on the layer it names,
and the guard that leaves a model as it was found while it is being explained."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from monai.visualize import GradCAM
from monai.visualize.visualizer import default_upsampler
from torch import nn

from ichpro.errors import IchproError
from ichpro.models.contract import PrognosisModel


@contextlib.contextmanager
def explaining(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; on exit every module's mode and every parameter's gradient as before."""
    modes = [(module, module.training) for module in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for p, grad in grads:
            p.grad = grad


class _BadOutcome(nn.Module):
    """A batch -> the model's logits, as MONAI's GradCAM calls a network (``grid`` only sets the
    map's size).

    GradCAM hooks ``features``, a throwaway identity that the output of the model's
    ``gradcam_layer`` passes through (MONAI never removes its hooks, so none go on the model). That
    output is made a leaf requiring a gradient: the backward pass stops there, whether or not the
    layer's weights are frozen. The model goes on with a copy, so that an in-place operation after
    the layer (MONAI DenseNet's ``ReLU(inplace=True)``) never modifies the hooked view.
    """

    def __init__(self, model: PrognosisModel):
        super().__init__()
        self.model = model
        self.features = nn.Identity()

    def forward(self, grid: torch.Tensor, **batch: torch.Tensor) -> torch.Tensor:
        hook = _layer(self.model).register_forward_hook(
            lambda _module, _inputs, output: self.features(output.detach().requires_grad_(True)).clone())
        try:
            return self.model(batch).logits
        finally:
            hook.remove()


def _layer(model: PrognosisModel) -> nn.Module:
    """The module Grad-CAM weighs (the model's ``gradcam_layer``); a clear error if it names none."""
    if model.gradcam_layer is None:
        raise IchproError(f"{type(model).__name__} names no layer for Grad-CAM (its gradcam_layer is None)")
    return model.get_submodule(model.gradcam_layer)


def feature_grid(model: PrognosisModel, batch: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The grid of the ``gradcam_layer``'s feature maps on a batch: the grid a Grad-CAM map is made on
    before it is up-sampled to the CT."""
    shapes = []
    hook = _layer(model).register_forward_hook(lambda _m, _i, output: shapes.append(tuple(output.shape[2:])))
    try:
        with explaining(model), torch.no_grad():
            model(batch)
    finally:
        hook.remove()
    return shapes[0]


def _per_patient_max(maps: torch.Tensor) -> torch.Tensor:
    """Divide each patient's map by its maximum (an all-zero map stays zero)."""
    peak = maps.flatten(1).amax(dim=1).reshape(-1, *[1] * (maps.dim() - 1))
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


def grad_cam(model: PrognosisModel, batch: Mapping[str, torch.Tensor],
             size: tuple[int, int, int] | None = None, target_class: int = 1) -> torch.Tensor:
    """Grad-CAM of ``target_class`` (1 = bad outcome) on the model's ``gradcam_layer``; (B, *size).

    MONAI's GradCAM: ReLU(sum_k alpha_k A_k) with A_k the k-th channel of the layer's output and
    alpha_k the mean over positions of d logit / d A_k, the gradient flowing through the rest of
    the model (for ICHPro: fusion with the report, header). Up-sampled trilinearly to ``size`` (the
    preprocessed CT's grid; default: the batch's ``ct``) and divided by each patient's maximum, so
    it lies in [0, 1] and keeps its zero. The batch must make the model run that layer (ICHPro: the
    ``ct``, not its features).
    """
    _layer(model)  # a model without a Grad-CAM layer fails here, with a clear error
    size = tuple(batch["ct"].shape[2:]) if size is None else tuple(size)
    grid = torch.zeros(len(next(iter(batch.values()))), 1, *size)
    with explaining(model):
        cam = GradCAM(_BadOutcome(model).eval(), target_layers="features", upsampler=default_upsampler,
                      postprocessing=_per_patient_max)
        maps = cam(grid, class_idx=target_class, **batch)
    return maps.detach()[:, 0]
