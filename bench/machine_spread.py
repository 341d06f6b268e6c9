"""How far another machine's ``make reproduce`` lands from the committed reference run: every row of
Tables 1-4 (AUC, its Holm-adjusted p against ICHPro and the call, and whether the AUC lies within the
reference's seed range where the row has one), the attention summary, the counterfactual and the
pretraining card, side by side (not a speed benchmark, and not run by ``run_all.py``).

    .venv/bin/python bench/machine_spread.py --other /path/to/clone/figures [--reference figures]

Run ``make reproduce`` in a fresh clone on the other machine (it writes the clone's ``figures/``),
then point ``--other`` at that folder. A reading of the README holds on both machines when the two
runs make the same call (real, equivalent or not established: ``ichpro.repeated_cv``).
``--quick`` compares the reference with itself (every difference 0), to check the script.
"""

from __future__ import annotations

from pathlib import Path

import common
import pandas as pd

from ichpro.views.attention import counterfactual_summary

TABLES = ("table1_modalities", "table2_fusion", "table3_losses", "table4_comparison")
ATTENTION = "attention_localisation_summary.csv"
COUNTERFACTUAL = "attention_counterfactual.csv"
CARD = "encoders_pretraining_card.md"


def table_rows(reference: Path, other: Path) -> list[list[object]]:
    """One line per table row: AUC, seed range, Holm-adjusted p and call on both machines."""
    lines = []
    for table in TABLES:
        ref, oth = (pd.read_csv(folder / f"{table}.csv").set_index("row") for folder in (reference, other))
        for row in ref.index:
            r, o = ref.loc[row], oth.loc[row]
            seeded = r.get("n_seeds", 1) > 1
            inside = ("yes" if r["auc_seed_min"] <= o["auc"] <= r["auc_seed_max"] else "no") if seeded else ""
            p_values = ["", "", ""]  # the reference row has no p
            if pd.notna(r["p_holm"]):
                p_values = [r["p_holm"], o["p_holm"], "yes" if r["call"] == o["call"] else "no"]
            lines.append([table.split("_")[0], row, r["auc"], o["auc"], o["auc"] - r["auc"], seed_range(r),
                          seed_range(o), inside, *p_values])
    return lines


def seed_range(line: pd.Series) -> str:
    """A row's AUC range over the training seeds, if it has one."""
    if pd.isna(line.get("auc_seed_min")) or line.get("n_seeds", 1) == 1:
        return ""
    return f"{line['auc_seed_min']:.3f}-{line['auc_seed_max']:.3f}"


def attention_rows(reference: Path, other: Path) -> list[list[object]]:
    """Mass ratio and pointing-game hit rate of every attention map on both machines."""
    ref, oth = (pd.read_csv(folder / ATTENTION).set_index("method") for folder in (reference, other))
    return [[method, ref.loc[method, "ratio"], oth.loc[method, "ratio"], ref.loc[method, "pointing_hit_rate"],
             oth.loc[method, "pointing_hit_rate"]] for method in ref.index]


def counterfactual_row(folder: Path) -> list[object]:
    """Mean ΔP(bad) of the model and of the oracle, their ratio, and the share with the oracle's sign."""
    summary = counterfactual_summary(pd.read_csv(folder / COUNTERFACTUAL))
    return [summary[key] for key in ("model mean ΔP(bad)", "oracle mean ΔP(bad)", "model mean / oracle mean",
                                     "same sign as the oracle")]


def held_out_line(folder: Path) -> str:
    """The pretraining card's held-out line."""
    lines = (folder / CARD).read_text().splitlines()
    return next(line for line in lines if line.startswith("* Held out:"))[len("* Held out: "):]


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--reference", default=str(common.REPO / "figures"),
                        help="the committed reference run's figures (default: this checkout's)")
    parser.add_argument("--other", help="another machine's figures folder")
    args = common.parse(parser, argv)
    reference = Path(args.reference)
    if args.quick:
        args.other = args.reference
    if args.other is None:
        parser.error("--other is required (the figures folder of another machine's make reproduce)")
    other = Path(args.other)
    common.print_table(
        "Tables 1-4 on both machines", ["table", "row", "reference AUC", "other AUC", "difference",
                                        "reference seed range", "other seed range",
                                        "other inside the reference's", "reference p",
                                        "other p", "same call"],
        table_rows(reference, other),
        ["p: the corrected repeated-CV t-test against the table's reference, Holm-adjusted; seed ranges: "
         "min-max AUC over each run's seeds."])
    common.print_table("Attention maps (40 patients)", ["map", "reference ratio", "other ratio",
                                                        "reference pointing", "other pointing"],
                       attention_rows(reference, other))
    common.print_table("Counterfactual (GCS -> 5, age -> 85)",
                       ["run", "model mean ΔP(bad)", "oracle mean ΔP(bad)", "model / oracle", "same sign"],
                       [["reference", *counterfactual_row(reference)], ["other", *counterfactual_row(other)]])
    common.print_table("Pretrained vision encoder, held out", ["run", "card"],
                       [["reference", held_out_line(reference)], ["other", held_out_line(other)]])


if __name__ == "__main__":
    main()
