"""The ``ichpro`` command line: ``ichpro synth | validate | pretrain-vision | train | table | evaluate |
predict | card | reproduce`` (``--help`` on each).

Each command imports what it needs inside its own function: torch, MONAI and transformers take
seconds to import, and ``ichpro --help`` or ``ichpro validate`` should not wait for them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

from ichpro.config import FUSION_STRUCTURES, cache_root
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
    from ichpro.errors import ManifestError
    from ichpro.manifest import load_manifest, summarize_manifest

    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as err:
        print(err)
        return 1
    print(summarize_manifest(manifest))
    return 0


def _manifest_path(data: str) -> Path:
    path = Path(data)
    return path / "manifest.csv" if path.is_dir() else path


def _pretrain_vision(args: argparse.Namespace) -> int:
    from ichpro.config import get_profile
    from ichpro.pretrain import card_markdown, pretrain_vision, pretrained_path

    profile = get_profile(args.profile)
    out = args.out or pretrained_path(profile).parent
    card = pretrain_vision(profile, out, resume=args.resume, quiet=args.quiet)
    print(card_markdown(card))
    print(f"wrote {Path(out) / card['weights']}")
    return 0


def _encoder_options(model, args: argparse.Namespace):
    """The model config with the encoder options of the command line applied."""
    if args.vision_weights is not None:
        model = replace(model, vision_weights=str(Path(args.vision_weights).resolve()))
    if args.end_to_end:
        model = replace(model, freeze_vision=False, freeze_text=False)
    if args.freeze_encoders:
        model = replace(model, freeze_vision=True, freeze_text=True)
    return model


def _train(args: argparse.Namespace) -> int:
    from ichpro.config import get_profile
    from ichpro.data import make_folds
    from ichpro.losses import parse_loss_spec
    from ichpro.manifest import load_manifest
    from ichpro.metrics import classification_metrics
    from ichpro.train import cross_validate, prepare_vision_weights

    profile = get_profile(args.profile)
    model = replace(profile.model, **{k: v for k, v in (
        ("fusion", args.fusion), ("vision_dropout", args.vision_dropout)) if v is not None})
    model = _encoder_options(model, args)
    loss_spec, train = args.loss, profile.train
    if args.comparator is not None:
        from ichpro.clinical import CLINICAL_BASELINES
        from ichpro.experiments import table_rows
        from ichpro.models.comparators import COMPARATORS

        names = [*COMPARATORS, *CLINICAL_BASELINES]
        if args.comparator not in names:
            raise IchproError(f"unknown comparator {args.comparator!r}; choose one of {', '.join(names)}")
        model = replace(model, comparator=args.comparator)
        loss_spec = loss_spec or "ce"  # a comparator brings its own loss; ICHPro's terms do not apply
        row = next(r for r in table_rows("table4_comparison") if r.model.get("comparator") == args.comparator)
        train = replace(train, **row.train)  # the training settings of the comparator's Table 4 row
    loss = profile.loss if loss_spec is None else replace(profile.loss, terms=parse_loss_spec(loss_spec))
    train = replace(train, **{k: v for k, v in (
        ("epochs", args.epochs), ("n_folds", args.folds), ("batch_size", args.batch_size),
        ("lr", args.lr), ("device", args.device), ("amp", args.amp),
        ("grad_accumulation", args.grad_accumulation)) if v is not None})
    profile = replace(profile, model=model, loss=loss, train=train)
    manifest = load_manifest(_manifest_path(args.data))
    make_folds(manifest["label"], profile.train.n_folds)  # too few patients for the folds: say so first
    if os.environ.get("RANK", "0") == "0":  # under torchrun the other ranks wait in cross_validate
        prepare_vision_weights(profile, args.quiet)
    oof = cross_validate(profile, manifest, args.out, seed=args.seed, resume=args.resume,
                         quiet=args.quiet, cache_dir=args.cache)
    scores = classification_metrics(oof["label"], oof["p_bad"])
    print(f"{len(oof)} out-of-fold predictions in {args.out}: AUC {scores['auc']:.3f}, "
          f"accuracy {scores['accuracy']:.3f}, F1 {scores['f1']:.3f}")
    if os.environ.get("RANK", "0") == "0":
        from ichpro.model_card import write_model_card

        print(f"wrote {write_model_card(args.out, manifest)}")
    return 0


def _card(args: argparse.Namespace) -> int:
    from ichpro.manifest import load_manifest
    from ichpro.model_card import write_model_card

    manifest = load_manifest(_manifest_path(args.data)) if args.data else None
    print(f"wrote {write_model_card(args.run, manifest, n_boot=args.n_boot)}")
    return 0


def _table(args: argparse.Namespace) -> int:
    import pandas as pd

    from ichpro.config import get_profile
    from ichpro.experiments import TABLES, run_table, table_rows, write_table
    from ichpro.manifest import load_manifest

    table_rows(args.name)  # an unknown name fails before any work
    if args.workers < 1:
        raise IchproError(f"--workers must be at least 1, not {args.workers}")
    profile = get_profile(args.profile)
    profile = replace(profile, model=_encoder_options(profile.model, args))
    manifest_path = _manifest_path(args.data)
    truth_path = manifest_path.parent / "truth.csv"
    truth = pd.read_csv(truth_path) if truth_path.is_file() else None
    table, tests = run_table(args.name, profile, load_manifest(manifest_path), args.out, truth=truth,
                             seed=args.seed, resume=args.resume, quiet=args.quiet, cache_dir=args.cache,
                             n_boot=args.n_boot, workers=args.workers)
    paths = write_table(table, tests, Path(args.out) / args.name, TABLES[args.name][0])
    shown = ["row", "paper_auc", "n_seeds", "auc", "auc_ci_low", "auc_ci_high", "difference", "p_holm",
             "call", "ceiling_auc"]
    shown += [column for column in ("params", "seconds_per_fold") if column in table.columns]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ichpro.metrics import metrics_table
    from ichpro.train import OOF_FILE, read_predictions

    path = Path(args.run) / OOF_FILE
    if not path.is_file():
        raise IchproError(f"{path} not found: train first (ichpro train ... --out {args.run})")
    oof = read_predictions(path)
    table = metrics_table(oof["label"], oof["p_bad"], n_boot=args.n_boot, seed=args.seed)
    table.to_csv(Path(args.run) / "metrics_summary.csv", index=False)
    print(f"{len(oof)} patients, {int(oof['label'].sum())} bad outcomes; 95 % bootstrap CIs "
          f"({args.n_boot} replicates)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ichpro.model_card import CARD_FILE
    from ichpro.predict import load_run, predict_patient, save_heatmap

    run = load_run(args.checkpoint)
    prediction = predict_patient(run, args.ct, args.report, bool(args.heatmap), args.heatmap_kind)
    status = prediction.report_fields
    if "given" not in status.values():
        print(f"warning: the report gives none of the expected fields ({', '.join(status)}); the model "
              "reads it as it is, but it was trained on reports that give them", file=sys.stderr)
    elif set(status.values()) != {"given"}:
        print("report fields not given: " + ", ".join(f"{name} ({state})" for name, state in status.items()
                                                     if state != "given"))
    folds = ", ".join(f"{p:.3f}" for p in prediction.p_bad_per_fold)
    print(f"P(bad outcome) = {prediction.p_bad:.3f} (mean of {len(run.models)} fold models: {folds})")
    if args.heatmap:
        for path in save_heatmap(prediction, args.heatmap):
            print(f"wrote {path}")
    card = Path(args.checkpoint) / CARD_FILE
    print(f"before trusting this number, read the model card: {card}" if card.is_file()
          else f"this run has no model card yet: write it with ichpro card {args.checkpoint}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from ichpro.reproduce import run_notebooks

    run_notebooks(args.profile, only=args.only, data_dir=args.data or "",
                  output_dir=args.out or "", figures_dir=args.figures_dir or "", seed=args.seed,
                  log_output=args.log_output, executed_dir=args.notebooks_dir or "", readme=args.readme or "")
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

    p = sub.add_parser("pretrain-vision", help="pretrain a profile's 3D encoder on synthetic CTs",
                       description="Pretrain the profile's vision encoder on blood segmentation and "
                                   "haematoma volume regression, on a synthetic pretraining cohort "
                                   "(the profile's spec with its own seed); writes "
                                   "vision.safetensors and a card. Training uses it automatically.")
    p.add_argument("--profile", default="smoke", help="smoke or cpu (default smoke)")
    p.add_argument("--out", type=Path, help="output folder (default: the profile's place in the cache)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted pretraining in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_pretrain_vision)

    p = sub.add_parser("train", help="cross-validate a model on a cohort or manifest",
                       description="Patient-level stratified k-fold cross-validation; writes "
                                   "oof_predictions.csv, metrics.csv, checkpoints and run.json to --out.")
    _add_run_options(p, out="run folder", resume="continue an interrupted run in --out")
    p.add_argument("--fusion", choices=FUSION_STRUCTURES, help="fusion structure (default cross-self)")
    p.add_argument("--vision-dropout", type=float,
                   help="share of training samples whose fusion sees the report without the CT "
                        "(beyond the paper; the profile's: 0.5 on smoke and cpu, 0 on paper)")
    p.add_argument("--comparator", help="train a neighbouring system instead of ICHPro, e.g. "
                                        "densenet+ord_gcs, quantification, vdafm, slice2d, image+gcs, "
                                        "concat_late, logistic_regression or ich_score (Table 4 trains "
                                        "the networks from scratch with --lr 1e-3 --batch-size 16)")
    p.add_argument("--loss", help="loss terms, e.g. 'vtmf' or 'ce=1,imima=1,sdm=0.5,mlm=0.5'")
    p.add_argument("--epochs", type=int, help="override the profile's epochs")
    p.add_argument("--folds", type=int, help="override the number of folds (default 5)")
    p.add_argument("--batch-size", type=int, help="batch size per process")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--grad-accumulation", type=int, help="batches per optimizer step")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), help="mixed precision")
    p.set_defaults(func=_train)

    p = sub.add_parser("table", help="reproduce one of the paper's result tables",
                       description="Cross-validate every row of a results table with each of its seeds, "
                                   "reusing finished runs, and write <out>/<name>.{csv,md,png} and "
                                   "<out>/<name>_comparisons.csv: the paper's numbers, ours as means over "
                                   "the seeds with 95 % intervals, each row against the reference by the "
                                   "corrected repeated-CV t-test (Holm-adjusted) and the oracle ceiling "
                                   "(from the cohort's truth.csv when present).")
    p.add_argument("name", help="table1_modalities, table2_fusion, table3_losses or table4_comparison")
    _add_run_options(p, out="folder for the rows' runs and the table", resume="continue an interrupted row")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for the CIs")
    p.add_argument("--workers", type=int, default=1,
                   help="runs to train at once, each in its own process with cores / N threads (default 1; "
                        "on a CPU, 2 trains frozen-encoder rows a little faster, from-scratch CNNs slower)")
    p.set_defaults(func=_table)

    p = sub.add_parser("evaluate", help="metrics with bootstrap CIs of a run's predictions",
                       description="Accuracy, recall, precision, F1, AUC, balanced accuracy, "
                                   "specificity, Brier score and ECE of a run's out-of-fold "
                                   "predictions, with 95 % bootstrap CIs.")
    p.add_argument("run", help="run folder written by ichpro train")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="predict one patient with a trained run",
                       description="Probability of a bad outcome for one CT and report, averaged "
                                   "over the run's fold models; optionally an attention heat map "
                                   "(NIfTI on the model-input grid, and a PNG overlay).")
    p.add_argument("--checkpoint", required=True, help="run folder written by ichpro train")
    p.add_argument("--ct", required=True, help="NIfTI file or DICOM series folder")
    p.add_argument("--report", required=True, help="report text, or a text file holding it")
    p.add_argument("--heatmap", type=Path, help="output prefix for <prefix>_<kind>.{nii.gz,png}")
    p.add_argument("--heatmap-kind",
                   help="which heat map: grad_cam (the default where the model draws it: the map that "
                        "localises the haematoma best in notebook 11), an attention map's name such as "
                        "stage1_cmaf_text_to_vision or slice_attention, or that name + _x_gradient; a wrong "
                        "name lists the model's maps")
    p.set_defaults(func=_predict)

    p = sub.add_parser("card", help="write a trained run's model card",
                       description="Write <run>/model_card.md: intended use, training data, inputs, "
                                   "discrimination and calibration with 95 % CIs, decision curve, subgroups "
                                   "(with --data), the heat map, known failure modes and their checks.")
    p.add_argument("run", help="run folder written by ichpro train (or by ichpro table, under <out>/runs/)")
    p.add_argument("--data", help="the manifest it was trained on (cohort folder or CSV): adds the subgroups "
                                  "and the report fields")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of the CIs (default 1000)")
    p.set_defaults(func=_card)

    p = sub.add_parser("reproduce", help="run the notebooks headless with papermill",
                       description="Execute notebooks/NN_*.ipynb in order into "
                                   "runs/<profile>/notebooks/ (or --notebooks-dir), generating the "
                                   "cohort and pretraining the vision encoder if missing.")
    p.add_argument("--profile", default="cpu", help="smoke, cpu or paper (default cpu)")
    p.add_argument("--only", nargs="+", metavar="NN", help="run only these notebook numbers")
    p.add_argument("--data", help="cohort folder (default data_synthetic/<profile's cohort>)")
    p.add_argument("--out", help="run folder (default runs/<profile>)")
    p.add_argument("--figures-dir", help="where figures and tables go (default <run>/figures)")
    p.add_argument("--notebooks-dir", help="where the executed notebooks and their timings go "
                                           "(default <run>/notebooks)")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, init and training")
    p.add_argument("--log-output", action="store_true", help="stream cell output to the log")
    p.add_argument("--readme", help="a README whose verdict and results tables to fill from the figures "
                                    "at the end (make reproduce passes README.md on the cpu profile)")
    p.set_defaults(func=_reproduce)
    return parser


def _add_run_options(p: argparse.ArgumentParser, out: str, resume: str) -> None:
    """The options of the commands that cross-validate (train, table)."""
    p.add_argument("--profile", default="smoke", help="smoke, cpu or paper (default smoke)")
    p.add_argument("--data", required=True, help="cohort folder (with manifest.csv) or a manifest CSV")
    p.add_argument("--out", required=True, type=Path, help=out)
    p.add_argument("--seed", type=int, default=0, help="seed for folds, initialisation and training")
    p.add_argument("--vision-weights", help="local vision encoder weights (e.g. MedicalNet .pth, or a "
                                            "pretrain-vision output) instead of the profile's")
    frozen = p.add_mutually_exclusive_group()
    frozen.add_argument("--end-to-end", action="store_true",
                        help="fine-tune both encoders (the paper profile's default)")
    frozen.add_argument("--freeze-encoders", action="store_true",
                        help="freeze both encoders and cache their outputs (smoke and cpu default)")
    p.add_argument("--cache", type=Path, default=cache_root(),
                   help="cache of preprocessed CTs and frozen-encoder outputs (default $ICHPRO_CACHE "
                        "or ~/.cache/ichpro)")
    p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ichpro`` console script: errors and warnings as one line each."""
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.showwarning = _show_warning
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
