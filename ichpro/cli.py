"""The ``ichpro`` command line: ``ichpro synth | validate | reproduce`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from ichpro.errors import IchproError


def _synth(args: argparse.Namespace) -> int:
    from sklearn.metrics import roc_auc_score

    from ichpro.cohort import calibration_check, generate_cohort, load_spec

    spec = load_spec(args.spec)
    start = time.perf_counter()
    truth = generate_cohort(spec, args.out, seed=args.seed, n_patients=args.n_patients,
                            images=not args.no_images, progress=not args.quiet)
    print(f"wrote {len(truth)} patients to {args.out} in {time.perf_counter() - start:.1f} s "
          f"(bad outcome {truth['label'].mean():.1%})")
    ok = True
    if args.check:
        n_check = max(5000, len(truth))
        table = calibration_check(spec.seed if args.seed is None else args.seed, n_check)
        print(f"calibration of the outcome model on {n_check} table-only patients:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"oracle AUCs on the {len(truth)} generated patients:")
        for column in ("p_bad_oracle", "p_bad_oracle_image", "p_bad_oracle_report",
                       "p_bad_oracle_report_no_stay"):
            print(f"AUC of {column}: {roc_auc_score(truth['label'], truth[column]):.3f}")
        ok = bool(table["ok"].dropna().all())
        print("calibration: all checked rows within tolerance" if ok
              else "calibration: some rows are OUTSIDE tolerance")
    return 0 if ok else 1


def _validate(args: argparse.Namespace) -> int:
    from ichpro.data import load_manifest, summarize_manifest
    from ichpro.errors import ManifestError

    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as err:
        print(err)
        return 1
    print(summarize_manifest(manifest))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from ichpro.reproduce import run_notebooks

    run_notebooks(args.profile, only=args.only, data_dir=args.data or "",
                  output_dir=args.out or "", figures_dir=args.figures_dir or "", seed=args.seed,
                  log_output=args.log_output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="ichpro", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate a synthetic cohort",
                       description="Generate a synthetic ICH cohort: CTs, masks, reports, "
                                   "manifest.csv, truth.csv (with oracle probabilities), cohort.json.")
    p.add_argument("--spec", required=True,
                   help="cohort spec: a YAML path or a name in data_synthetic/ (smoke, cpu)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=None, help="override the spec's seed")
    p.add_argument("--n-patients", type=int, default=None, help="override the spec's cohort size")
    p.add_argument("--no-images", action="store_true",
                   help="write table, truth and reports only (fast; for calibration studies)")
    p.add_argument("--check", action="store_true",
                   help="print observed vs published ICH-score and FUNC tables (on 5,000 "
                        "table-only patients drawn from the same model) and the cohort's oracle "
                        "AUCs; exit 1 if a row with >= 30 patients is out of tolerance")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_synth)

    p = sub.add_parser("validate", help="check a manifest and summarise it",
                       description="Check a manifest (synthetic or real) and print a summary, or "
                                   "every problem found (exit 1).")
    p.add_argument("manifest", help="path to manifest.csv")
    p.set_defaults(func=_validate)

    p = sub.add_parser("reproduce", help="run the notebooks headless with papermill",
                       description="Execute notebooks/NN_*.ipynb in order into "
                                   "runs/<profile>/notebooks/, generating the cohort if missing.")
    p.add_argument("--profile", default="cpu", help="smoke, cpu or paper (default cpu)")
    p.add_argument("--only", nargs="+", metavar="NN", help="run only these notebook numbers")
    p.add_argument("--data", help="cohort folder (default data_synthetic/<profile's cohort>)")
    p.add_argument("--out", help="run folder (default runs/<profile>)")
    p.add_argument("--figures-dir", help="where figures and tables go (default <run>/figures)")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, init and training")
    p.add_argument("--log-output", action="store_true", help="stream cell output to the log")
    p.set_defaults(func=_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ichpro`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except IchproError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # an unexpected failure: one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        else:
            print(f"error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
                  file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
