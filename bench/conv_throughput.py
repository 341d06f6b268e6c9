"""Plain Conv3d throughput of this machine vs the vision encoder's training throughput (target: >= 0.5).

    .venv/bin/python bench/conv_throughput.py [--profile smoke cpu] [--batch 4] [--repeats 3] [--threads N]
                                              [--quick]

The representative layer is the encoder's own heaviest Conv3d configuration (channels, kernel,
stride and input shape of the convolutions doing the most work), run alone. Both sides are timed
on forward + backward and their FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode``;
throughput = FLOPs / median seconds. Four variants: fp32 or bf16 autocast, contiguous or
``channels_last_3d`` (layer or encoder and input), all timed alternately. The ratio is encoder
GFLOP/s / layer GFLOP/s of the same variant. ``--profile paper`` (32 x 512 x 512, ResNet-50) needs
``--batch 1`` and minutes.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import Counter

import common
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ichpro.models.encoders import VisionEncoder

TARGET = 0.5
VARIANTS = [(dtype, layout) for dtype in ("fp32", "bf16") for layout in ("contiguous", "channels_last_3d")]


def heaviest_conv(encoder: nn.Module, ct: torch.Tensor) -> tuple[nn.Conv3d, tuple[int, ...]]:
    """The Conv3d configuration with the most forward FLOPs in one pass, and its input shape."""
    work: Counter = Counter()
    examples: dict[tuple, nn.Conv3d] = {}

    def hook(module: nn.Conv3d, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
               module.groups, module.bias is not None, tuple(inputs[0].shape))
        work[key] += 2 * output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        examples[key] = module

    handles = [m.register_forward_hook(hook) for m in encoder.modules() if isinstance(m, nn.Conv3d)]
    with torch.no_grad():
        encoder(ct)
    for handle in handles:
        handle.remove()
    key = work.most_common(1)[0][0]
    m = examples[key]
    layer = nn.Conv3d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, groups=m.groups,
                      bias=m.bias is not None)
    return layer, key[-1]


def variant_step(module: nn.Module, x: torch.Tensor, dtype: str, layout: str):
    """A forward + backward closure of ``module`` on ``x`` in the given precision and memory layout."""
    if layout == "channels_last_3d":
        module = module.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    else:
        module = module.to(memory_format=torch.contiguous_format)
    x = x.detach().requires_grad_(x.shape[1] > 1)  # a hidden layer's input needs its gradient

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext():
            out = module(x)
        out.backward(torch.ones_like(out))
        module.zero_grad(set_to_none=True)
        x.grad = None

    return step


def flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure(name: str, batch: int, repeats: int) -> tuple[list[list[object]], str]:
    profile = common.bench_profile(name)
    cfg = profile.model
    torch.manual_seed(0)
    encoder = VisionEncoder(cfg.vision_depth, cfg.vision_widths, cfg.vision_no_max_pool).train()
    ct = torch.rand(batch, 1, *profile.preprocess.spatial_size)
    layer, shape = heaviest_conv(encoder, ct)
    layer_input = torch.randn(shape)
    steps = {}
    for dtype, layout in VARIANTS:
        # separate copies: a module's memory format is changed in place
        steps[("layer", dtype, layout)] = variant_step(copy.deepcopy(layer), layer_input, dtype, layout)
        steps[("encoder", dtype, layout)] = variant_step(copy.deepcopy(encoder), ct, dtype, layout)
    work = {"layer": flops(steps[("layer", "fp32", "contiguous")]),
            "encoder": flops(steps[("encoder", "fp32", "contiguous")])}
    seconds = common.interleaved(steps, repeats, warmup=1)
    k = layer.kernel_size[0]
    label = (f"Conv3d {layer.in_channels}->{layer.out_channels}, {k}x{k}x{k}, stride {layer.stride[0]}, "
             f"input {'x'.join(map(str, shape))}")
    rows = []
    for dtype, layout in VARIANTS:
        layer_rate = work["layer"] / seconds[("layer", dtype, layout)] / 1e9
        encoder_rate = work["encoder"] / seconds[("encoder", dtype, layout)] / 1e9
        ratio = encoder_rate / layer_rate
        rows.append([name, dtype, layout, seconds[("layer", dtype, layout)], layer_rate,
                     seconds[("encoder", dtype, layout)], encoder_rate, ratio,
                     common.verdict(ratio >= TARGET)])
    best = max(rows, key=lambda row: row[6])
    summary = (f"{name}: layer = {label} ({work['layer'] / 1e9:.1f} GFLOP forward + backward); encoder "
               f"batch {batch} x {'x'.join(map(str, profile.preprocess.spatial_size))} "
               f"({work['encoder'] / 1e9:.1f} GFLOP). Fastest encoder training: {best[1]} {best[2]} "
               f"({best[6]:.1f} GFLOP/s, {best[6] / rows[0][6]:.2f}x fp32 contiguous).")
    return rows, summary


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", nargs="+", default=["smoke", "cpu"], choices=["smoke", "cpu", "paper"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = common.parse(parser, argv, quick={"profile": ["smoke"], "batch": 1, "repeats": 1})
    rows, notes = [], []
    for name in args.profile:
        profile_rows, summary = measure(name, args.batch, args.repeats)
        rows += profile_rows
        notes.append(summary)
    common.print_table(
        "Conv3d throughput: one representative layer vs the vision encoder (forward + backward)",
        ["profile", "precision", "layout", "layer (s)", "layer GFLOP/s", "encoder (s)", "encoder GFLOP/s",
         "encoder / layer", f"target >= {TARGET:g}"], rows, notes)


if __name__ == "__main__":
    main()
