"""ICHPro's joint-attention fusion: TRT, VRT, SoftPool3d, CMAF, MHSAF and the six fusion structures.

The paper names the blocks but not their equations; the choices below are ours and are repeated in
notebook 04 next to the code:

* **VRT** (vision representation transform): a 1×1×1 convolution C_v → C with batch
  normalisation and adaptive average pooling of the last ResNet feature map to a grid G = (d, h, w).
* **TRT** (text representation transform): the report's token states (from the text encoder's
  ``text_layers``-th layer), normalised and mapped H -> C, are read by one learned query per grid
  cell (a learned vector plus a 3D position embedding, the sum of one learned vector per depth, row
  and column index), which attends over the tokens, masked at padding: a text *pseudo-volume*
  aligned with the vision grid. Its token attention (which words each cell reads) is returned.
  ``trt="positional"`` keeps the earlier reading instead: a learned token-mixing map L -> |G| over
  token *positions*, which moves with the report's layout and has no attention to show.
* **CMAF** (cross-modal attention fusion): both grids are reduced by SoftPool3d (pure PyTorch;
  kernel ``cmaf_pool``, by default 2 along every even grid side), then attend to each other in
  both directions (vision queries → text keys/values and the reverse).
  Each modality's Q, K, V projections carry softmax-normalised learnable gains, and a learnable
  softmax pair (w1, w2) weights the two directions. The pooled inputs are residual branches; the
  two results are concatenated, up-sampled back to the grid and mixed by a 1×1×1 convolution.
* **MHSAF** (multi-head self-attention fusion): self-attention over the fused grid tokens with a
  residual connection and LayerNorm.
* **Self** as a *first* stage (the "Self" rows of Table 2): joint self-attention over the union of
  vision and text tokens, whose two halves are summed back into one grid.
* After the last stage: up-sampling ×2 and a 3×3×3 convolution give the text-based vision
  representation f_tbv.
* A **single modality** (the "Text only" and "Vision only" rows of Table 1): one MHSAF stage over
  that modality's grid replaces the fusion, followed by the same up-sampling and convolution.

Every attention block returns its attention weights (B, heads, queries, keys); rows sum to 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ichpro.config import FUSION_STRUCTURES, MODALITIES
from ichpro.errors import IchproError

Grid = tuple[int, int, int]


def tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, d, h, w) -> (B, d·h·w, C)."""
    return grid.flatten(2).transpose(1, 2)


def to_grid(seq: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, d·h·w, C) -> (B, C, d, h, w)."""
    return seq.transpose(1, 2).reshape(seq.shape[0], seq.shape[2], *grid)


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention, returning the output (B, Nq, C) and weights (B, heads, Nq, Nk).

    ``key_mask`` (B, Nk), true (or 1) at the keys that may be attended, gives the others weight 0.
    """
    b, nq, c = q.shape
    split = lambda x: x.reshape(b, x.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // heads)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    weights = scores.float().softmax(dim=-1).to(q.dtype)
    out = (weights @ split(v)).transpose(1, 2).reshape(b, nq, c)
    return out, weights


class SoftPool3d(nn.Module):
    """SoftPool (Stergiou et al. 2021): each window's softmax-weighted mean, sum(e^x·x)/sum(e^x).

    Non-overlapping windows (stride = kernel); each spatial size must be divisible by the kernel.
    The window maximum is subtracted before exponentiating, so it is exact and overflow-free.
    """

    def __init__(self, kernel_size: Grid):
        super().__init__()
        self.kernel_size = tuple(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % k for s, k in zip(x.shape[2:], self.kernel_size)):
            raise IchproError(f"SoftPool3d: size {tuple(x.shape[2:])} not divisible by {self.kernel_size}")
        peak = F.max_pool3d(x, self.kernel_size)
        weights = torch.exp(x - F.interpolate(peak, size=x.shape[2:], mode="nearest"))
        return F.avg_pool3d(weights * x, self.kernel_size) / F.avg_pool3d(weights, self.kernel_size)


class FlatLinear(nn.Linear):
    """``nn.Linear`` over the last dimension of (..., C), computed as one (N, C) matrix product
    whatever the leading dimensions: the same function, but a batched fit (``vmap`` over stacked
    weights, :mod:`ichpro.ensemble`) then runs one batched matmul per layer instead of one per sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)


class Pointwise(FlatLinear):
    """A 1×1×1 convolution (B, C_in, ...) -> (B, C_out, ...) written as a linear map of the channels:
    the function of ``nn.Conv3d(kernel_size=1)``, computed as a matrix product, which a batched fit
    runs as one batched matmul instead of a slow grouped convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class VRT(nn.Module):
    """Vision representation transform: 1×1×1 conv C_v -> C with batch normalisation, adaptive
    pooling to the grid. The normalisation puts pretrained (often frozen) features on the scale
    the fusion expects, whatever statistics the encoder's own BatchNorm layers carry."""

    def __init__(self, in_channels: int, dim: int, grid: Grid):
        super().__init__()
        self.project = Pointwise(in_channels, dim)
        self.norm = nn.BatchNorm3d(dim)
        self.pool = nn.AdaptiveAvgPool3d(grid)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.pool(self.norm(self.project(features)))


TRT_MODES = ("queries", "positional")


class TRT(nn.Module):
    """Text representation transform: token states (B, L, H) -> text pseudo-volume (B, C, *grid).

    ``mode="queries"``: one learned query per grid cell (plus a 3D position embedding) attends over
    the tokens; ``mode="positional"``: a learned map from token positions L -> |G|. Both return
    ``(grid, token_attention)``, the latter (B, heads, |G|, L) or None for the positional map.
    """

    def __init__(self, hidden: int, dim: int, max_tokens: int, grid: Grid, heads: int,
                 mode: str = "queries"):
        super().__init__()
        if mode not in TRT_MODES:
            raise IchproError(f"unknown TRT mode {mode!r}; choose one of {TRT_MODES}")
        self.grid, self.max_tokens, self.heads, self.mode = grid, max_tokens, heads, mode
        self.project = nn.Sequential(nn.LayerNorm(hidden), FlatLinear(hidden, dim))
        if mode == "positional":
            self.mix = FlatLinear(max_tokens, math.prod(grid))
            return
        self.queries = nn.Parameter(torch.randn(math.prod(grid), dim) * dim ** -0.5)
        self.axes = nn.ParameterList([nn.Parameter(torch.randn(g, dim) * dim ** -0.5) for g in grid])
        self.q, self.kv = FlatLinear(dim, dim), FlatLinear(dim, 2 * dim)
        self.out = FlatLinear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def position_embedding(self) -> torch.Tensor:
        """(|G|, C): the sum of the cell's depth, row and column embeddings, in (d, h, w) order."""
        depth, rows, columns = self.axes
        return (depth[:, None, None] + rows[None, :, None] + columns[None, None, :]).flatten(0, 2)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.project(states)  # (B, L, C)
        if self.mode == "positional":
            x = x * attention_mask.unsqueeze(-1).to(x.dtype)  # padded tokens contribute nothing
            x = F.pad(x, (0, 0, 0, self.max_tokens - x.shape[1]))  # pad L to max_tokens
            return self.mix(x.transpose(1, 2)).reshape(x.shape[0], -1, *self.grid), None
        query = (self.queries + self.position_embedding()).expand(x.shape[0], -1, -1)
        k, v = self.kv(x).chunk(2, dim=-1)
        read, weights = multi_head_attention(self.q(query), k, v, self.heads, key_mask=attention_mask)
        return to_grid(self.norm(query + self.out(read)), self.grid), weights


class CMAF(nn.Module):
    """Cross-modal attention fusion of a vision grid and a text grid (see the module docstring)."""

    def __init__(self, dim: int, heads: int, grid: Grid, pool: Grid | None = None):
        super().__init__()
        self.heads = heads
        self.grid = grid
        self.pool = SoftPool3d(tuple(2 if g % 2 == 0 else 1 for g in grid) if pool is None else pool)
        self.pooled_grid = tuple(g // k for g, k in zip(grid, self.pool.kernel_size))
        self.qkv_vision = FlatLinear(dim, 3 * dim)
        self.qkv_text = FlatLinear(dim, 3 * dim)
        self.gain_vision = nn.Parameter(torch.zeros(3))  # softmax-normalised gains on Q, K, V
        self.gain_text = nn.Parameter(torch.zeros(3))
        self.direction = nn.Parameter(torch.zeros(2))  # (w1, w2) after softmax
        self.mix = Pointwise(2 * dim, dim)

    def _qkv(self, x: torch.Tensor, linear: nn.Linear, gain: torch.Tensor) -> list[torch.Tensor]:
        g = 3 * gain.softmax(dim=0)  # gains sum to 3: all ones at initialisation
        return [g[i] * part for i, part in enumerate(linear(x).chunk(3, dim=-1))]

    def forward(self, vision: torch.Tensor, text: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        v, t = self.pool(vision), self.pool(text)  # SoftPool residual branches
        qv, kv, vv = self._qkv(tokens(v), self.qkv_vision, self.gain_vision)
        qt, kt, vt = self._qkv(tokens(t), self.qkv_text, self.gain_text)
        vision_out, vision_to_text = multi_head_attention(qv, kt, vt, self.heads)
        text_out, text_to_vision = multi_head_attention(qt, kv, vv, self.heads)
        w = self.direction.softmax(dim=0)
        fused_v = v + w[0] * to_grid(vision_out, self.pooled_grid)
        fused_t = t + w[1] * to_grid(text_out, self.pooled_grid)
        fused = torch.cat([fused_v, fused_t], dim=1)
        fused = F.interpolate(fused, size=self.grid, mode="trilinear", align_corners=False)
        return self.mix(fused), {"vision_to_text": vision_to_text, "text_to_vision": text_to_vision}


class MHSAF(nn.Module):
    """Multi-head self-attention fusion over grid tokens, with residual and LayerNorm."""

    def __init__(self, dim: int, heads: int, grid: Grid):
        super().__init__()
        self.heads = heads
        self.grid = grid
        self.qkv = FlatLinear(dim, 3 * dim)
        self.out = FlatLinear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention over a token sequence (B, N, C)."""
        out, weights = multi_head_attention(*self.qkv(x).chunk(3, dim=-1), self.heads)
        return self.norm(x + self.out(out)), weights

    def forward(self, fused: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out, weights = self.attend(tokens(fused))
        return to_grid(out, self.grid), {"self": weights}


class JointSelfAttention(MHSAF):
    """The first stage of the Self structures: self-attention over vision and text tokens together,
    whose vision and text halves are summed back into one grid."""

    def forward(self, vision: torch.Tensor, text: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out, weights = self.attend(torch.cat([tokens(vision), tokens(text)], dim=1))
        n = out.shape[1] // 2
        return to_grid(out[:, :n] + out[:, n:], self.grid), {"joint": weights}


class FusionStack(nn.Module):
    """One of the six fusion structures (or self-attention over one modality), then up-sampling ×2
    and a 3×3×3 conv (f_tbv)."""

    def __init__(self, structure: str, dim: int, heads: int, grid: Grid, modality: str = "both",
                 cmaf_pool: Grid | None = None):
        super().__init__()
        if structure not in FUSION_STRUCTURES:
            raise IchproError(f"unknown fusion structure {structure!r}; choose one of {FUSION_STRUCTURES}")
        if modality not in MODALITIES:
            raise IchproError(f"unknown modality {modality!r}; choose one of {MODALITIES}")
        if dim % heads:
            raise IchproError(f"fusion width {dim} is not divisible by {heads} attention heads")
        self.stages = nn.ModuleList()
        self.map_grids: dict[str, Grid] = {}  # attention map name -> grid of its key positions
        kinds = structure.split("-") if modality == "both" else ["self-over-one"]
        for i, kind in enumerate(kinds):
            if kind == "cross":
                stage, keys = CMAF(dim, heads, grid, cmaf_pool), ("vision_to_text", "text_to_vision")
            elif i == 0 and kind == "self":
                stage, keys = JointSelfAttention(dim, heads, grid), ("joint",)
            else:
                stage, keys = MHSAF(dim, heads, grid), ("self",)
            self.stages.append(stage)
            for key in keys:
                self.map_grids[self._map_name(i, stage, key)] = getattr(stage, "pooled_grid", grid)
        self.tail = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            nn.Conv3d(dim, dim, kernel_size=3, padding=1),
            nn.BatchNorm3d(dim),
            nn.ReLU(inplace=True),
        )

    def forward(self, vision: torch.Tensor | None, text: torch.Tensor | None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Fuse the two grids (B, C, *grid); with a single modality the other one is None."""
        maps: dict[str, torch.Tensor] = {}
        fused = vision if text is None else text if vision is None else None
        for i, stage in enumerate(self.stages):
            if fused is None:
                fused, found = stage(vision, text)
            elif isinstance(stage, CMAF):  # a later cross stage fuses the result with the text again
                fused, found = stage(fused, text)
            else:
                fused, found = stage(fused)
            maps.update({self._map_name(i, stage, key): w for key, w in found.items()})
        return self.tail(fused), maps

    @staticmethod
    def _map_name(index: int, stage: nn.Module, key: str) -> str:
        kind = {CMAF: "cmaf", MHSAF: "mhsaf", JointSelfAttention: "self"}[type(stage)]
        return f"stage{index + 1}_{kind}_{key}"
