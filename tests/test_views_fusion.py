"""Notebook 04's views: parameter counts against built models, TRT's reading, attention map plots."""

import copy
import json
from dataclasses import replace

import matplotlib.pyplot as plt
import pytest
import torch

from ichpro.config import FUSION_STRUCTURES, get_profile
from ichpro.errors import IchproError
from ichpro.models import build_model
from ichpro.models.fusion import TRT
from ichpro.reports import Report, render
from ichpro.text import _minilm_folder, load_text_backbone, tokenize
from ichpro.views.fusion import (
    DENSE_HEADER,
    attention_map_label,
    attention_spread,
    block_parameters,
    fusion_structure_table,
    padding_attention,
    parameter_counts,
    plot_token_reading,
    profile_blocks,
    shuffled_tokens_change,
    text_hidden_size,
    token_reading,
)

SMOKE = get_profile("smoke")
REPORTS = [render(Report(56, "Female", 45, 20, 13, "Conservative treatment", "Occipital hemorrhage", 0.5)),
           render(Report(81, "Male", 120, 4, 5, "Craniotomy", "Left basal ganglia hemorrhage", 45.0))]


@pytest.fixture(scope="module")
def tiny():
    return load_text_backbone("tiny", reports=REPORTS * 10, seed=0)


def smoke_model(backbone, **changes):
    torch.manual_seed(0)
    return build_model(replace(SMOKE.model, **changes), copy.deepcopy(backbone.model), SMOKE.loss).eval()


def smoke_batch(backbone, size=SMOKE.preprocess.spatial_size):
    batch = tokenize(backbone.tokenizer, REPORTS, SMOKE.model.max_tokens)
    batch["ct"] = torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(0))
    return batch


def numel(module):
    return sum(p.numel() for p in module.parameters())


def test_meta_device_counts_equal_the_blocks_of_a_built_model(tiny):
    rows = {row["block"]: row["parameters"] for row in block_parameters(SMOKE.model)}
    model, positional = smoke_model(tiny), smoke_model(tiny, trt="positional")
    assert rows["VRT"] == numel(model.vrt)
    assert rows["TRT, grid queries"] == numel(model.trt)
    assert rows["TRT, positional map"] == numel(positional.trt)
    assert rows["stage 1: CMAF"] == numel(model.fusion.stages[0])
    assert rows["stage 2: MHSAF"] == numel(model.fusion.stages[1])
    assert rows["up-sampling and 3×3×3 conv"] == numel(model.fusion.tail)
    assert rows["header: per-position linear C → C"] == numel(model.header.project)
    assert rows["header: 1D DenseNet"] == numel(model.header.densenet)


def test_hand_counts_of_vrt_and_the_dense_alternative():
    cfg = replace(SMOKE.model, dim=2, heads=1, grid=(1, 1, 1))  # f_tbv: 2 channels on 2 x 2 x 2 = 8 positions
    rows = {row["block"]: row["parameters"] for row in block_parameters(cfg)}
    assert rows[DENSE_HEADER] == 2 * 8 * 8 + 8  # weights C·|2G| x |2G| and |2G| biases
    c_v = SMOKE.model.vision_widths[3]  # ResNet-10 has basic blocks: C_v = the last width
    assert rows["VRT"] == c_v * 2 + 2 + 2 * 2  # 1x1x1 conv with bias, BatchNorm weight and bias


def test_parameter_counts_table_has_a_column_per_profile_in_block_order():
    table = parameter_counts(("smoke", "cpu"))
    assert list(table.columns) == ["block", "object", "smoke", "cpu"]
    assert list(table["block"]) == [row["block"] for row in block_parameters(SMOKE.model)]
    assert (table["cpu"] > table["smoke"]).all()  # the cpu profile is wider in every block


def test_text_hidden_sizes(tmp_path):
    shipped = json.loads((_minilm_folder() / "config.json").read_text())["hidden_size"]
    assert text_hidden_size("minilm") == shipped and text_hidden_size("tiny") == 64
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 123}))
    assert text_hidden_size(str(tmp_path)) == 123
    with pytest.raises(IchproError, match="no config.json"):
        text_hidden_size(str(tmp_path / "missing"))


def test_padding_attention_is_the_largest_weight_on_a_padded_token():
    attention = torch.zeros(1, 2, 3, 4)  # (B, heads, |G|, L)
    attention[0, 1, 2, 3] = 0.25
    assert padding_attention(attention, torch.tensor([[1, 1, 1, 0]])) == 0.25
    assert padding_attention(attention, torch.tensor([[1, 1, 0, 1]])) == 0.0
    assert padding_attention(attention, torch.ones(1, 4)) == 0.0


def test_token_reading_averages_heads_and_cells_and_drops_padding():
    attention = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]])
    reading = token_reading(["[CLS]", "age"], attention)
    assert reading.index.tolist() == ["[CLS]", "age"] and reading.tolist() == [0.5, 0.5]
    fig = plot_token_reading(reading, "title")
    ax = fig.axes[0]
    assert len(ax.patches) == 2 and [t.get_text() for t in ax.get_xticklabels()] == ["[CLS]", "age"]
    assert ax.get_ylabel() and ax.lines[0].get_ydata()[0] == 0.5  # the uniform share 1/2
    plt.close(fig)


def test_grid_queries_read_words_and_the_positional_map_reads_positions():
    torch.manual_seed(0)
    states, mask = torch.randn(2, 6, 8), torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    queries, positional = (TRT(8, 4, 6, (1, 2, 2), 2, mode).eval() for mode in ("queries", "positional"))
    g = torch.Generator().manual_seed(0)
    assert shuffled_tokens_change(queries, states, mask, g) < 1e-5
    assert shuffled_tokens_change(positional, states, mask, g) > 1e-3


def test_attention_map_labels_read_every_structure(tiny):
    assert attention_map_label("stage1_cmaf_vision_to_text") == "stage 1 CMAF: vision → text"
    assert attention_map_label("stage2_mhsaf_self") == "stage 2 MHSAF: fused grid"
    for structure in FUSION_STRUCTURES:
        for name in smoke_model(tiny, fusion=structure).fusion.map_grids:
            assert "_" not in attention_map_label(name)


def test_attention_spread_is_one_for_a_uniform_map_and_wider_for_a_peaked_one(tiny):
    model = smoke_model(tiny)
    batch = smoke_batch(tiny)
    with torch.no_grad():
        out = model(batch)
    spread = attention_spread(out, 0, tuple(batch["ct"].shape[2:]))
    assert list(spread.index) == [attention_map_label(name) for name in out.attentions]
    assert (spread["min / uniform"] <= 1 + 1e-6).all() and (spread["max / uniform"] >= 1 - 1e-6).all()
    name = next(iter(out.attentions))
    flat = replace(out, attentions={name: torch.ones_like(out.attentions[name])})
    assert spread_of(flat, name, batch) == pytest.approx((1.0, 1.0))
    peaked = torch.zeros_like(out.attentions[name])
    peaked[..., 0] = 1.0  # every query attends to the first cell only
    assert spread_of(replace(out, attentions={name: peaked}), name, batch)[1] > 2


def spread_of(out, name, batch):
    line = attention_spread(out, 0, tuple(batch["ct"].shape[2:])).loc[attention_map_label(name)]
    return line["min / uniform"], line["max / uniform"]


def test_fusion_structure_table_has_one_row_per_structure(tiny):
    model = smoke_model(tiny)
    batch = smoke_batch(tiny, size=(8, 32, 32))  # small CT: the fusion grid is fixed whatever the input
    table = fusion_structure_table(SMOKE.model, copy.deepcopy(tiny.model), SMOKE.loss, batch, 0)
    assert table.index.tolist() == list(FUSION_STRUCTURES)
    assert table.loc["cross-self", "fusion parameters"] == numel(model.fusion)
    assert "CMAF: text → vision" in table.loc["cross", "attention maps (heads, queries, keys)"]


def test_profile_blocks_say_what_each_profile_builds():
    cpu, paper = (profile_blocks(get_profile(name)) for name in ("cpu", "paper"))
    assert cpu[0] == ("cpu profile: CMAF's SoftPool: none: its kernel is 1×1×1, so CMAF attends over the "
                      "full grid (2×4×4 grid).")
    assert "blocks (2, 4, 8, 4)" in cpu[1] and "DenseNet-121 has (6, 12, 24, 16)" in cpu[1]
    assert cpu[2] == "MLM: a masked token is predicted over the words of the cohort's reports."
    assert "kernel 2 on each even side" in paper[0] and "(DenseNet-121's)" in paper[1]
    assert "whole vocabulary" in paper[2]
