"""Fit time of one fold: frozen encoders on a warm feature cache vs end-to-end (target: frozen >= 20x faster).

    .venv/bin/python bench/fit_time.py [--profile smoke cpu] [--epochs 2] [--patients 48] [--threads N]
                                       [--quick]

Both fits use the same profile, patients, fold (fold 0 of the profile's folds), epochs (no early
stopping) and a warm CT cache; each is timed from building its fit to its test-fold
predictions, checkpoints included. The frozen side also pays reading the warm feature cache (which
hashes the encoder weights and every CT file). The one-off cost of filling the cache is reported
twice: from scratch (CT preprocessing + encoding every patient) and with a warm CT cache (encoding
only).
"""

from __future__ import annotations

import common
from common import timed

from ichpro.batches import BatchSource

TARGET = 20.0


def measure(name: str, epochs: int, patients: int) -> tuple[list[object], str]:
    profile = common.derive(common.bench_profile(name), train={"epochs": epochs, "patience": None})
    manifest = common.tiny_cohort(profile.cohort, patients)
    text = common.text_backbone(profile, manifest)
    with common.scratch("fit-") as tmp:
        source, fill = common.fill_feature_cache(profile, manifest, text, tmp / "cache")
        frozen = timed(lambda: common.fold_fit(profile, source, text, tmp / "frozen").fit())
        e2e_profile = common.end_to_end(profile)
        e2e_source = BatchSource(manifest, e2e_profile, text, tmp / "cache")  # the CT cache is warm
        e2e = timed(lambda: common.fold_fit(e2e_profile, e2e_source, text, tmp / "e2e").fit())
    fold = common.first_fold(profile, manifest["label"].to_numpy())
    ratio = e2e / (fill["warm"] + frozen)
    row = [name, f"{len(fold.train)}/{len(fold.val)}/{len(fold.test)}", epochs, fill["cold"], fill["encode"],
           fill["warm"], frozen, e2e, ratio, f">= {TARGET:g}", common.verdict(ratio >= TARGET)]
    note = (f"{name}: filling the cache from scratch costs about {fill['cold'] / (e2e / epochs):.1f} "
            "end-to-end epochs of this fold; it is paid once per cohort and encoder, not per fold or run.")
    return row, note


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", nargs="+", default=["smoke", "cpu"], choices=["smoke", "cpu"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--patients", type=int, default=48)
    args = common.parse(parser, argv, quick={"profile": ["smoke"], "epochs": 1, "patients": 16})
    rows, notes = zip(*(measure(name, args.epochs, args.patients) for name in args.profile))
    common.print_table(
        "Fit time of one fold: frozen encoders + warm cache vs end-to-end",
        ["profile", "train/val/test", "epochs", "cache fill: preprocess + encode (s)",
         "cache fill: encode only (s)", "warm cache read (s)", "frozen fit (s)", "end-to-end fit (s)",
         "end-to-end / (read + frozen)", "target", "result"], rows, notes)


if __name__ == "__main__":
    main()
