"""Training a table's rows in parallel: the same rows with one worker (torch's threads) and with
``--workers`` worker processes (cores / workers threads each), measured in the same run.

    .venv/bin/python bench/row_workers.py [--profile cpu] [--table table2_fusion] [--rows 4]
                                          [--patients 160] [--epochs 3] [--workers N] [--quick]

The rows are the first ``--rows`` rows of ``--table`` (Table 2's fusion structures train on cached
encoder outputs, each row's folds as one batched fit; Table 4's first rows are image networks trained
from scratch, one fold at a time), each cross-validated with the profile's folds and one seed for
``--epochs`` epochs (no early stopping) on a small cohort of the profile, through
:func:`ichpro.experiments.train_rows` as the notebooks call it. The feature cache is filled before
either side is timed; the parallel side pays starting its worker processes.
"""

from __future__ import annotations

import os

import common

from ichpro.experiments import table_rows, train_rows


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu"])
    parser.add_argument("--table", default="table2_fusion", choices=["table2_fusion", "table4_comparison"])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--patients", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = common.parse(parser, argv, quick={"profile": "smoke", "rows": 2, "patients": 24, "epochs": 1})
    profile = common.derive(common.bench_profile(args.profile),
                            train={"epochs": args.epochs, "patience": None})
    manifest = common.tiny_cohort(profile.cohort, args.patients)
    rows = table_rows(args.table)[: args.rows]
    jobs = [(row, 0) for row in rows]
    with common.scratch("workers-") as tmp:
        options = {"profile": profile, "manifest": manifest, "quiet": True, "cache_dir": tmp / "cache"}
        train_rows(jobs[:1], out=tmp / "warm-up", **options)  # fills the feature cache
        one = common.timed(lambda: train_rows(jobs, out=tmp / "one", workers=1, **options))
        many = common.timed(lambda: train_rows(jobs, out=tmp / "many", workers=args.workers, **options))
    common.print_table(
        f"{len(jobs)} rows of {args.table}, {args.profile} profile, {args.patients} patients, "
        f"{args.epochs} epochs, {profile.train.n_folds} folds",
        ["workers", "threads each", "wall time (s)", "speed-up over one worker"],
        [[1, os.cpu_count(), one, 1.0], [args.workers, max(1, (os.cpu_count() or 1) // args.workers), many,
                                         one / many]],
        ["Same rows, same warm feature cache; the parallel side includes starting its processes."])


if __name__ == "__main__":
    main()
