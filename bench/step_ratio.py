"""Training step of the whole ICHPro model vs its vision encoder alone, same batch (target: <= 1.2x).

    .venv/bin/python bench/step_ratio.py [--profile smoke cpu] [--paper] [--batch B] [--paper-batch 1]
                                         [--repeats 3] [--threads N] [--quick]

* whole model: both encoders trainable, MLM masking, forward, the full VTMF loss (CE + IMIMA + SDM +
  MLM), backward and the Adam step, exactly as the engine trains;
* vision alone: the same model's vision encoder, forward, a trivial loss (mean of the feature map),
  backward and an Adam step over the encoder.

The batch holds the profile's batch size (``--batch`` to change it) of real preprocessed CTs and
reports from a small synthetic cohort. The two steps are timed alternately (medians of
``--repeats`` after one warm-up). Also printed, as ``model_step.py`` did: parameters, the forward
pass alone (no gradients) and the process's peak resident memory. ``--paper`` adds the paper profile
(32 x 512 x 512, ResNet-50, a random BERT-base; batch ``--paper-batch``, one repeat): minutes per
step on a CPU.
"""

from __future__ import annotations

import resource

import common
import torch

TARGET = 1.2


def measure(name: str, batch_size: int | None, repeats: int) -> list[object]:
    profile = common.bench_profile(name)
    batch_size = batch_size or profile.train.batch_size
    with common.scratch("step-") as tmp:
        fit, batch = common.end_to_end_step(profile, batch_size, tmp)
    model = fit.model
    vision_optimizer = torch.optim.Adam(model.vision.parameters(), lr=profile.train.lr)

    def vision_step() -> None:
        model.vision(batch["ct"]).mean().backward()
        vision_optimizer.step()
        vision_optimizer.zero_grad(set_to_none=True)

    def forward() -> None:
        with torch.no_grad():
            model(batch)

    def whole() -> None:
        common.train_step(fit, dict(batch))

    times = common.interleaved({"vision": vision_step, "whole": whole, "forward": forward}, repeats, warmup=1)
    ratio = times["whole"] / times["vision"]
    size = "x".join(map(str, profile.preprocess.spatial_size))
    return [name, batch_size, size, sum(p.numel() for p in model.parameters()) / 1e6, times["forward"],
            times["vision"], times["whole"], ratio, f"<= {TARGET:g}", common.verdict(ratio <= TARGET),
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20]


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", "--profiles", nargs="+", default=["smoke", "cpu"],
                        choices=["smoke", "cpu", "paper"])
    parser.add_argument("--paper", action="store_true", help="also the paper profile (very slow on CPU)")
    parser.add_argument("--batch", type=int, help="batch size (default: the profile's)")
    parser.add_argument("--paper-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = common.parse(parser, argv, quick={"profile": ["smoke"], "batch": 2, "repeats": 1})
    names = list(dict.fromkeys(args.profile + (["paper"] if args.paper else [])))
    rows = [measure(name, args.paper_batch if name == "paper" else args.batch,
                    1 if name == "paper" else args.repeats) for name in names]
    common.print_table(
        "Training step: whole model (full VTMF loss) vs vision encoder alone, same batch",
        ["profile", "batch", "input", "params (M)", "forward only (s)", "vision step (s)",
         "whole-model step (s)", "whole / vision", "target", "result", "peak RSS so far (GB)"], rows,
        ["Steps include backward and the Adam update; medians of alternating repeats."])


if __name__ == "__main__":
    main()
