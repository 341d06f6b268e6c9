"""Notebook 05, the VTMF loss term by term: a toy batch of 2D embeddings, the temperature sweep, the
gradients each term sends to the reports, MLM masking shown on a report, and which part of the
model each term's gradient reaches."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ichpro.losses import imima_loss, sdm_loss
from ichpro.text import IGNORE_INDEX

#: colours of the good (0) and bad (1) outcomes
OUTCOME_COLOURS = np.array(["C0", "C3"])


def on_circle(angle: torch.Tensor) -> torch.Tensor:
    """Points (N, 2) on the unit circle at the given angles (N,)."""
    return torch.stack([angle.cos(), angle.sin()], dim=1)


def toy_embeddings(generator: torch.Generator, per_outcome: int = 3
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """A toy batch in 2D: CTs of good outcomes around angle 0, bad ones around π, each report near its
    own CT. Returns (vision, {"matched": text, "mismatched": every CT given a report of the other
    outcome}, labels)."""
    labels = torch.arange(2).repeat_interleave(per_outcome)
    angle = labels * math.pi + 0.35 * torch.randn(len(labels), generator=generator)
    text = on_circle(angle + 0.15 * torch.randn(len(labels), generator=generator))
    return on_circle(angle), {"matched": text, "mismatched": text.roll(per_outcome, dims=0)}, labels


def temperature_sweep(vision: torch.Tensor, texts: Mapping[str, torch.Tensor], labels: torch.Tensor,
                      taus: np.ndarray, mix: torch.Tensor) -> pd.DataFrame:
    """SDM and IMIMA of each text set against ``vision`` at every temperature: rows τ, pairs, SDM, IMIMA."""
    return pd.DataFrame([{"τ": float(tau), "pairs": name, "SDM": sdm_loss(vision, text, labels, tau).item(),
                          "IMIMA": imima_loss(vision, text, labels, tau, mix).item()}
                         for tau in taus for name, text in texts.items()])


def plot_temperature_sweep(sweep: pd.DataFrame, tau: float) -> plt.Figure:
    """SDM and IMIMA against τ (log axes), one line per pair set, the profile's τ marked."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, term in zip(axes, ("SDM", "IMIMA")):
        for name, part in sweep.groupby("pairs"):
            ax.plot(part["τ"], part[term], label=f"{name} pairs", color="C0" if name == "matched" else "C3")
        ax.axvline(tau, color="gray", ls="--", lw=1, label=f"profile τ = {tau:g}")
        ax.set(xscale="log", yscale="log", xlabel="temperature τ", ylabel=f"{term} loss",
               title=f"{term} on the toy batch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def report_gradients(losses: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], start: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """The gradient of each loss (a function of the report embeddings) at ``start`` (N, 2)."""
    grads = {}
    for title, loss in losses.items():
        text = start.clone().requires_grad_(True)
        (grads[title],) = torch.autograd.grad(loss(text), text)
    return grads


def _arrows(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Descent steps -grad, length 0.5·sqrt(|grad| / scale): 0.5 at the largest gradient ``scale``."""
    norm = grad.norm(dim=1, keepdim=True)
    return -grad / norm.clamp_min(1e-12) * 0.5 * (norm / scale).sqrt()


def plot_report_gradients(vision: torch.Tensor, start: torch.Tensor, labels: torch.Tensor,
                          grads: Mapping[str, torch.Tensor], shared: tuple[str, ...]) -> plt.Figure:
    """One panel per loss: CTs, reports at ``start`` and the descent direction of each report; the
    panels named in ``shared`` share one arrow scale, every other panel has its own."""
    shared_scale = torch.stack([grads[name].norm(dim=1).max() for name in shared]).max()
    colours = OUTCOME_COLOURS[labels.numpy()]
    fig, axes = plt.subplots(1, len(grads), figsize=(4.4 * len(grads), 4.6))
    for ax, (title, grad) in zip(np.atleast_1d(axes), grads.items()):
        step = _arrows(grad, shared_scale if title in shared else grad.norm(dim=1).max())
        ax.add_patch(plt.Circle((0, 0), 1, fill=False, color="lightgray"))
        for i in range(len(start)):  # each report joined to its own CT; CTs named inside, reports outside
            ax.plot(*torch.stack([vision[i], start[i]]).T, ":", color=colours[i], lw=0.8)
            ax.annotate(f"v{i}", vision[i] * 0.82, ha="center", va="center", fontsize=8)
            ax.annotate(f"t{i}", start[i] * 1.17, ha="center", va="center", fontsize=8)
        ax.scatter(*vision.T, c=colours, marker="o", s=70)
        ax.scatter(*start.T, c=colours, marker="^", s=70)
        ax.quiver(*start.T, *step.T, color=colours, angles="xy", scale_units="xy", scale=1, width=0.008)
        ax.set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), aspect="equal", xticks=[], yticks=[])
        ax.set_title(f"{title}\n|gradient| = {grad.norm().item():.3g}", fontsize=10)
    legend = [Line2D([], [], color="grey", marker="o", ls="", label="CT $v_i$"),
              Line2D([], [], color="grey", marker="^", ls="", label="report $t_i$"),
              Patch(color=OUTCOME_COLOURS[0], label="good outcome"),
              Patch(color=OUTCOME_COLOURS[1], label="bad outcome")]
    np.atleast_1d(axes)[0].legend(handles=legend, loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def masked_report(tokenizer: PreTrainedTokenizerBase, original: torch.Tensor, corrupted: torch.Tensor,
                  target: torch.Tensor) -> str:
    """A report's tokens (L,) up to padding, every predicted one marked: ⟦x→[MASK]⟧ masked, ⟦x→y⟧
    replaced by a random token, ⟦x⟧ kept but still predicted."""
    words = []
    for o, c, label in zip(tokenizer.convert_ids_to_tokens(original),
                           tokenizer.convert_ids_to_tokens(corrupted), target.tolist()):
        if o == tokenizer.pad_token:
            break
        words.append(o if label == IGNORE_INDEX else f"⟦{o}⟧" if c == o else f"⟦{o}→{c}⟧")
    return " ".join(words)


def masking_shares(tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor, corrupted: torch.Tensor,
                   target: torch.Tensor) -> dict[str, float]:
    """Eligible (non-special) tokens, the share of them picked for prediction, and of the picked ones
    the shares shown as [MASK] and left unchanged."""
    eligible = ~torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))
    picked = target != IGNORE_INDEX
    return {"eligible tokens": int(eligible.sum()), "picked share": (picked.sum() / eligible.sum()).item(),
            "of picked: [MASK]": (corrupted[picked] == tokenizer.mask_token_id).float().mean().item(),
            "of picked: unchanged": (corrupted[picked] == input_ids[picked]).float().mean().item()}


def trainable_parts(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's top-level parts (its objective included) -> their trainable parameters; a frozen
    part maps to an empty list. Shared parameters (tied word embeddings) count once, in the first part."""
    parts: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        parts.setdefault(name.split(".")[0], []).extend([param] if param.requires_grad else [])
    return parts


def gradient_reach(model: nn.Module, terms: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Norm of the gradient each loss term (columns) sends to each part of the model (rows); NaN where
    the term has no path to the part, or the part is frozen. The graph is kept for a later backward."""
    parts = trainable_parts(model)
    params = [p for group in parts.values() for p in group]
    table = {}
    for term, value in terms.items():
        grads = dict(zip(map(id, params), torch.autograd.grad(value, params, retain_graph=True,
                                                              allow_unused=True)))
        norms = {part: [grads[id(p)].norm() for p in group if grads[id(p)] is not None]
                 for part, group in parts.items()}
        table[term] = {part: torch.stack(n).norm().item() if n else np.nan for part, n in norms.items()}
    return pd.DataFrame(table)


def reach_labels(reach: pd.DataFrame, model: nn.Module) -> pd.DataFrame:
    """``gradient_reach`` for reading: 3 significant digits, "—" for no path, "frozen" for a frozen part."""
    shown = reach.map(lambda x: "—" if np.isnan(x) else f"{x:.3g}")
    shown.loc[[part for part, group in trainable_parts(model).items() if not group]] = "frozen"
    return shown
