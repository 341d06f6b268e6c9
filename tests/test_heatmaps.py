"""Which heat map a user gets: the default follows notebook 11's localisation table, and each kind
says what it is."""

import pandas as pd
import pytest
import torch

from ichpro.config import REPO_ROOT, get_profile
from ichpro.errors import IchproError
from ichpro.heatmaps import (
    DEFAULT_HEATMAP,
    GRAD_CAM,
    choose_heatmap,
    describe_heatmap,
    heatmap,
    heatmap_kinds,
)
from ichpro.models.comparators import build_comparator
from ichpro.views.clinical import best_localising_map, describe_default_heatmap

LOCALISATION = REPO_ROOT / "figures" / "attention_localisation_summary.csv"
SMOKE = get_profile("smoke")


def test_the_default_heat_map_is_the_best_localising_map_of_the_committed_results():
    assert DEFAULT_HEATMAP == best_localising_map(pd.read_csv(LOCALISATION))
    assert describe_default_heatmap(LOCALISATION).startswith(
        f"default heat map: {DEFAULT_HEATMAP}; notebook 11's best")


def test_the_best_localising_map_must_point_above_chance():
    table = pd.DataFrame({"method": ["a", "b"], "ratio": [5.0, 2.0], "pointing_ci_low": [0.01, 0.3],
                          "pointing_chance": [0.05, 0.05]})
    assert best_localising_map(table) == "b"  # a holds more mass but does not point above chance


def test_a_model_without_grad_cam_gets_its_attention_and_every_kind_is_checked():
    ct = {"ct": torch.rand(2, 1, 16, 32, 32)}
    slices = build_comparator("slice2d", SMOKE.model)
    assert heatmap_kinds(slices, ct) == ["slice_attention", "slice_attention_x_gradient"]
    assert choose_heatmap(slices, ct) == "slice_attention"
    volume = heatmap(slices, ct, "slice_attention")
    assert volume.shape == (2, 16, 32, 32)  # each voxel holds its slice's share: the 16 shares sum to 1
    assert volume.mean(dim=(1, 2, 3)).tolist() == pytest.approx([1 / 16, 1 / 16], rel=1e-4)
    cnn = build_comparator("small3dcnn", SMOKE.model)
    assert choose_heatmap(cnn, ct) == GRAD_CAM == DEFAULT_HEATMAP
    with pytest.raises(IchproError,
                       match="Small3DCNN draws no heat map 'slice_attention'; it draws grad_cam"):
        heatmap(cnn, ct, "slice_attention")


def test_each_kind_says_what_it_is():
    assert describe_heatmap("grad_cam") == "Grad-CAM"
    assert describe_heatmap("stage1_cmaf_text_to_vision") == "raw attention stage1_cmaf_text_to_vision"
    assert describe_heatmap("stage2_mhsaf_self_x_gradient") == "attention stage2_mhsaf_self × its gradient"
