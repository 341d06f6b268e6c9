"""Share of an end-to-end training epoch spent waiting for data (target: <= 5 % after the first epoch).

    .venv/bin/python bench/data_wait.py [--profile smoke cpu] [--epochs 3] [--patients 48] [--threads N]
                                        [--quick]

Trains fold 0 end to end (both encoders trainable) from an empty CT cache and sums, per epoch, the
time spent inside ``BatchSource.batch`` (reading preprocessed CTs from MONAI's PersistentDataset
cache, stacking them, slicing the tokens), against the epoch time the engine records (training
+ inner validation, checkpoints excluded). Epoch 1 also preprocesses every CT into the cache and is
shown for reference only; the target applies to the later epochs together.
"""

from __future__ import annotations

from collections import defaultdict

import common
import pandas as pd
from common import now

from ichpro.batches import BatchSource

TARGET = 0.05


class TimedSource(BatchSource):
    """A BatchSource summing the seconds spent in :meth:`batch` per training epoch (the validation
    that follows an epoch counts for it; the test fold, predicted once after the last epoch, is left
    out)."""

    def __init__(self, *args, skip: set[int]):
        super().__init__(*args)
        self.skip, self.epoch = skip, 0
        self.wait: dict[int, float] = defaultdict(float)

    def batch(self, idx, device, epoch=None, generator=None):
        start = now()
        batch = super().batch(idx, device, epoch, generator)
        self.epoch = epoch or self.epoch
        if not self.skip.issuperset(idx):
            self.wait[self.epoch] += now() - start
        return batch


def measure(name: str, epochs: int, patients: int) -> list[list[object]]:
    profile = common.derive(common.end_to_end(common.bench_profile(name)),
                            train={"epochs": epochs, "patience": None})
    manifest = common.tiny_cohort(profile.cohort, patients)
    text = common.text_backbone(profile, manifest)
    test = set(common.first_fold(profile, manifest["label"].to_numpy()).test.tolist())
    with common.scratch("wait-") as tmp:
        source = TimedSource(manifest, profile, text, tmp / "cache", skip=test)
        common.fold_fit(profile, source, text, tmp / "run").fit()
        history = pd.read_csv(tmp / "run" / "metrics.csv")
    rows, later = [], [0.0, 0.0]
    for epoch, seconds in zip(history["epoch"], history["seconds"]):
        wait = source.wait[epoch]
        if epoch > 1:
            later = [later[0] + wait, later[1] + seconds]
        note = "fills the CT cache" if epoch == 1 else ""
        rows.append([name, epoch, seconds, wait, f"{wait / seconds:.1%}", note])
    share = later[0] / later[1] if later[1] else float("nan")
    rows.append([name, "after the first", later[1], later[0], f"{share:.1%}",
                 f"target <= {TARGET:.0%}: {common.verdict(share <= TARGET)}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", nargs="+", default=["smoke", "cpu"], choices=["smoke", "cpu"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs, the first one filling the CT cache")
    parser.add_argument("--patients", type=int, default=48)
    args = common.parse(parser, argv, quick={"profile": ["smoke"], "epochs": 2, "patients": 16})
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first fills the CT cache)")
    rows = [row for name in args.profile for row in measure(name, args.epochs, args.patients)]
    common.print_table("Data wait in end-to-end epochs (time inside BatchSource.batch)",
                       ["profile", "epoch", "epoch (s)", "waiting for data (s)", "share", "note"], rows)


if __name__ == "__main__":
    main()
