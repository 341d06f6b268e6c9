"""What the pretraining decoder costs: one vision-pretraining step with the decoder (``ichpro.pretrain``)
against the earlier shallow head, same batch (reported, no target).

    .venv/bin/python bench/pretrain_cost.py [--profile cpu] [--batch 8] [--repeats 5] [--threads N] [--quick]

The earlier head is two convolutions on ``layer4``'s coarse map, up-sampled to the input size; the
decoder adds three convolution and ×2 up-sampling steps before the input size. Both train the whole
encoder: the step includes the forward, the pretraining loss, the backward and the Adam update on
random CTs with a blob of "blood". The pretraining's wall time is in its card (``card.json``,
``seconds``).
"""

from __future__ import annotations

import common
import torch
from torch import nn

from ichpro.config import get_profile
from ichpro.pretrain import PretrainNet, channels_last, pretrain_loss


def shallow_head(channels: int) -> nn.Module:
    """The earlier segmentation head: two convolutions on the coarse map."""
    return nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), nn.BatchNorm3d(channels),
                         nn.ReLU(inplace=True), nn.Conv3d(channels, 2, 1))


def make_step(net: PretrainNet, batch: int, size: tuple[int, int, int]):
    """One pretraining step of ``net`` on a fixed random batch, as a function."""
    net = net.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    ct = channels_last(torch.rand(batch, 1, *size, generator=generator))
    blood = torch.zeros(batch, 2, *size)
    d, h, w = size
    blood[:, 0, d // 4:d // 2, h // 4:h // 2, w // 4:w // 2] = 1
    target = {"blood": blood, "volume_ml": torch.full((batch,), 20.0), "ivh": torch.ones(batch),
              "midline_shift_mm": torch.full((batch,), 2.0), "location": torch.zeros(batch, dtype=torch.long)}
    return common.adam_step(lambda: pretrain_loss(net(ct), target, 0.5, 0.5)[0], optimizer)


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu"])
    parser.add_argument("--batch", type=int, help="batch size (default: the profile's pretraining batch)")
    parser.add_argument("--repeats", type=int, default=5)
    args = common.parse(parser, argv, quick={"profile": "smoke", "batch": 2, "repeats": 1})
    profile = get_profile(args.profile)
    batch = args.batch or profile.pretrain.batch_size
    size = profile.preprocess.spatial_size
    torch.manual_seed(0)
    decoder = PretrainNet(profile)
    torch.manual_seed(0)
    earlier = PretrainNet(profile)
    earlier.segment = shallow_head(earlier.encoder.out_channels)
    seconds = common.interleaved({"decoder (as configured)": make_step(decoder, batch, size),
                                  "earlier shallow head": make_step(earlier, batch, size)},
                                 args.repeats, warmup=1)
    base = seconds["decoder (as configured)"]
    rows = [[name, s, s / base] for name, s in seconds.items()]
    common.print_table(f"Vision-pretraining step, {args.profile} profile, batch {batch}, input {size}",
                       ["segmentation head", "step (s)", "step / decoder"], rows,
                       ["Forward, loss, backward and Adam on random CTs; medians of alternating repeats."])


if __name__ == "__main__":
    main()
