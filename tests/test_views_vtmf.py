"""Notebook 05's views: the toy batch, the temperature sweep, report gradients, MLM masking, and which
part of a model each loss term reaches."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from ichpro.losses import imima_loss, sdm_loss
from ichpro.reports import Report, render
from ichpro.text import load_text_backbone
from ichpro.views.vtmf import (
    _arrows,
    gradient_reach,
    masked_report,
    masking_shares,
    on_circle,
    plot_report_gradients,
    plot_temperature_sweep,
    reach_labels,
    report_gradients,
    temperature_sweep,
    toy_embeddings,
)


@pytest.fixture(scope="module")
def tokenizer():
    report = render(Report(56, "Female", 45, 20, 13, "Conservative treatment", "Occipital hemorrhage", 0.5))
    return load_text_backbone("tiny", reports=[report] * 10, seed=0).tokenizer


def test_on_circle_puts_angles_on_the_unit_circle():
    points = on_circle(torch.tensor([0.0, math.pi / 2, math.pi]))
    torch.testing.assert_close(points, torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), atol=1e-6, rtol=0)


def test_toy_batch_mismatches_every_ct_with_a_report_of_the_other_outcome():
    vision, texts, labels = toy_embeddings(torch.Generator().manual_seed(0))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(vision.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(texts["mismatched"], texts["matched"].roll(3, dims=0))
    assert (vision[:3, 0] > 0).all() and (vision[3:, 0] < 0).all()  # good around angle 0, bad around π
    again = toy_embeddings(torch.Generator().manual_seed(0))
    torch.testing.assert_close(again[1]["matched"], texts["matched"])


def test_temperature_sweep_holds_the_loss_values_and_its_plot_human_labels():
    vision, texts, labels = toy_embeddings(torch.Generator().manual_seed(0))
    mix = torch.zeros(2)
    sweep = temperature_sweep(vision, texts, labels, np.array([0.05, 0.5]), mix)
    assert len(sweep) == 4 and set(sweep["pairs"]) == {"matched", "mismatched"}
    row = sweep[(sweep["τ"] == 0.5) & (sweep["pairs"] == "matched")].iloc[0]
    assert row["SDM"] == pytest.approx(sdm_loss(vision, texts["matched"], labels, 0.5).item())
    assert row["IMIMA"] == pytest.approx(imima_loss(vision, texts["matched"], labels, 0.5, mix).item())
    fig = plot_temperature_sweep(sweep, 0.07)
    assert [ax.get_ylabel() for ax in fig.axes] == ["SDM loss", "IMIMA loss"]
    assert all(ax.get_xlabel() == "temperature τ" and ax.get_xscale() == "log" for ax in fig.axes)
    plt.close(fig)


def test_report_gradients_and_arrow_lengths():
    start = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    grads = report_gradients({"square": lambda t: (t ** 2).sum()}, start)
    torch.testing.assert_close(grads["square"], 2 * start)
    steps = _arrows(grads["square"], grads["square"].norm(dim=1).max())
    torch.testing.assert_close(steps.norm(dim=1), torch.tensor([0.5, 0.5 * math.sqrt(0.5)]))
    assert ((steps * grads["square"]).sum(dim=1) < 0).all()  # descent: against the gradient


def test_gradient_panels_share_a_scale_only_where_asked():
    vision, texts, labels = toy_embeddings(torch.Generator().manual_seed(0))
    start = texts["matched"]
    grads = {"a": torch.ones(6, 2), "b": 0.25 * torch.ones(6, 2), "c": 0.25 * torch.ones(6, 2)}
    fig = plot_report_gradients(vision, start, labels, grads, shared=("a", "b"))
    lengths = [np.hypot(ax.collections[-1].U, ax.collections[-1].V) for ax in fig.axes]
    np.testing.assert_allclose(lengths[0], 0.5, rtol=1e-5)  # the shared maximum
    np.testing.assert_allclose(lengths[1], 0.25, rtol=1e-5)  # a quarter of it: sqrt(1/4) of the length
    np.testing.assert_allclose(lengths[2], 0.5, rtol=1e-5)  # its own scale
    labels_shown = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels_shown == ["CT $v_i$", "report $t_i$", "good outcome", "bad outcome"]
    plt.close(fig)


def test_masked_report_marks_masked_replaced_and_kept_tokens(tokenizer):
    words = ["[CLS]", "age", ":", "56", "gender", "[SEP]", "[PAD]"]
    original = torch.tensor(tokenizer.convert_tokens_to_ids(words))
    corrupted = original.clone()
    corrupted[1], corrupted[3] = tokenizer.mask_token_id, tokenizer.convert_tokens_to_ids("45")
    target = torch.full_like(original, -100)
    target[[1, 3, 4]] = original[[1, 3, 4]]
    shown = masked_report(tokenizer, original, corrupted, target)
    assert shown == "[CLS] ⟦age→[MASK]⟧ : ⟦56→45⟧ ⟦gender⟧ [SEP]"  # padding dropped
    shares = masking_shares(tokenizer, original[None], corrupted[None], target[None])
    assert shares["eligible tokens"] == 4 and shares["picked share"] == pytest.approx(3 / 4)
    assert shares["of picked: [MASK]"] == pytest.approx(1 / 3)
    assert shares["of picked: unchanged"] == pytest.approx(1 / 3)


class ThreeParts(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(2, 1), nn.Linear(2, 1), nn.Linear(2, 1)
        self.c.requires_grad_(False)


def test_gradient_reach_gives_each_terms_norm_per_part_and_marks_frozen_parts():
    model, x = ThreeParts(), torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    terms = {"A": model.a(x).sum(), "A+B+C": (model.a(x) + model.b(x) + model.c(x)).sum()}
    reach = gradient_reach(model, terms)
    expected = math.sqrt(4.0 ** 2 + 1.0 ** 2 + 2.0 ** 2)  # d/dW = sum of inputs (4, 1), d/db = batch size 2
    assert reach.loc["a", "A"] == pytest.approx(expected)
    assert reach.loc["b", "A+B+C"] == pytest.approx(expected)
    assert np.isnan(reach.loc["b", "A"]) and reach.loc[["c"]].isna().all(axis=None)
    shown = reach_labels(reach, model)
    assert shown.loc["b", "A"] == "—" and (shown.loc["c"] == "frozen").all()
    assert shown.loc["a", "A"] == f"{expected:.3g}"
