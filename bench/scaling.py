"""How costs grow: (a) with the cohort size (frozen encoders), (b) with the CT volume (end to end).

    .venv/bin/python bench/scaling.py [--profile smoke] [--patients 40 80 160] [--epochs 4]
                                      [--sizes 16x64x64 32x64x64 32x128x128] [--batch B] [--repeats 3]
                                      [--threads N] [--quick]

(a) For each cohort size, from an empty cache: filling the feature cache (CT preprocessing +
encoding every patient), encoding alone (CT cache warm), and the frozen fit of fold 0 (``--epochs``,
no early stopping, from a warm cache). (b) For each input size, the end-to-end training step (both
encoders trainable, full VTMF loss, backward, Adam) on a batch of real CTs preprocessed to that size,
sizes timed alternately. Each table ends with the growth exponent k of cost ~ size^k (log-log
least-squares slope): k = 1 is linear.
"""

from __future__ import annotations

import common
from common import timed


def cohort_scaling(name: str, sizes: list[int], epochs: int) -> None:
    profile = common.derive(common.bench_profile(name), train={"epochs": epochs, "patience": None})
    rows = []
    for n in sizes:
        manifest = common.tiny_cohort(profile.cohort, n)
        text = common.text_backbone(profile, manifest)
        with common.scratch("scale-") as tmp:
            source, fill = common.fill_feature_cache(profile, manifest, text, tmp / "cache")
            fold_fit = common.fold_fit(profile, source, text, tmp / "run")
            fit = timed(fold_fit.fit)
        rows.append([n, len(fold_fit.members[0].fold.train), fill["cold"], fill["encode"], fit,
                     1000 * fill["cold"] / n])
    rows.append(["exponent k", "", *(common.loglog_slope(sizes, [row[i] for row in rows]) for i in (2, 3, 4)),
                 ""])
    columns = ["patients", "train patients", "cache fill: preprocess + encode (s)", "encode only (s)",
               f"frozen fit (s, {epochs} epochs)", "fill per patient (ms)"]
    common.print_table(f"(a) Cost vs cohort size, {name} profile, frozen encoders", columns, rows)


def volume_scaling(name: str, sizes: list[tuple[int, int, int]], batch: int | None, repeats: int) -> None:
    base = common.bench_profile(name)
    batch = batch or base.train.batch_size
    steps = {}
    for size in sizes:
        profile = common.derive(base, preprocess={"spatial_size": size})
        with common.scratch("scale-") as tmp:
            fit, data = common.end_to_end_step(profile, batch, tmp)
        steps[size] = lambda fit=fit, data=data: common.train_step(fit, dict(data))
    seconds = common.interleaved(steps, repeats, warmup=1)
    voxels = [d * h * w for d, h, w in sizes]
    rows = [["x".join(map(str, size)), n, seconds[size], 1e9 * seconds[size] / (n * batch)]
            for size, n in zip(sizes, voxels)]
    rows.append(["exponent k", "", common.loglog_slope(voxels, list(seconds.values())), ""])
    common.print_table(f"(b) End-to-end training step vs volume size, {name} profile, batch {batch}",
                       ["input (D x H x W)", "voxels", "step (s)", "ns per voxel and CT"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", default="smoke", choices=["smoke", "cpu"])
    parser.add_argument("--patients", nargs="+", type=int, default=[40, 80, 160])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", default=["16x64x64", "32x64x64", "32x128x128"])
    parser.add_argument("--batch", type=int, help="batch of (b) (default: the profile's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = common.parse(parser, argv, quick={"patients": [12, 16, 20], "epochs": 1, "batch": 2,
                                            "sizes": ["8x32x32", "16x32x32"], "repeats": 1})
    cohort_scaling(args.profile, args.patients, args.epochs)
    volume_scaling(args.profile, [tuple(int(v) for v in s.split("x")) for s in args.sizes], args.batch,
                   args.repeats)


if __name__ == "__main__":
    main()
