"""Notebook 04, the joint-attention fusion block by block: parameter counts of every block at each
profile's size, which words TRT reads, attention maps over the CT, and the six fusion structures."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from ichpro.config import FUSION_STRUCTURES, LossConfig, ModelConfig, Profile, get_profile
from ichpro.errors import IchproError
from ichpro.models import ModelOutput, build_model
from ichpro.models.encoders import VisionEncoder
from ichpro.models.fusion import TRT, VRT, FusionStack
from ichpro.models.heads import SequenceHeader
from ichpro.text import TINY_SIZES
from ichpro.views.source import qualified_name

#: hidden size H of the named text encoders (BioClinicalBERT is a BERT-base: 768)
TEXT_HIDDEN_SIZES = {"tiny": TINY_SIZES["hidden_size"], "minilm": 384, "bioclinicalbert": 768}
DENSE_HEADER = "alternative: one linear map from all C·|2G| values of f_tbv to a |2G|-long sequence"
#: what each part of an attention map's name means (``FusionStack._map_name``)
_KINDS = {"cmaf": "CMAF", "mhsaf": "MHSAF", "self": "joint self-attention"}
_KEYS = {"vision_to_text": "vision → text", "text_to_vision": "text → vision", "self": "fused grid",
         "joint": "vision and text"}


def text_hidden_size(name: str) -> int:
    """Hidden size H of a named text encoder, or of a local folder's ``config.json``."""
    if name in TEXT_HIDDEN_SIZES:
        return TEXT_HIDDEN_SIZES[name]
    config = Path(name) / "config.json"
    if not config.is_file():
        raise IchproError(f"text encoder {name!r}: no config.json in that folder; use one of "
                          f"{', '.join(TEXT_HIDDEN_SIZES)} or a local BERT folder")
    return int(json.loads(config.read_text())["hidden_size"])


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def block_parameters(cfg: ModelConfig) -> list[dict[str, object]]:
    """Parameters of every fusion block and of the header, built as ``ICHPro`` builds them but on
    PyTorch's meta device (shapes only, no memory): rows of block, implementing object, count."""
    hidden = text_hidden_size(cfg.text_encoder)
    positions = 8 * math.prod(cfg.grid)  # f_tbv's grid 2G
    with torch.device("meta"):
        in_channels = VisionEncoder(cfg.vision_depth, cfg.vision_widths, cfg.vision_no_max_pool).out_channels
        trt = {mode: TRT(hidden, cfg.dim, cfg.max_tokens, cfg.grid, cfg.heads, mode)
               for mode in ("queries", "positional")}
        fusion = FusionStack(cfg.fusion, cfg.dim, cfg.heads, cfg.grid, cfg.modality, cfg.cmaf_pool)
        header = SequenceHeader(cfg.dim, cfg.header_blocks, cfg.header_growth)
        vrt, dense = VRT(in_channels, cfg.dim, cfg.grid), nn.Linear(cfg.dim * positions, positions)
    stack, head = qualified_name(FusionStack), qualified_name(SequenceHeader)
    blocks = [("VRT", qualified_name(VRT), vrt),
              ("TRT, grid queries", f"{qualified_name(TRT)}(mode='queries')", trt["queries"]),
              ("TRT, positional map", f"{qualified_name(TRT)}(mode='positional')", trt["positional"])]
    blocks += [(f"stage {i + 1}: {type(stage).__name__}", f"{stack}.stages[{i}]", stage)
               for i, stage in enumerate(fusion.stages)]
    blocks += [("up-sampling and 3×3×3 conv", f"{stack}.tail", fusion.tail),
               ("header: per-position linear C → C", f"{head}.project", header.project),
               ("header: 1D DenseNet", f"{head}.densenet", header.densenet),
               (DENSE_HEADER, "torch.nn.Linear, not part of the model", dense)]
    return [{"block": block, "object": name, "parameters": _count(module)} for block, name, module in blocks]


def parameter_counts(profiles: Iterable[str] = ("smoke", "cpu", "paper")) -> pd.DataFrame:
    """Parameters per block (rows) and profile (columns), with the implementing object."""
    long = pd.DataFrame([row | {"profile": name} for name in profiles
                         for row in block_parameters(get_profile(name).model)])
    long["block"] = pd.Categorical(long["block"], categories=list(dict.fromkeys(long["block"])))
    wide = long.pivot(index=["block", "object"], columns="profile", values="parameters")
    wide = wide[list(dict.fromkeys(long["profile"]))].reset_index().rename_axis(columns=None)
    return wide.astype({"block": str})


def padding_attention(token_attention: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """The largest attention weight any grid cell gives a padded token (B, heads, |G|, L)."""
    padded = attention_mask == 0
    return float(token_attention.permute(0, 3, 1, 2)[padded].abs().max()) if padded.any() else 0.0


def token_reading(tokens: list[str], token_attention: torch.Tensor) -> pd.Series:
    """One report's attention per token (heads, |G|, L), averaged over heads and grid cells, for its
    ``tokens`` (the unpadded ones, in order)."""
    read = token_attention.detach().float().mean(dim=(0, 1))[: len(tokens)]
    return pd.Series(read.numpy(), index=tokens, name="attention")


def plot_token_reading(reading: pd.Series, title: str) -> plt.Figure:
    """Bars of the attention each token receives, with the uniform share 1/L marked."""
    fig, ax = plt.subplots(figsize=(min(16, 0.28 * len(reading) + 2), 2.6))
    ax.bar(range(len(reading)), reading.to_numpy(), color="tab:blue")
    ax.axhline(1 / len(reading), color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(reading)), reading.index, rotation=90, fontsize=7)
    ax.set(ylabel="attention weight\n(mean over cells, heads)",
           title=f"{title}\ndashed: the uniform share, 1 / number of tokens")
    return fig


def shuffled_tokens_change(trt: TRT, states: torch.Tensor, attention_mask: torch.Tensor,
                           generator: torch.Generator) -> float:
    """Largest change of TRT's pseudo-volume when the token states (and mask) are put in another order."""
    order = torch.randperm(states.shape[1], generator=generator)
    with torch.no_grad():
        grid, _ = trt(states, attention_mask)
        shuffled, _ = trt(states[:, order], attention_mask[:, order])
    return float((grid - shuffled).abs().max())


def attention_map_label(name: str) -> str:
    """A reader's label for an attention map name such as ``stage1_cmaf_vision_to_text``."""
    stage, kind, key = name.split("_", 2)
    return f"stage {stage.removeprefix('stage')} {_KINDS[kind]}: {_KEYS[key]}"


def attention_spread(out: ModelOutput, patient: int, size: tuple[int, int, int]) -> pd.DataFrame:
    """How far each attention map of ``out`` is from uniform for one patient: the smallest and largest
    attention a voxel receives divided by the uniform share (1 = uniform), on the input grid ``size``."""
    lines = []
    for name in out.attentions:
        received = out.attention_volume(name, size)[patient].detach()
        relative = received / received.mean()
        lines.append({"map": attention_map_label(name), "min / uniform": float(relative.min()),
                      "max / uniform": float(relative.max())})
    return pd.DataFrame(lines).set_index("map")


def fusion_structure_table(cfg: ModelConfig, text_model: nn.Module, loss: LossConfig,
                           batch: Mapping[str, torch.Tensor], seed: int) -> pd.DataFrame:
    """For each of the six fusion structures (untrained, same seed): fusion parameters, attention
    maps (name: heads, queries, keys) and the forward time of ``batch``."""
    rows = []
    for structure in FUSION_STRUCTURES:
        torch.manual_seed(seed)
        model = build_model(replace(cfg, fusion=structure), text_model, loss).eval()
        start = time.perf_counter()
        with torch.no_grad():
            out = model(batch)
        rows.append({"structure": structure, "fusion parameters": _count(model.fusion),
                     "attention maps (heads, queries, keys)": "; ".join(
                         f"{attention_map_label(n)} {tuple(a.shape[1:])}" for n, a in out.attentions.items()),
                     "forward ms": round(1000 * (time.perf_counter() - start))})
    return pd.DataFrame(rows).set_index("structure")


def profile_blocks(profile: Profile) -> list[str]:
    """How a profile builds the blocks whose prose differs between profiles: CMAF's SoftPool, the
    header's DenseNet blocks and the MLM's vocabulary (so that a notebook prints what its run uses)."""
    m, loss = profile.model, profile.loss
    pool = m.cmaf_pool
    softpool = ("none: its kernel is 1×1×1, so CMAF attends over the full grid" if pool == (1, 1, 1)
                else "kernel 2 on each even side of the grid" if pool is None
                else f"kernel {'×'.join(map(str, pool))}")
    vocabulary = ("the words of the cohort's reports" if loss.mlm_vocabulary == "reports"
                  else "the text encoder's whole vocabulary")
    return [f"{profile.name} profile: CMAF's SoftPool: {softpool} ({'×'.join(map(str, m.grid))} grid).",
            f"Header: 1D DenseNet with dense blocks {m.header_blocks}, growth rate {m.header_growth}"
            + (" (DenseNet-121's)." if tuple(m.header_blocks) == (6, 12, 24, 16) else
               " (DenseNet-121 has (6, 12, 24, 16))."),
            f"MLM: a masked token is predicted over {vocabulary}."]
