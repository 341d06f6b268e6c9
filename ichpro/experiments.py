"""The paper's result tables as named grids of configs: run them (resumably) and aggregate the results.

A table is a list of :class:`Row`: each row changes the profile (modality, fusion structure, loss
terms, or the reports) and is cross-validated with the same folds and seed as every other row.
Each row's run lives in ``<out>/runs/<row>-<hash>/``, keyed by its full config, so a row shared
by several tables (ICHPro itself) is trained once, and a finished row is never retrained.

:func:`summarize` turns the rows' out-of-fold predictions into the published columns with 95 %
bootstrap CIs, the DeLong p-value of each row's AUC against the table's reference row (ICHPro), and
the ceiling: the AUC of the synthetic cohort's oracle for the row's inputs (``truth.csv``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import expit, logit
from scipy.stats import spearmanr
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, mean_absolute_error, r2_score

from ichpro.clinical import clinical_fields
from ichpro.cohort import ensure_cohort
from ichpro.config import LossConfig, Profile
from ichpro.data import config_hash
from ichpro.errors import IchproError
from ichpro.losses import parse_loss_spec
from ichpro.manifest import haematoma_volumes, load_manifest
from ichpro.metrics import classification_metrics, delong_test, metrics_over_seeds
from ichpro.paper import reported_tables
from ichpro.plots import plot_table_auc, save_figure
from ichpro.repeated_cv import call_difference, compare_over_seeds, holm
from ichpro.reports import drop_field
from ichpro.runtime import resolve_device
from ichpro.train import (
    OOF_FILE,
    cross_validate_seeds,
    prepare_vision_weights,
    read_predictions,
    uses_pretrained_vision,
)

TABLE_METRICS = ("accuracy", "recall", "precision", "f1", "auc")
#: the oracle probability column of truth.csv that bounds a row, by the inputs the row sees
CEILINGS = {"all": "p_bad_oracle", "image": "p_bad_oracle_image", "report": "p_bad_oracle_report",
            "report_no_stay": "p_bad_oracle_report_no_stay"}


#: Training seeds of a row: repeated cross-validation, each seed with its own folds, inner splits and
#: initialisation; as many as a cold ``make reproduce`` affords on 2 cores. A row on cached encoder
#: outputs trains its seeds' folds as one batched fit; an image network trained from scratch trains one
#: fold at a time (batched, its convolutions run slower), so it gets one seed (``bench/README.md``,
#: "Seeds and the reproduction's budget").
SEEDS, SCRATCH_SEEDS = 3, 1


@dataclass(frozen=True)
class Row:
    """One row of a results table: what it changes in the profile and how it is compared."""

    name: str
    paper: str | None = None  # the paper's row label in paper_tables.csv (None: not in the paper)
    ceiling: str = "all"  # key of CEILINGS: the oracle bounding the inputs the row sees
    model: dict = field(default_factory=dict)  # ModelConfig fields to replace
    loss: str | None = None  # loss spec ("ce,imima"); None keeps the profile's (VTMF)
    train: dict = field(default_factory=dict)  # TrainConfig fields to replace
    drop_stay: bool = False  # reports without the outcome-leaking Hospital Stay field
    reference: bool = False  # the row the others are tested against (ICHPro)
    seeds: int = SEEDS  # training seeds (seed, seed + 1, ...): repeated cross-validation
    versus: tuple[str, ...] = ()  # rows it is also tested against, besides the reference


#: The companion's variant of ICHPro (beyond the paper): the paper's model and loss plus a head that
#: regresses age and GCS from the fused representation (loss term ``numbers``, weight 3), without the
#: vision dropout; both settings were chosen on the design cohort (``docs/cpu_settings.md``).
VARIANT = "ICHPro + age/GCS head (ours)"
VARIANT_CHANGES = {"model": {"vision_dropout": 0.0}, "loss": "vtmf,numbers=3"}


#: Comparators that train their 3D backbone from scratch: lr 1e-3 (the multi-task DenseNet's authors
#: trained with lr 1e-3 too), batch 16, at a constant rate, so early stopping after 4 epochs without
#: a better inner-validation AUC ends them; the maximum number of epochs is the profile's.
FROM_SCRATCH = {"lr": 1e-3, "batch_size": 16, "lr_schedule": "constant", "patience": 4}

TABLES: dict[str, tuple[str, list[Row]]] = {
    "table1_modalities": ("1_modalities", [
        Row("Text only", "Text only", "report", {"modality": "text"}, "ce"),
        Row("Vision only", "Vision only", "image", {"modality": "vision"}, "ce", versus=("Text only",)),
        Row("ICHPro", "ICHPro (text + vision)", reference=True),
        Row(VARIANT, **VARIANT_CHANGES, versus=("Text only", "Vision only")),
        Row("Text only, positional TRT", None, "report", {"modality": "text", "trt": "positional"}, "ce"),
        Row("Text only, no Hospital Stay", None, "report_no_stay", {"modality": "text"}, "ce",
            drop_stay=True),
        Row("ICHPro, no Hospital Stay", None, drop_stay=True),
    ]),
    "table2_fusion": ("2_fusion", [
        Row("Self", "Self Attention", model={"fusion": "self"}),
        Row("Cross", "Cross Attention", model={"fusion": "cross"}, versus=("Self",)),
        Row("Self-Self", "Self-Self Attention", model={"fusion": "self-self"}),
        Row("Cross-Cross", "Cross-Cross Attention", model={"fusion": "cross-cross"}, versus=("Self-Self",)),
        Row("Self-Cross", "Self-Cross Attention", model={"fusion": "self-cross"}),
        Row("Cross-Self (ICHPro)", "Cross-Self Attention (ICHPro)", reference=True),
    ]),
    "table3_losses": ("3_losses", [
        Row("CE only", None, loss="ce"),
        Row("CE + blend", "L_blend", loss="ce,blend"),
        Row("CE + CMPM", "L_cmpm", loss="ce,cmpm"),
        Row("CE + CMFA", "L_CMFA", loss="ce,cmfa"),
        Row("CE + IMIMA", "L_IMIMA", loss="ce,imima", versus=("CE + SDM", "CE + MLM")),
        Row("CE + SDM", "L_SDM", loss="ce,sdm"),
        Row("CE + MLM", "L_MLM", loss="ce,mlm"),
        Row("CE + IMIMA + SDM", "L_IMIMA + alpha L_SDM", loss="ce,imima,sdm"),
        Row("CE + IMIMA + MLM", "L_IMIMA + beta L_MLM", loss="ce,imima,mlm"),
        Row("VTMF (ICHPro)", "L_VTMF (ICHPro)", loss="vtmf", reference=True),
    ]),
    "table4_comparison": ("4_comparison", [
        *(Row(name, paper, inputs, {"comparator": comparator}, "ce", train=FROM_SCRATCH,
              seeds=SCRATCH_SEEDS)
          for name, paper, inputs, comparator in [
              ("Slice 2D CNN", "Image-Based Method (2D) [6]", "image", "slice2d"),
              ("Image + GCS late fusion", "GCS-ICHNet (2D)", "all", "image+gcs"),
              ("Small 3D CNN", "DL-Based Method (3D) [8]", "image", "small3dcnn"),
              ("DenseNet, prognosis only", None, "image", "densenet"),
              ("DenseNet + bin GCS + bin age", None, "image", "densenet+bin_gcs+bin_age"),
              ("DenseNet + ord GCS + bin age", "Multi-Task Method (3D) [18]", "image",
               "densenet+ord_gcs+bin_age"),
              ("ResNet, prognosis only", None, "image", "quantification_single"),
              ("ResNet, volume + prognosis", None, "image", "quantification"),
              ("VDAFM (image, table, template text)", None, "all", "vdafm"),
          ]),
        Row("Concatenation late fusion", None, "all", {"comparator": "concat_late"}, "ce"),
        Row("Logistic regression, clinical fields", None, "all", {"comparator": "logistic_regression"}, "ce"),
        Row("ICH score", None, "all", {"comparator": "ich_score"}, "ce"),
        Row("FUNC score", None, "all", {"comparator": "func_score"}, "ce"),
        Row(VARIANT, **VARIANT_CHANGES),
        Row("ICHPro", "ICHPro", reference=True),
    ]),
}
#: A second draw of the cohort, to check that the verdicts of Tables 1 and 4 do not hang on one draw:
#: the same spec with a seed on which no setting was chosen (neither the reference cohort's, the
#: spec's own, nor the design cohort's, 2), and the rows behind those verdicts, one training seed each.
SECOND_COHORT_SEED = 7
SECOND_COHORT_ROWS = ("Text only", "Vision only", "ICHPro", VARIANT, "Logistic regression, clinical fields",
                      "ICH score", "FUNC score")


def second_cohort_dir(data_dir: str | Path) -> Path:
    """Where the second draw of a generated cohort ``data_dir`` lives: beside it."""
    data_dir = Path(data_dir)
    return data_dir.parent / f"{data_dir.name}-seed{SECOND_COHORT_SEED}"


def run_second_cohort(profile: Profile, data_dir: str | Path, out: str | Path, *, seed: int = 0,
                      cache_dir: Path | None = None, n_boot: int = 1000, workers: int = 1,
                      quiet: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Draw the profile's cohort again with :data:`SECOND_COHORT_SEED` (once, beside ``data_dir``),
    run :func:`second_cohort_rows` on it into ``out`` (finished runs are loaded) and return the
    summary and the comparisons, as :func:`run_table` does for a table."""
    cohort = ensure_cohort(profile.cohort, second_cohort_dir(data_dir), seed=SECOND_COHORT_SEED,
                           progress=not quiet)
    manifest, truth = load_manifest(cohort / "manifest.csv"), pd.read_csv(cohort / "truth.csv")
    rows = second_cohort_rows()
    train_rows([(row, s) for row in rows for s in row_seeds(row, seed)], profile, manifest, out,
               workers=workers, resume=True, quiet=quiet, cache_dir=cache_dir)
    predictions = load_predictions(rows, profile, out, seed)
    return summarize(rows, predictions, None, truth, n_boot=n_boot, seed=seed), comparisons(rows, predictions)


def second_cohort_rows() -> list[Row]:
    """The rows trained on the second cohort draw (:data:`SECOND_COHORT_ROWS`), one seed each."""
    by_name = {r.name: r for table in ("table1_modalities", "table4_comparison") for r in table_rows(table)}
    return [replace(by_name[name], seeds=1) for name in SECOND_COHORT_ROWS]


#: Comparators Table 4 leaves out to keep ``make reproduce`` near an hour on 2 cores: three of the
#: multi-task DenseNet's six variants (the table keeps prognosis only, both binary heads, and the
#: paper's ordinal GCS + age). ``ichpro train --comparator`` trains them all.
NOT_IN_TABLE4 = ("densenet+bin_age", "densenet+bin_gcs", "densenet+ord_gcs")
#: Tables that also report each row's trainable parameters and training time per fold.
COSTED_TABLES = ("table4_comparison",)


def table_rows(name: str) -> list[Row]:
    """The rows of a named table (clear error for an unknown name)."""
    if name not in TABLES:
        raise IchproError(f"unknown table {name!r}; choose one of {', '.join(TABLES)}")
    return TABLES[name][1]


def row_loss(profile: Profile, row: Row) -> LossConfig:
    """The loss a row trains with: its own terms, or the profile's (the paper's VTMF on ``cpu``)."""
    return profile.loss if row.loss is None else replace(profile.loss, terms=parse_loss_spec(row.loss))


def row_profile(profile: Profile, row: Row) -> Profile:
    """The profile a row trains: its model, loss and training changes applied, and
    neither a vision pretraining nor a vision dropout its model does not use (so that a row's run
    folder, keyed by this profile, does not change with settings it never reads)."""
    model = replace(profile.model, **row.model)
    loss = row_loss(profile, row)
    if model.modality != "both" or model.comparator:
        model = replace(model, vision_dropout=0.0)
    trained = replace(profile, model=model, loss=loss, train=replace(profile.train, **row.train))
    return trained if uses_pretrained_vision(trained) else replace(trained, pretrain=None)


def row_manifest(manifest: pd.DataFrame, row: Row) -> pd.DataFrame:
    """The manifest a row sees (reports without Hospital Stay for ``drop_stay`` rows)."""
    if not row.drop_stay:
        return manifest
    return manifest.assign(report=[drop_field(text, "hospital_stay_days") for text in manifest["report"]])


def row_folder(out: Path, profile: Profile, row: Row, seed: int) -> Path:
    """The run folder of a row, named and keyed by its config, reports and seed (not by the row's
    name: rows of different tables with the same config share it)."""
    trained = row_profile(profile, row)
    key = config_hash({"profile": asdict(trained), "drop_stay": row.drop_stay, "seed": seed})
    model = trained.model
    name = (model.comparator or model.fusion) if model.modality == "both" else f"{model.modality}-only"
    name += "-" + "+".join(term for term, _ in trained.loss.terms) + ("-no-stay" if row.drop_stay else "")
    return Path(out) / "runs" / f"{name}-{key[:10]}"


def train_rows(jobs: list[tuple[Row, int]], profile: Profile, manifest: pd.DataFrame, out: str | Path, *,
               resume: bool = False, quiet: bool = False, cache_dir: Path | None = None,
               train: Callable | None = None, workers: int = 1) -> None:
    """Cross-validate every ``(row, seed)`` job whose run is not finished yet; a row's seeds train
    together (:func:`ichpro.train.cross_validate_seeds`: one batched fit of their folds).

    A finished run is left alone; an interrupted one continues with ``resume``. ``workers`` > 1
    trains that many rows at once, each in its own process with ``cores // workers`` threads (on a
    CPU, two batched fits on one thread each outrun one on two threads: ``bench/batched_fit.py``). A
    line per trained row is printed unless ``quiet``; the progress bars only on a terminal and with
    one worker. ``train`` (default :func:`ichpro.train.cross_validate_seeds`) fits one row's seeds;
    with several workers it must be a module-level function. Each seed's ``timing.json`` holds its
    share of the row's time.
    """
    rows: dict[str, tuple[Row, list[int]]] = {}
    for row, s in jobs:
        if not (row_folder(out, profile, row, s) / OOF_FILE).is_file():
            rows.setdefault(row.name, (row, []))[1].append(s)
    todo = list(rows.values())
    options = {"profile": profile, "manifest": manifest, "out": out, "resume": resume, "cache_dir": cache_dir,
               "train": train}
    for trained in {row_profile(profile, row) for row, _ in todo}:  # once, before any worker starts
        prepare_vision_weights(trained, quiet)
    if workers <= 1 or len(todo) <= 1:
        for i, (row, seeds) in enumerate(todo, 1):
            if not quiet:
                print(f"[{i}/{len(todo)}] {row.name}{_seeds_label(seeds)}: training in runs/"
                      f"{row_folder(out, profile, row, seeds[0]).name}", flush=True)
            _train_row(row, seeds, quiet=quiet or not sys.stderr.isatty(), **options)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn"),
                             initializer=_start_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_train_row, row, seeds, quiet=True, **options): (row, seeds)
                   for row, seeds in todo}
        if not quiet:
            print(f"training {len(todo)} rows, {min(workers, len(todo))} at once ({threads} thread(s) each)",
                  flush=True)
        for i, future in enumerate(as_completed(futures), 1):
            seconds = future.result()
            row, seeds = futures[future]
            if not quiet:
                print(f"[{i}/{len(todo)}] {row.name}{_seeds_label(seeds)}: done in {seconds:.0f} s",
                      flush=True)


def _start_worker(threads: int) -> None:
    """A training process: ``threads`` torch threads, and no weight-loading bars on the shared stderr
    (a notebook would show them as error output)."""
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def default_workers(profile: Profile) -> int:
    """Rows to train at once: one per core (at most 4) on a CPU, one on a GPU. Image networks trained
    from scratch are convolution-bound and train faster one run at a time on every core
    (``bench/batched_fit.py``)."""
    return min(4, os.cpu_count() or 1) if resolve_device(profile.train.device).type == "cpu" else 1


def _seeds_label(seeds: list[int]) -> str:
    return f" (seed {seeds[0]})" if len(seeds) == 1 else f" (seeds {seeds[0]}-{seeds[-1]})"


def _train_row(row: Row, seeds: list[int], *, profile: Profile, manifest: pd.DataFrame, out: str | Path,
               resume: bool, quiet: bool, cache_dir: Path | None, train: Callable | None) -> float:
    """Cross-validate one row with its ``seeds`` together; returns the seconds taken and records each
    seed's share in its folder's ``timing.json``."""
    train = cross_validate_seeds if train is None else train
    folders = {s: row_folder(out, profile, row, s) for s in seeds}
    start = time.perf_counter()
    train(row_profile(profile, row), row_manifest(manifest, row), folders,
          resume=resume or any(f.is_dir() for f in folders.values()), quiet=quiet, cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    for folder in folders.values():
        (folder / "timing.json").write_text(json.dumps({"seconds": seconds / len(seeds)}) + "\n")
    return seconds


def run_rows(rows: list[Row], profile: Profile, manifest: pd.DataFrame, out: str | Path, *, seed: int = 0,
             **run_options) -> dict[str, pd.DataFrame]:
    """Each row's out-of-fold predictions with ``seed``, trained first where not finished
    (:func:`train_rows` and its options)."""
    train_rows([(row, seed) for row in rows], profile, manifest, out, **run_options)
    return {row.name: read_predictions(row_folder(out, profile, row, seed) / OOF_FILE) for row in rows}


def row_seeds(row: Row, seed: int = 0) -> range:
    """The training seeds of a row: ``seed, seed + 1, ...`` (:attr:`Row.seeds` of them)."""
    return range(seed, seed + row.seeds)


def load_predictions(rows: list[Row], profile: Profile, out: str | Path, seed: int = 0
                     ) -> dict[str, dict[int, pd.DataFrame]]:
    """Each row's out-of-fold predictions per training seed (``row name -> seed -> table``), from
    finished runs."""
    return {row.name: {s: read_predictions(row_folder(out, profile, row, s) / OOF_FILE)
                       for s in row_seeds(row, seed)} for row in rows}


def summarize(rows: list[Row], predictions: dict[str, dict[int, pd.DataFrame]], paper_table: str | None,
              truth: pd.DataFrame | None = None, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One line per row: the paper's numbers; ours as the mean over the row's training seeds of each
    pooled out-of-fold metric, with a 95 % patient-bootstrap interval of that mean
    (:func:`ichpro.metrics.metrics_over_seeds`); the AUC's range and sd over the seeds and each seed's
    AUC (``auc_seed<k>``); the comparison with the table's reference row (:func:`comparisons`:
    ``difference``, its interval, ``p``, ``p_holm``, ``delong_p_median``, ``call``); the ceiling."""
    paper = _paper_rows(paper_table)
    tests = comparisons(rows, predictions)
    reference = next((r.name for r in rows if r.reference), None)
    versus_reference = tests[tests["b"] == reference].set_index("a") if reference else tests.iloc[:0]
    lines = []
    for row in rows:
        runs = {s: o.sort_values("patient_id").reset_index(drop=True)
                for s, o in predictions[row.name].items()}
        first = next(iter(runs.values()))
        scores = metrics_over_seeds(first["label"], [o["p_bad"].to_numpy() for o in runs.values()],
                                    n_boot=n_boot, seed=seed, metrics=TABLE_METRICS).set_index("metric")
        line: dict = {"row": row.name, "n_seeds": len(runs)}
        for metric in TABLE_METRICS:
            line[f"paper_{metric}"] = paper.get(row.paper, {}).get(metric, np.nan)
            line[metric] = scores.at[metric, "value"]
            line[f"{metric}_ci_low"] = scores.at[metric, "ci_low"]
            line[f"{metric}_ci_high"] = scores.at[metric, "ci_high"]
        line.update(auc_seed_min=scores.at["auc", "seed_min"], auc_seed_max=scores.at["auc", "seed_max"],
                    auc_seed_sd=scores.at["auc", "seed_sd"])
        line.update({f"auc_seed{s}": _pooled_auc(o) for s, o in runs.items()})
        test = versus_reference.loc[row.name] if row.name in versus_reference.index else None
        for column in COMPARISON_COLUMNS:
            line[column] = np.nan if test is None else test[column]
        line["ceiling_auc"] = _ceiling(truth, first, row.ceiling)
        lines.append(line)
    table = pd.DataFrame(lines)
    seeds = sorted(c for c in table if c.startswith("auc_seed") and c[8:].isdigit())
    return table[[c for c in table if c not in seeds] + seeds]


#: the columns of a comparison that :func:`summarize` copies into the reference's table
COMPARISON_COLUMNS = ("difference", "difference_ci_low", "difference_ci_high", "difference_seed_min",
                      "difference_seed_max", "p", "p_holm", "delong_p_median", "call")


def comparisons(rows: list[Row], predictions: dict[str, dict[int, pd.DataFrame]]) -> pd.DataFrame:
    """Every comparison a table makes (each row ``a`` against the reference ``b``, and against the rows
    of its :attr:`Row.versus`), on the training seeds both rows have: the two AUCs (means over those
    seeds), the mean per-fold AUC difference ``a - b`` with its 95 % interval and the range of the
    seeds' means, the corrected repeated-CV t-test's ``p``, Holm-adjusted over the table's comparisons
    (``p_holm``), the median per-seed DeLong p, and the :func:`ichpro.repeated_cv.call_difference`."""
    reference = next((r.name for r in rows if r.reference), None)
    pairs = [(r.name, reference) for r in rows if reference and r.name != reference]
    pairs += [(r.name, other) for r in rows for other in r.versus]
    lines = []
    for a, b in pairs:
        common = sorted(set(predictions[a]) & set(predictions[b]))
        if not common:
            raise IchproError(f"rows {a!r} and {b!r} share no training seed")
        runs_a, runs_b = ({s: predictions[name][s] for s in common} for name in (a, b))
        test = compare_over_seeds(runs_a, runs_b)
        lines.append({"a": a, "b": b, "n_seeds": test["n_seeds"],
                      "auc_a": np.mean([_pooled_auc(o) for o in runs_a.values()]),
                      "auc_b": np.mean([_pooled_auc(o) for o in runs_b.values()]),
                      "difference": test["mean"], "difference_ci_low": test["ci_low"],
                      "difference_ci_high": test["ci_high"], "difference_seed_min": test["seed_mean_min"],
                      "difference_seed_max": test["seed_mean_max"], "t": test["t"], "df": test["df"],
                      "p": test["p"], "delong_p_median": test["delong_p_median"]})
    columns = ["a", "b", "n_seeds", "auc_a", "auc_b", "difference", "difference_ci_low", "difference_ci_high",
               "difference_seed_min", "difference_seed_max", "t", "df", "p", "delong_p_median"]
    tests = pd.DataFrame(lines, columns=columns)
    tests["p_holm"] = holm(tests["p"]) if len(tests) else []
    tests["call"] = [call_difference(t.p_holm, t.difference_ci_low, t.difference_ci_high)
                     for t in tests.itertuples()]
    return tests


def _pooled_auc(oof: pd.DataFrame) -> float:
    return classification_metrics(oof["label"], oof["p_bad"])["auc"]


def fold_aucs(oof: pd.DataFrame) -> pd.Series:
    """The AUC of each test fold of a run's out-of-fold predictions (index: fold)."""
    return oof.groupby("fold").apply(lambda g: classification_metrics(g["label"], g["p_bad"])["auc"],
                                     include_groups=False)


def summed_logits(oofs: list[pd.DataFrame]) -> pd.DataFrame:
    """Late fusion without training: P(bad) from the sum of several runs' out-of-fold logits, matched
    by ``patient_id`` (the first run's patients, folds and labels)."""
    first = oofs[0]
    matched = [o.set_index("patient_id").loc[first["patient_id"], "p_bad"].to_numpy() for o in oofs]
    total = sum(logit(p.clip(1e-7, 1 - 1e-7)) for p in matched)
    return first[["patient_id", "fold", "label"]].assign(p_bad=expit(total))


def paired_auc(predictions: dict[str, pd.DataFrame], a: str, b: str) -> tuple[float, float, float]:
    """AUCs of rows ``a`` and ``b`` on the same patients (matched by ``patient_id``) and the paired
    DeLong p-value of their difference."""
    first = predictions[a]
    second = predictions[b].set_index("patient_id").loc[first["patient_id"], "p_bad"]
    return delong_test(first["label"], first["p_bad"], second.to_numpy())


def compare_rows(predictions: dict[str, dict[int, pd.DataFrame]], a: str, b: str) -> str:
    """One sentence: row ``a`` against row ``b`` over the training seeds both have (one comparison on
    its own: its p is not adjusted for others; :func:`describe_comparison`)."""
    common = sorted(set(predictions[a]) & set(predictions[b]))
    tests = comparisons([Row(a, versus=(b,)), Row(b)], {name: {s: predictions[name][s] for s in common}
                                                        for name in (a, b)})
    return describe_comparison(tests.iloc[0], adjusted=False)


def describe_comparison(test: pd.Series, adjusted: bool = True) -> str:
    """A line of :func:`comparisons` as a sentence, ending with its call."""
    n = int(test["n_seeds"])
    seeds = "one training seed" if n == 1 else f"the mean over {n} training seeds"
    p = f"Holm-adjusted p = {test['p_holm']:.2g}" if adjusted else f"p = {test['p']:.2g}, not adjusted"
    spread = ("" if test["n_seeds"] == 1 else
              f"; the seeds' mean differences range {test['difference_seed_min']:+.3f} to "
              f"{test['difference_seed_max']:+.3f}")
    verdict = {"real": "the difference is real",
               "equivalent": "the two are equivalent (interval within ±0.02)",
               "not established": "the difference is not established"}[test["call"]]
    return (f"{test['a']} {test['auc_a']:.3f} vs {test['b']} {test['auc_b']:.3f} (AUC, {seeds}): per-fold "
            f"difference {test['difference']:+.3f} (95 % interval {test['difference_ci_low']:+.3f} to "
            f"{test['difference_ci_high']:+.3f}{spread}); corrected repeated-CV t-test {p}; median DeLong "
            f"p = {test['delong_p_median']:.2g}: {verdict}.")


def _paper_rows(paper_table: str | None) -> dict[str, dict[str, float]]:
    """The paper's rows of one table as fractions (its percentages divided by 100)."""
    if paper_table is None:
        return {}
    table = reported_tables().query("table == @paper_table")
    return {r["row"]: {"accuracy": r["accuracy_pct"] / 100, "recall": r["recall_pct"] / 100,
                       "precision": r["precision_pct"] / 100, "f1": r["f1"], "auc": r["auc"]}
            for r in table.to_dict("records")}


def _ceiling(truth: pd.DataFrame | None, oof: pd.DataFrame, key: str) -> float:
    """AUC of the oracle for the row's inputs on the same patients (NaN without a truth table)."""
    column = CEILINGS[key]
    if truth is None or column not in truth:
        return np.nan
    oracle = truth.set_index("patient_id").loc[oof["patient_id"], column].to_numpy()
    return classification_metrics(oof["label"], oracle)["auc"]


def row_costs(rows: list[Row], profile: Profile, out: str | Path, seed: int = 0) -> pd.DataFrame:
    """Each row's trainable parameters and training seconds per fold, from its run folder
    (``parameters.json`` and ``timing.json``; NaN where a file is missing). A frozen encoder's
    parameters are not trainable and not counted; its one-off encoding is in the time of the row
    that filled the feature cache."""
    lines = []
    for row in rows:
        folder = row_folder(out, profile, row, seed)
        params, timing = folder / "parameters.json", folder / "timing.json"
        lines.append({
            "row": row.name,
            "params": json.loads(params.read_text())["trainable"] if params.is_file() else np.nan,
            "seconds_per_fold": (json.loads(timing.read_text())["seconds"]
                                 / row_profile(profile, row).train.n_folds if timing.is_file() else np.nan)})
    return pd.DataFrame(lines)


def run_table(name: str, profile: Profile, manifest: pd.DataFrame, out: str | Path, *,
              truth: pd.DataFrame | None = None, seed: int = 0, resume: bool = False, quiet: bool = False,
              cache_dir: Path | None = None, n_boot: int = 1000, workers: int = 1
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run (or load) every row of a named table with each of its seeds; returns its summary
    (:func:`summarize`, with :func:`row_costs` for the :data:`COSTED_TABLES`) and its
    :func:`comparisons`. ``workers`` runs train at once (:func:`train_rows`)."""
    rows = table_rows(name)
    train_rows([(row, s) for row in rows for s in row_seeds(row, seed)], profile, manifest, out,
               workers=workers, resume=resume, quiet=quiet, cache_dir=cache_dir)
    predictions = load_predictions(rows, profile, out, seed)
    table = summarize(rows, predictions, TABLES[name][0], truth, n_boot=n_boot, seed=seed)
    if name in COSTED_TABLES:
        table = table.merge(row_costs(rows, profile, out, seed), on="row")
    return table, comparisons(rows, predictions)


def auxiliary_metrics(predictions: dict[str, pd.DataFrame], manifest: pd.DataFrame) -> pd.DataFrame:
    """How well the comparators' auxiliary heads do, one line per (row, task, metric).

    GCS (ordinal classes 13-15 / 9-12 / 3-8, or binary <= 8): balanced accuracy and quadratic-weighted
    kappa; binary GCS and age >= 80 also AUC; haematoma volume: MAE (mL) and R^2 against the true
    volume (:func:`ichpro.manifest.haematoma_volumes`). Rows without auxiliary predictions are skipped.
    """
    truth = clinical_fields(manifest).assign(patient_id=manifest["patient_id"].astype(str).to_numpy())
    truth = truth.set_index("patient_id")
    volumes = None
    lines = []
    for row, oof in predictions.items():
        oof = oof.assign(patient_id=oof["patient_id"].astype(str))
        gcs = truth.loc[oof["patient_id"], "gcs"].to_numpy()
        age = truth.loc[oof["patient_id"], "age"].to_numpy()
        if "gcs_class" in oof:
            true_class = np.select([gcs <= 8, gcs <= 12], [2, 1], 0)
            lines += [(row, "GCS (3 ordinal classes)", "balanced accuracy",
                       balanced_accuracy_score(true_class, oof["gcs_class"])),
                      (row, "GCS (3 ordinal classes)", "quadratic-weighted kappa",
                       cohen_kappa_score(true_class, oof["gcs_class"], weights="quadratic"))]
        if "p_gcs_le8" in oof:
            lines += _binary_task(row, "GCS <= 8", gcs <= 8, oof["p_gcs_le8"].to_numpy())
        if "p_age_ge80" in oof:
            lines += _binary_task(row, "age >= 80", age >= 80, oof["p_age_ge80"].to_numpy())
        if "volume_ml_pred" in oof:
            if volumes is None:
                volumes = pd.Series(haematoma_volumes(manifest), index=truth.index)
            true = volumes.loc[oof["patient_id"]].to_numpy()
            task, predicted = "haematoma volume (mL)", oof["volume_ml_pred"]
            lines += [(row, task, "MAE (mL)", mean_absolute_error(true, predicted)),
                      (row, task, "R^2", r2_score(true, predicted))]
    return pd.DataFrame(lines, columns=["row", "task", "metric", "value"])


def _binary_task(row: str, task: str, target: np.ndarray, p: np.ndarray) -> list[tuple]:
    """Balanced accuracy and kappa at P = 0.5, and AUC, of a binary auxiliary head."""
    target, decided = target.astype(int), (p >= 0.5).astype(int)
    return [(row, task, "balanced accuracy", balanced_accuracy_score(target, decided)),
            (row, task, "quadratic-weighted kappa", cohen_kappa_score(target, decided, weights="quadratic")),
            (row, task, "AUC", classification_metrics(target, p)["auc"])]


def _seeds_cell(r: dict) -> str:
    """A row's AUC over its seeds: "min-max (sd, k seeds)", or "1 seed"."""
    if r["n_seeds"] == 1:
        return "1 seed"
    return (f"{r['auc_seed_min']:.3f}-{r['auc_seed_max']:.3f} (sd {r['auc_seed_sd']:.3f}, "
            f"{int(r['n_seeds'])} seeds)")


def _test_cells(r: dict) -> list[str]:
    """A row's comparison with the reference: difference (95 % interval), adjusted p, call."""
    if np.isnan(r["difference"]):
        return ["reference", "", ""]
    return [f"{r['difference']:+.3f} ({r['difference_ci_low']:+.3f} to {r['difference_ci_high']:+.3f})",
            f"{r['p_holm']:.2g}", r["call"]]


TEST_HEADER = ["Δ AUC vs reference (95 % interval)", "Holm p", "call"]


def to_markdown(table: pd.DataFrame) -> str:
    """The summary as a Markdown table: paper | ours (95 % interval) per metric, ours as the mean over
    seeds; the AUC's seed range; the comparison with the reference; the ceiling; and parameters and
    seconds per fold when the table has them."""
    costs = "params" in table.columns
    header = (["row"] + [f"{m} paper \\| ours (95 % CI)" for m in TABLE_METRICS] + ["AUC over seeds"]
              + TEST_HEADER + ["ceiling AUC"] + (["trainable params", "s / fold"] if costs else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.to_dict("records"):
        cells = [r["row"]]
        for m in TABLE_METRICS:
            paper = "—" if np.isnan(r[f"paper_{m}"]) else f"{r[f'paper_{m}']:.3f}"
            cells.append(f"{paper} \\| {r[m]:.3f} ({r[f'{m}_ci_low']:.3f}–{r[f'{m}_ci_high']:.3f})")
        ceiling = "—" if np.isnan(r["ceiling_auc"]) else f"{r['ceiling_auc']:.3f}"
        cells += [_seeds_cell(r), *_test_cells(r), ceiling]
        if costs:
            cells.append("—" if np.isnan(r["params"]) else f"{int(r['params']):,}")
            cells.append("—" if np.isnan(r["seconds_per_fold"]) else f"{r['seconds_per_fold']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def readme_table(table: pd.DataFrame) -> str:
    """The README's short form of a results table: the paper's AUC, ours (mean over seeds, 95 %
    interval, seed range), the comparison with the reference, the ceiling (from the CSVs)."""
    header = ["row", "paper AUC", "ours: AUC (95 % CI)", "over seeds", *TEST_HEADER, "ceiling"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in table.to_dict("records"):
        cells = [r["row"], "—" if np.isnan(r["paper_auc"]) else f"{r['paper_auc']:.3f}",
                 f"{r['auc']:.3f} ({r['auc_ci_low']:.3f}-{r['auc_ci_high']:.3f})", _seeds_cell(r),
                 *_test_cells(r), f"{r['ceiling_auc']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def describe_table(table: pd.DataFrame, tests: pd.DataFrame, reference: str) -> list[str]:
    """Sentences about a results table that hold whatever its numbers are: the best rows, the calls of
    its comparisons (:func:`comparisons`), the rank agreement with the paper, the gaps to the ceiling."""
    t = table.set_index("row")

    def ci(r: str) -> str:
        return f"{t.at[r, 'auc']:.3f} (95 % CI {t.at[r, 'auc_ci_low']:.3f}-{t.at[r, 'auc_ci_high']:.3f})"

    best, paper = t["auc"].idxmax(), t.dropna(subset=["paper_auc"])
    said = [f"Best row by AUC (mean over its seeds): ours {best}, {ci(best)}"]
    if len(paper):
        paper_best = paper["paper_auc"].idxmax()
        said[0] += (f"; the paper's {paper_best}, {paper.at[paper_best, 'paper_auc']:.3f}"
                    + (" (the same row)." if best == paper_best else " (not the same row)."))
    else:
        said[0] += "."
    if best != reference:
        rank = int(t["auc"].rank(ascending=False, method="min")[reference])
        said.append(f"{reference} ranks {rank} of {len(t)} with AUC {ci(reference)}.")
    for call, meaning in (("real", "real (Holm-adjusted corrected repeated-CV t-test, p < 0.05)"),
                          ("equivalent", "equivalent (95 % interval of the difference within ±0.02)"),
                          ("not established", "not established (neither real nor equivalent)")):
        chosen = tests[tests["call"] == call]
        listed = "; ".join(f"{a} vs {b} {d:+.3f}"
                           for a, b, d in zip(chosen["a"], chosen["b"], chosen["difference"]))
        said.append(f"{len(chosen)} of {len(tests)} comparisons {meaning}"
                    + (f": {listed}." if listed else "."))
    if len(paper) >= 2:
        rho = spearmanr(paper["paper_auc"], paper["auc"]).statistic
        said.append(f"Spearman rank correlation of the paper's AUCs with ours over the {len(paper)} rows the "
                    "paper has: " + ("undefined (tied AUCs)." if np.isnan(rho) else f"rho = {rho:+.2f}"
                                     + (f" (with {len(paper)} rows rho can take only a few values)."
                                        if len(paper) < 5 else ".")))
    gap = (t["ceiling_auc"] - t["auc"]).dropna()
    if gap.empty:
        return said
    said.append("Gap to the oracle ceiling (ceiling AUC - our AUC): "
                + "; ".join(f"{r} {g:+.3f}" for r, g in gap.items())
                + f"; smallest for {gap.idxmin()}, largest for {gap.idxmax()}.")
    if (gap < 0).any():
        said.append(f"{'; '.join(gap.index[gap < 0])} score above the ceiling: the oracle is best only on "
                    "average, so on a small cohort a model can beat it by chance.")
    return said


def write_table(table: pd.DataFrame, tests: pd.DataFrame, path_stem: str | Path, title: str) -> list[Path]:
    """Write ``<stem>.csv``, the comparisons ``<stem>_comparisons.csv``, ``<stem>.md`` and the AUC
    figure ``<stem>.png``; returns the paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(stem.with_suffix(".csv"), index=False, float_format="%.6g")  # small p-values too
    comparisons_csv = stem.with_name(stem.name + "_comparisons.csv")
    tests.to_csv(comparisons_csv, index=False, float_format="%.6g")
    stem.with_suffix(".md").write_text(f"# {title}\n\n" + to_markdown(table))
    figure = save_figure(plot_table_auc(table, title), stem.with_suffix(".png"))
    return [stem.with_suffix(".csv"), comparisons_csv, stem.with_suffix(".md"), figure]
