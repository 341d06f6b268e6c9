"""The profile's training choices measured on a *design cohort*: the profile's cohort spec drawn with
another seed, so that no choice is made on the reference cohort's test folds (not a speed benchmark,
and not run by ``run_all.py``: about 35 minutes on 2 cores for the cpu profile's six default
variants, plus 7 for ``earlier``'s pretraining).

    .venv/bin/python bench/design_cohort.py [--profile cpu] [--seed 2] [--variants lr3e-4 ...]

Variants of the profile (``VARIANTS``):

* ``earlier``: the vision pretraining before the image findings (batches of 8, 10 epochs,
  segmentation and volume only);
* ``lr3e-4``, ``lr3e-3``: the profile with another learning rate;
* ``no-dropout``, ``dropout0.3``, ``dropout0.5``, ``dropout0.7``: the profile with that share of
  training samples whose vision grid the fusion does not see (``ModelConfig.vision_dropout``);
* ``numbers1``, ``numbers3``, ``numbers10``: ICHPro's loss with the ``numbers`` term beside VTMF at
  weight 1, 3 or 10 (the fused representation also regresses the patient's age and GCS;
  ``ichpro.losses``);
* ``configured``: the profile as it is.

For each: the out-of-fold AUC of Table 1's text only, vision only and ICHPro; each row's best mean
inner-validation AUC (over the 5 folds, per epoch) and the epoch it comes at, and the mean of the
three, which is what the learning rate is chosen on (the vision dropout, which changes ICHPro alone,
on ICHPro's); CMAF's text -> vision localisation on 40 patients (half per outcome; mass ratio, 1 =
uniform, and pointing-game hit rate); and the counterfactual of notebook 11 on 24 good-outcome
patients (GCS -> 5, age -> 85: ICHPro's mean change of P(bad), the oracle's, and how often their
signs agree; ``--quick``: 8 and 6 patients); the same localisation for the map weighted by its gradient
(``ichpro.heatmaps.gradient_weighted_attention``). Runs are keyed by their config, so variants share
the rows they do not change. Unlike the speed benchmarks it uses the real pretrained encoders, in the
cache ``make reproduce`` fills (``--cache``), where each variant's pretraining has its own key.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import common
import pandas as pd
from sklearn.metrics import roc_auc_score

from ichpro.cohort import ensure_cohort
from ichpro.config import cache_root, get_profile
from ichpro.experiments import row_folder, run_rows, table_rows
from ichpro.explain import counterfactual_table, localisation_summary, localisation_table
from ichpro.heatmaps import GRADIENT_WEIGHTED
from ichpro.losses import VTMF
from ichpro.manifest import load_manifest
from ichpro.predict import load_run
from ichpro.train import OOF_FILE
from ichpro.views.attention import counterfactual_summary, good_outcomes_to_edit

VARIANTS = {
    "earlier": {"pretrain": {"batch_size": 8, "epochs": 10, "radiology_weight": 0.0}},
    "lr3e-4": {"train": {"lr": 3e-4}},
    "configured": {},
    "lr3e-3": {"train": {"lr": 3e-3}},
    "no-dropout": {"model": {"vision_dropout": 0.0}},
    "dropout0.3": {"model": {"vision_dropout": 0.3}},
    "dropout0.5": {"model": {"vision_dropout": 0.5}},
    "dropout0.7": {"model": {"vision_dropout": 0.7}},
    "numbers1": {"loss": {"terms": (*VTMF, ("numbers", 1.0))}},
    "numbers3": {"loss": {"terms": (*VTMF, ("numbers", 3.0))}},
    "numbers10": {"loss": {"terms": (*VTMF, ("numbers", 10.0))}},
}
DEFAULT_VARIANTS = ["lr3e-4", "configured", "lr3e-3", "no-dropout", "dropout0.3", "dropout0.7"]
ROWS = ("Text only", "Vision only", "ICHPro")
MAP = "stage1_cmaf_text_to_vision"
CHANGES = {"gcs": 5, "age": 85}  # notebook 11's counterfactual edit


def variant_profile(name: str, profile_name: str):
    """The profile with the variant's pretraining, model and training changes."""
    profile = get_profile(profile_name)
    parts = VARIANTS[name]
    model = replace(profile.model, **parts.get("model", {}))
    pretrain = replace(profile.pretrain, **parts.get("pretrain", {}))
    train = replace(profile.train, **parts.get("train", {}))
    loss = replace(profile.loss, **parts.get("loss", {}))
    return replace(profile, model=model, loss=loss, pretrain=pretrain, train=train)


def inner_validation_curve(run_dir: Path) -> pd.Series:
    """Mean inner-validation AUC over the folds, per epoch."""
    return pd.read_csv(run_dir / "metrics.csv").groupby("epoch")["val_auc"].mean()


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu"])
    parser.add_argument("--seed", type=int, default=2,
                        help="the design cohort's seed (the reference one's: data_synthetic/<profile>.yaml)")
    parser.add_argument("--patients", type=int, help="design cohort size (default: the profile's cohort's)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/design", help="folder for the cohort and the runs")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "ichpro"),
                        help="the cache of pretrained encoders and features (default: make reproduce's)")
    args = common.parse(parser, argv, quick={"profile": "smoke", "patients": 40,
                                              "variants": ["configured"], "out": "runs/design-quick"})
    os.environ["ICHPRO_CACHE"] = args.cache  # ichpro.config.cache_root() reads it at each call
    out = Path(args.out) / args.profile
    cohort = ensure_cohort(get_profile(args.profile).cohort, out / f"cohort-seed{args.seed}", seed=args.seed,
                           n_patients=args.patients, progress=False)
    manifest = load_manifest(cohort / "manifest.csv")
    per_outcome, edits = (4, 6) if args.quick else (20, 24)  # patients of the localisation, of the edit
    ids = [pid for label in (0, 1)
           for pid in manifest.loc[manifest["label"] == label, "patient_id"][:per_outcome]]
    good = good_outcomes_to_edit(manifest, CHANGES)[:edits]
    truth = pd.read_csv(cohort / "truth.csv")
    rows = [r for r in table_rows("table1_modalities") if r.name in ROWS]
    table = []
    for name in args.variants:
        profile = variant_profile(name, args.profile)
        predictions = run_rows(rows, profile, manifest, out, quiet=True, cache_dir=cache_root())
        folders = [row_folder(out, profile, row, 0) for row in rows]
        curves = [inner_validation_curve(folder) for folder in folders]
        ichpro = load_run(folders[-1])  # rows end with ICHPro
        located = localisation_summary(localisation_table(ichpro, cohort / "manifest.csv", ids))
        edited = counterfactual_summary(counterfactual_table(
            ichpro, manifest, pd.read_csv(folders[-1] / OOF_FILE), good, CHANGES, truth))
        table.append([name, *(roc_auc_score(p["label"], p["p_bad"]) for p in predictions.values()),
                      *(f"{c.max():.3f} ({int(c.idxmax())})" for c in curves),
                      sum(c.max() for c in curves) / len(curves),
                      *(located.loc[m, measure] for m in (MAP, MAP + GRADIENT_WEIGHTED)
                        for measure in ("ratio", "pointing_hit")),
                      f"{edited['model mean ΔP(bad)']:+.3f} ({edited['oracle mean ΔP(bad)']:+.3f})",
                      edited["same sign as the oracle"]])
    common.print_table(
        f"Design cohort: {args.profile} spec, seed {args.seed}, {len(manifest)} patients "
        "(never the reference cohort)",
        ["variant", *(f"{r} AUC" for r in ROWS), *(f"{r} best inner-val AUC (epoch)" for r in ROWS),
         "mean best inner-val AUC", "CMAF text->vision ratio", "pointing hit rate",
         "× gradient: ratio", "pointing hit rate",
         "ICHPro mean ΔP(bad) (oracle)", "same sign"], table,
        [f"Variants: {', '.join(f'{k} = {v}' for k, v in VARIANTS.items() if k in args.variants)}.",
         "Out-of-fold AUC over the design cohort; inner-validation AUC averaged over the 5 folds per "
         "epoch, its best epoch in brackets."])


if __name__ == "__main__":
    main()
