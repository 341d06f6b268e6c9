"""What the frozen report states can add to the CT, measured with linear late-fusion probes (not a
speed benchmark, and not run by ``run_all.py``; about 2 minutes on 2 cores once the runs exist).

    .venv/bin/python bench/fusion_headroom.py [--cohort data_synthetic/cpu] [--runs runs/cpu/tables] [--quick]

For each image input (the vision-only model's out-of-fold logit, one per training seed of Table 1,
and the cohort's true image variables through the outcome model's image-only logit) a logistic
regression fuses it with what is read from the report's mean-pooled states at the cpu profile's
text layer (``ichpro.probes.late_fusion_probe``):

* **nothing**: the image input alone;
* **outcome**: a probe of the states fitted on the outcome, the signal the fusion's training gives;
* **age and GCS**: ridge regressions of the states onto the patients' recorded age and GCS;
* **true age and GCS**: the numbers themselves, no reading (a ceiling).

Each line gives the out-of-fold AUC, the DeLong p against the image input alone, and the report
edit of notebook 11 (GCS -> 5, age -> 85) on every good-outcome patient whose report states both:
the mean change of P(bad) against the cohort's outcome model's (the oracle's). ICHPro's own line
(the trained model, same folds and seeds) closes each seed's block. Run it on the reference run
after ``make reproduce`` (the defaults), or on the design cohort of ``bench/design_cohort.py``
(``--cohort runs/design/cpu/cohort-seed2 --runs runs/design/cpu``, or with ``--profile smoke`` the
runs of its ``--quick``); ``--quick`` takes the first seed only.
"""

from __future__ import annotations

from pathlib import Path

import common
import numpy as np
import pandas as pd
from scipy.special import logit
from sklearn.metrics import r2_score, roc_auc_score

from ichpro.clinical import clinical_fields
from ichpro.cohort import OUTCOME_MODEL
from ichpro.config import get_profile
from ichpro.experiments import row_folder, table_rows
from ichpro.explain import edit_report
from ichpro.manifest import load_manifest
from ichpro.metrics import delong_test
from ichpro.probes import GivenNumbers, NumberReader, OutcomeReader, late_fusion_probe, pooled_layer_states
from ichpro.text import load_text_backbone, tokenize
from ichpro.train import OOF_FILE, read_predictions, split_folds
from ichpro.views.attention import good_outcomes_to_edit

CHANGES = {"gcs": 5, "age": 85}  # notebook 11's counterfactual edit
NUMBERS = ["age", "gcs"]


def report_states(texts: list[str], profile, cohort_reports: list[str]) -> np.ndarray:
    """Mean-pooled states of the reports at the profile's text layer (N, H) (a tiny encoder is built
    from the cohort's reports, as its runs' seed 0 is)."""
    backbone = load_text_backbone(profile.model.text_encoder, reports=cohort_reports, seed=0)
    tokens = tokenize(backbone.tokenizer, texts, profile.model.max_tokens)
    layers = pooled_layer_states(backbone.model, tokens["input_ids"], tokens["attention_mask"])
    return layers[profile.model.text_layers or -1]


def clipped_logit(p: pd.Series) -> np.ndarray:
    """The logit of probabilities kept inside (1e-6, 1 - 1e-6), so that 0 and 1 stay finite."""
    return logit(p.clip(1e-6, 1 - 1e-6).to_numpy())


def oof_logit(run_dir: Path, patient_ids: pd.Series) -> np.ndarray:
    """A run's out-of-fold logit of P(bad), in the manifest's patient order."""
    oof = read_predictions(run_dir / OOF_FILE).set_index("patient_id")["p_bad"]
    return clipped_logit(oof.loc[patient_ids.astype(str)])


def number_reading(text: np.ndarray, text_after: np.ndarray, numbers: np.ndarray, folds,
                   edited: np.ndarray) -> str:
    """How well the age and GCS reader reads, out of fold: R² of each number, and the mean reading of
    the edited reports."""
    read, read_after = np.full_like(numbers, np.nan), np.full_like(numbers, np.nan)
    for fold in folds:
        rest = np.setdiff1d(np.arange(len(numbers)), fold.test)
        reader = NumberReader().fit(text[rest], None, numbers[rest])
        read[fold.test] = reader.read(text[fold.test])
        read_after[fold.test] = reader.read(text_after[fold.test])
    return "; ".join(f"{name}: R² {r2_score(numbers[:, i], read[:, i]):.2f}, the edited reports "
                     f"({CHANGES[name]}) read as {read_after[edited, i].mean():.1f} on average"
                     for i, name in enumerate(NUMBERS))


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu"], help="the runs' profile")
    parser.add_argument("--cohort", default="data_synthetic/cpu", help="cohort folder (manifest, truth)")
    parser.add_argument("--runs", default="runs/cpu/tables", help="the tables' run folder (holding runs/)")
    args = common.parse(parser, argv)
    profile = get_profile(args.profile)
    cohort = Path(args.cohort)
    manifest = load_manifest(cohort / "manifest.csv")
    truth = pd.read_csv(cohort / "truth.csv").set_index("patient_id").loc[manifest["patient_id"]]
    labels = manifest["label"].to_numpy()
    edited = np.flatnonzero(manifest["patient_id"].isin(good_outcomes_to_edit(manifest, CHANGES)))
    before = [edit_report(manifest["report"].iloc[i]) for i in edited]
    after = [edit_report(text, **CHANGES) for text in before]
    states = report_states([*manifest["report"], *before, *after], profile, manifest["report"].tolist())
    n, m = len(manifest), len(edited)
    text, text_before, text_after = states[:n], np.zeros_like(states[:n]), np.zeros_like(states[:n])
    text_before[edited], text_after[edited] = states[n:n + m], states[n + m:]
    numbers = clinical_fields(manifest)[NUMBERS].to_numpy(float)
    numbers_after = numbers.copy()
    numbers_after[:, [NUMBERS.index(k) for k in CHANGES]] = [CHANGES[k] for k in CHANGES]
    seed0 = split_folds(labels, profile.train.n_folds, profile.train.val_fraction, 0)
    oracle = (OUTCOME_MODEL.p_bad(truth.assign(**CHANGES)) - OUTCOME_MODEL.p_bad(truth))[edited]
    readers = {"outcome": (OutcomeReader, text, text_before, text_after),
               "age and GCS": (NumberReader, text, text_before, text_after),
               "true age and GCS": (GivenNumbers, numbers, numbers, numbers_after)}
    rows_by_name = {r.name: r for r in table_rows("table1_modalities")}
    vision, ichpro = rows_by_name["Vision only"], rows_by_name["ICHPro"]
    seeds = range(1 if args.quick else vision.seeds)
    finished = {s: row_folder(args.runs, profile, vision, s) for s in seeds}
    finished = {s: folder for s, folder in finished.items() if (folder / OOF_FILE).is_file()}
    if not finished:
        raise SystemExit(f"no finished vision-only run under {args.runs}: run make reproduce (or "
                         "bench/design_cohort.py for the design cohort) first")
    images = {f"vision only, seed {s}": (s, oof_logit(folder, manifest["patient_id"]))
              for s, folder in finished.items()}
    images["true image variables"] = (None, clipped_logit(truth["p_bad_oracle_image"]))
    reading = number_reading(text, text_after, numbers, seed0, edited)
    table = []
    for image_name, (seed, image) in images.items():
        folds = split_folds(labels, profile.train.n_folds, profile.train.val_fraction, seed or 0)
        table.append([image_name, "nothing", roc_auc_score(labels, image), "", "", ""])
        for reader_name, (reader, features, feat_before, feat_after) in readers.items():
            probe = late_fusion_probe(reader, features, image, labels, folds, numbers=numbers,
                                      text_before=feat_before, text_after=feat_after)
            auc, _, p = delong_test(labels, probe["p_bad"], image)
            change = (probe["p_after"] - probe["p_before"])[edited]
            share = change.mean() / oracle.mean()
            table.append([image_name, reader_name, auc, p, f"{change.mean():+.3f} ({share:.2f})",
                          float((np.sign(change) == np.sign(oracle)).mean())])
        if seed is not None:
            run = row_folder(args.runs, profile, ichpro, seed)
            if (run / OOF_FILE).is_file():
                auc, _, p = delong_test(labels, oof_logit(run, manifest["patient_id"]), image)
                table.append([image_name, "ICHPro (trained)", auc, p, "", ""])
    common.print_table(
        f"Late fusion of the report's frozen states with an image logit: {cohort} ({n} patients)",
        ["image input", "read from the report", "AUC", "DeLong p vs the image input alone",
         "report edit: mean ΔP(bad) (share of the oracle's)", "same sign as the oracle"], table,
        [f"Report edit GCS -> 5, age -> 85 on {m} good-outcome patients; the oracle's mean ΔP(bad) is "
         f"{oracle.mean():+.3f}.",
         "ICHPro's own report edit: notebook 11 (the reference run) or bench/design_cohort.py.",
         f"The age and GCS reader, out of fold (seed 0 folds): {reading}.",
         f"States: {profile.model.text_encoder} layer {profile.model.text_layers}, mean-pooled. Each probe "
         "uses the folds of its vision-only run's seed (seed 0 for the true image variables); the fusion "
         "learns its weights from the other folds' out-of-fold logits."])


if __name__ == "__main__":
    main()
