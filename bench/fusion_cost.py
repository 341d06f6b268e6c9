"""What reading the report costs: a frozen-encoder training step of ICHPro with each choice that
makes it read the report, against the earlier configuration, same batch (reported, no target).

    .venv/bin/python bench/fusion_cost.py [--profile cpu] [--batch B] [--repeats 5] [--threads N] [--quick]

The step is what a fold trains on cached encoder outputs (the ``cpu`` profile's setting): the
fusion, header and loss heads, full VTMF loss, backward and the Adam update, on random features of
the encoders' shapes (a report of ``--tokens`` tokens). Variants, each changing one thing from the
profile as configured:

* ``positional TRT``: the token-position map instead of the grid-cell queries;
* ``SoftPool 2 in CMAF``: the default SoftPool kernel instead of the profile's ``cmaf_pool``;
* ``earlier cpu``: both, which is the configuration before this change;
* ``MLM over the full vocabulary``: the MLM softmax over all of the encoder's words instead of the
  reports' (``LossConfig.mlm_vocabulary``; ``--report-words`` distinct tokens, the cpu cohort's 257).

``text_layers`` does not change the step (the states are cached); it shortens the one-off
encoding instead. Epochs per fold and the batch size are in the profile, and their cost is in the
rows' training times (``timing.json``, Table 4's s / fold).
"""

from __future__ import annotations

from dataclasses import replace

import common
import torch

from ichpro.models import build_model


def make_step(profile, batch: int, tokens: int, report_words: int):
    """One training step of the profile's model on cached-output shapes, as a function."""
    bert = common.cached_text_stand_in(profile)
    model = build_model(replace(profile.model, text_layers=None), bert, profile.loss)
    if profile.loss.mlm_vocabulary == "reports":
        model.mlm.restrict_vocabulary(torch.arange(1000, 1000 + report_words))
    params = [p for p in model.parameters() if p.requires_grad]  # the objective's included
    optimizer = torch.optim.Adam(params, lr=profile.train.lr)
    with torch.no_grad():
        grid = model.vision(torch.zeros(1, 1, *profile.preprocess.spatial_size)).shape[1:]
    data = common.frozen_batch(grid, bert.config.hidden_size, batch, tokens, report_words)

    return common.adam_step(lambda: model(data).loss, optimizer)


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu"])
    parser.add_argument("--batch", type=int, help="batch size (default: the profile's)")
    parser.add_argument("--tokens", type=int, default=48, help="report length (the cpu cohort's mean)")
    parser.add_argument("--report-words", type=int, default=257,
                        help="distinct tokens of the reports (the cpu cohort's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = common.parse(parser, argv, quick={"profile": "smoke", "batch": 4, "repeats": 1})
    profile = common.bench_profile(args.profile)
    batch = args.batch or profile.train.batch_size
    model = profile.model
    variants = {
        "as configured": profile,
        "positional TRT": replace(profile, model=replace(model, trt="positional")),
        "SoftPool 2 in CMAF": replace(profile, model=replace(model, cmaf_pool=None)),
        "earlier cpu (positional TRT, SoftPool 2)": replace(profile, model=replace(model, trt="positional",
                                                                                   cmaf_pool=None)),
        "MLM over the full vocabulary": replace(profile, loss=replace(profile.loss, mlm_vocabulary="full")),
    }
    steps = {name: make_step(variant, batch, args.tokens, args.report_words)
             for name, variant in variants.items()}
    seconds = common.interleaved(steps, args.repeats, warmup=1)
    base = seconds["as configured"]
    rows = [[name, s, s / base] for name, s in seconds.items()]
    common.print_table(f"Frozen-encoder training step, {args.profile} profile, batch {batch}, "
                       f"{args.tokens} tokens", ["variant", "step (s)", "step / as configured"], rows,
                       ["Random features of the cached encoder outputs' shapes; full VTMF loss, backward "
                        "and Adam; medians of alternating repeats."])


if __name__ == "__main__":
    main()
