"""Notebook 03's views: feature energy, the pretraining figure, the sizes table."""

import pytest
import torch

from ichpro.config import PAPER_WINDOW, PROFILES
from ichpro.data import windowed
from ichpro.views.encoders import (
    PRETRAINING_PANELS,
    encoder_sizes,
    feature_energy,
    plot_feature_energy,
    plot_pretraining,
)


def test_feature_energy_is_the_channel_mean_square_divided_by_each_patients_maximum():
    features = torch.zeros(2, 2, 1, 1, 2)
    features[0, :, 0, 0, 0] = torch.tensor([1.0, 1.0])  # mean square 1
    features[0, :, 0, 0, 1] = torch.tensor([2.0, 0.0])  # mean square 2
    energy = feature_energy(features, (1, 1, 2))
    assert energy.shape == (2, 1, 1, 2)
    assert energy[0].flatten().tolist() == pytest.approx([0.5, 1.0])
    assert energy[1].abs().sum() == 0  # an all-zero map stays zero, not NaN
    assert feature_energy(features, (2, 4, 8)).shape == (2, 2, 4, 8)


def test_plot_feature_energy_shows_the_blood_slice_and_one_labelled_colour_scale():
    ct = torch.zeros(4, 6, 6)
    ct[2, 1:4, 1:4] = float(windowed(70.0, PAPER_WINDOW))  # blood only on slice 2
    maps = {"untrained": torch.rand(4, 6, 6), "pretrained": torch.rand(4, 6, 6)}
    fig = plot_feature_energy(ct, maps, PAPER_WINDOW, "P1")
    image_axes = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert image_axes[0].get_title() == "P1: input slice 2"
    assert [ax.images[0].get_clim() for ax in image_axes[1:]] == [(0, 1), (0, 1)]
    assert all(name in ax.get_title() for ax, name in zip(image_axes[1:], maps))
    assert any(ax.get_ylabel() == "share of the map's maximum" for ax in fig.axes)


def test_plot_pretraining_labels_each_held_out_measure_and_marks_the_kept_epoch():
    history = [{"epoch": e, "held_out_loss": 3.0 - e, "held_out_dice": 0.1 * e, "held_out_hard_dice": 0.2 * e,
                "held_out_volume_mae_ml": 10.0 / e} for e in (1, 2, 3)]
    fig = plot_pretraining({"history": history, "best_epoch": 2})
    assert [ax.get_ylabel() for ax in fig.axes] == [label for _, label, _ in PRETRAINING_PANELS]
    assert all(ax.get_xlabel() == "epoch" for ax in fig.axes)
    assert [ax.lines[-1].get_xdata()[0] for ax in fig.axes] == [2, 2, 2]
    assert [len(ax.lines) for ax in fig.axes] == [2, 3, 2]  # both Dice lines, each with the kept epoch
    assert "kept: epoch 2" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    older = [{k: v for k, v in h.items() if k != "held_out_hard_dice"} for h in history]
    assert len(plot_pretraining({"history": older, "best_epoch": 2}).axes[1].lines) == 2


def test_encoder_sizes_counts_the_encoders_a_profile_uses():
    table = encoder_sizes(["Age: 70\nGCS Score: 15", "Age: 55\nVolume: 10 ml"], {"smoke": PROFILES["smoke"]})
    row = table.loc["smoke"]
    assert (row["vision"], row["C_v"], row["text"], row["H"]) == ("ResNet-10", 64, "tiny", 64)
    assert row["text layers"] == 2
    assert 0 < row["text M"] < row["vision M"] < 1
