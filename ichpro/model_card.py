"""A model card for a trained run (``ichpro card RUN``; ``ichpro train`` writes one at the end):
what the model is for and not for, what it was trained on and reads, how well it discriminates and is
calibrated (out of fold, with 95 % intervals), where acting on it helps, for whom it works less well,
which heat map it draws, and the failure modes its input checks guard.

Everything measured is computed from the run's files (``run.json``, ``oof_predictions.csv``,
``parameters.json``) and, for the subgroups and the report fields, the manifest it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ichpro.calibration import calibration_table
from ichpro.clinical import CLINICAL_BASELINES
from ichpro.config import REPO_ROOT, Profile, profile_from_dict
from ichpro.decision_curve import TABULATED, TREAT_ALL, decision_curves, useful_models
from ichpro.errors import IchproError
from ichpro.heatmaps import DEFAULT_HEATMAP
from ichpro.metrics import metrics_table
from ichpro.models.comparators import build_comparator
from ichpro.reports import KEYS, field_status
from ichpro.subgroups import subgroup_labels, subgroup_table
from ichpro.train import OOF_FILE, read_predictions

CARD_FILE = "model_card.md"
#: the localisation table of notebook 11 (a source checkout's reference run), cited for ICHPro's maps
LOCALISATION = REPO_ROOT / "figures" / "attention_localisation_summary.csv"
INTENDED_USE = (
    "Research on predicting a bad 90-day outcome (Glasgow Outcome Scale 1-3) after spontaneous "
    "intracerebral haemorrhage from the admission non-contrast head CT and a short clinical report: "
    "comparing methods, reproducing the ICHPro paper, studying what such models learn.")
NOT_FOR = (
    "Decisions about an individual patient's care (treatment, escalation, withdrawal of care) or "
    "prognosis talks with families: the model has not been externally validated, nor prospectively, "
    "and no regulator has assessed it. A model trained on the synthetic cohort must not be applied to "
    "real patients at all: its cohort only mimics published outcome tables.")
FAILURE_MODES = (
    ("a label map, mask or HU+1024 copy given as the CT", "refused: `ichpro.data.check_hounsfield` requires "
     "air near -1000 HU and brain-range voxels, and rejects volumes of a few integer values"),
    ("a CT that is not a head CT, or is already skull-stripped", "refused when it has no brain-range "
     "voxels; a warning when it has no bone (`CTWarning`)"),
    ("a missing, unreadable or non-3D CT file or DICOM folder", "refused with the path (`ichpro validate`, "
     "`ichpro.manifest.ct_problem`)"),
    ("a report without the expected fields (free text, another language, another template)",
     "`ichpro predict` lists each field as given, missing or unreadable and warns when none is given; the "
     "model still reads the text, so treat its number with suspicion"),
    ("a report that gives Hospital Stay", "the length of stay is known only after the outcome (TRIPOD+AI "
     "9b): a model trained with it reads the future; use a run trained without it for admission-time use"),
    ("a hospital, scanner or population unlike the training cohort's", "not guarded: no check can see it; "
     "validate on your own patients first (calibration drifts before discrimination does)"),
)


def _record(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.is_file():
        raise IchproError(f"{run_dir} is not a run folder (no run.json); train one with ichpro train")
    if not (run_dir / OOF_FILE).is_file():
        raise IchproError(f"{run_dir} has no {OOF_FILE}: the card needs a finished run")
    return json.loads(path.read_text())


def describe_model(profile: Profile) -> tuple[str, str]:
    """What the run's model is, and what it reads."""
    m = profile.model
    if m.comparator in CLINICAL_BASELINES:
        return (f"clinical baseline `{m.comparator}` (a logistic regression on the clinical fields, "
                "or a score mapped to P(bad) by a one-variable logistic regression fitted on the training "
                "folds)",
                "the clinical fields: manifest columns where filled, else the report's fields (no CT)")
    if m.comparator:
        inputs = build_comparator(m.comparator, m, text_hidden=8).inputs
        return (f"comparator `{m.comparator}` (a neighbouring system of the literature, re-implemented)",
                "the CT" + (", clinical fields from the manifest or report" if "clinical" in inputs else "")
                + (", the report text" if {"text_states", "image_text_ids"} & set(inputs) else ""))
    terms = ", ".join(f"{name} {weight:g}" for name, weight in profile.loss.terms)
    paper = {name for name, _ in profile.loss.terms} <= {"ce", "imima", "sdm", "mlm"}
    what = ("ICHPro" if m.modality == "both" else f"ICHPro's {m.modality} branch alone") + \
        f" ({m.fusion} fusion; loss {terms}" + ("" if paper else "; terms beyond the paper") + ")"
    reads = {"both": "the CT and the report text", "text": "the report text", "vision": "the CT"}[m.modality]
    return what, reads


def _report_fields(manifest: pd.DataFrame | None) -> str:
    if manifest is None or "report" not in manifest:
        return "Report fields: pass the training manifest (`--data`) to list how often each was given."
    status = pd.DataFrame([field_status(text) for text in manifest["report"]])
    given = ", ".join(f"{KEYS[name][0]} {(status[name] == 'given').mean():.0%}" for name in status.columns)
    return f"Report fields given in the training reports: {given}."


def _discrimination(oof: pd.DataFrame, n_boot: int) -> list[str]:
    t = metrics_table(oof["label"], oof["p_bad"], n_boot=n_boot).set_index("metric")
    lines = [f"| {label} | {t.at[name, 'value']:.3f} "
             f"({t.at[name, 'ci_low']:.3f} to {t.at[name, 'ci_high']:.3f}) |"
             for name, label in (("auc", "AUC"), ("accuracy", "accuracy"), ("f1", "F1"), ("brier", "Brier"))]
    versions = {"p_bad": "after the folds' Platt scaling"}
    if "p_bad_uncalibrated" in oof:
        versions["p_bad_uncalibrated"] = "before Platt scaling"
    for column, label in versions.items():
        c = calibration_table(oof["label"], oof[column], n_boot=n_boot).set_index("measure")
        for name, measure in (("slope", "calibration slope"), ("citl", "calibration-in-the-large"),
                              ("scaled_brier", "scaled Brier")):
            lines.append(f"| {measure} ({label}) | "
                         f"{c.at[name, 'value']:.3f} "
                         f"({c.at[name, 'ci_low']:.3f} to {c.at[name, 'ci_high']:.3f}) |")
    return ["| measure | out-of-fold value (95 % CI) |", "| --- | --- |", *lines]


def _decisions(oof: pd.DataFrame, n_boot: int) -> list[str]:
    curves = decision_curves(oof["label"], {"model": oof["p_bad"].to_numpy()}, thresholds=TABULATED,
                             n_boot=n_boot)
    lines = ["| threshold P(bad) | model | treat all |", "| --- | --- | --- |"]
    for t in TABULATED:
        at = curves[np.isclose(curves["threshold"], t)].set_index("model")
        lines.append(f"| {t:.0%} | {at.at['model', 'net_benefit']:+.3f} ({at.at['model', 'ci_low']:+.3f} to "
                     f"{at.at['model', 'ci_high']:+.3f}) | {at.at[TREAT_ALL, 'net_benefit']:+.3f} |")
    useful = [f"{t:.0%}" for t in TABULATED if useful_models(curves, t)]
    lines.append("")
    lines.append(("Its net benefit is above the better of treat all and treat none, with a paired 95 % "
                  "interval above 0, at " + ", ".join(useful) if useful else
                  "At no tabulated threshold is its net benefit above the better of treat all and treat none "
                  "with a paired 95 % interval above 0") + ".")
    return lines


def _subgroups(oof: pd.DataFrame, manifest: pd.DataFrame | None, n_boot: int) -> list[str]:
    if manifest is None:
        return ["Pass the training manifest (`ichpro card RUN --data ...`) to add the subgroups."]
    patients = manifest.set_index("patient_id").loc[oof["patient_id"]].reset_index()
    t = subgroup_table(oof["label"], oof["p_bad"], subgroup_labels(patients), n_boot=n_boot)
    lines = ["| subgroup | patients | bad outcomes | AUC (95 % CI) | calibration slope (95 % CI) |",
             "| --- | --- | --- | --- | --- |"]
    for r in t.itertuples():
        lines.append(f"| {r.grouping}: {r.group} | {r.n} | {r.bad_rate:.0%} | "
                     f"{r.auc:.3f} ({r.auc_ci_low:.3f} to {r.auc_ci_high:.3f}) | "
                     f"{r.slope:.2f} ({r.slope_ci_low:.2f} to {r.slope_ci_high:.2f}) |")
    clear = [f"{r.grouping}: {r.group} (AUC {r.auc_gap:+.3f} vs the rest)"
             for r in t.itertuples() if r.auc_gap_clear]
    lines.append("")
    lines.append("AUC gaps to the other patients whose 95 % interval excludes 0: "
                 + ("; ".join(clear) or "none")
                 + ". A subgroup narrow in a strong predictor (one age band, one GCS band) has a narrower "
                 "range of risks, which lowers its AUC whatever the model.")
    return lines


def _heatmap(profile: Profile) -> str:
    m = profile.model
    if m.comparator in CLINICAL_BASELINES:
        return "None: the model reads no image."
    if m.comparator == "slice2d":
        return "`slice_attention` (its gated weights over the axial slices; it has no Grad-CAM layer)."
    said = (f"`{DEFAULT_HEATMAP}` by default (`ichpro predict --heatmap PREFIX`; `--heatmap-kind` chooses "
            "another map the model draws).")
    if not m.comparator and LOCALISATION.is_file():
        s = pd.read_csv(LOCALISATION).set_index("method")
        said += (" On the reference synthetic cohort (notebook 11, ICHPro) it put "
                 f"{s.at[DEFAULT_HEATMAP, 'ratio']:.2f}"
                 f" times a uniform map's mass on the haematoma and pointed at it in "
                 f"{s.at[DEFAULT_HEATMAP, 'pointing_hit_rate']:.0%} of patients; the raw CMAF text → vision "
                 f"attention map put {s.at['stage1_cmaf_text_to_vision', 'ratio']:.2f} times.")
    return said


def model_card(run_dir: str | Path, manifest: pd.DataFrame | None = None, n_boot: int = 1000) -> str:
    """The run's model card as Markdown."""
    run_dir = Path(run_dir)
    record = _record(run_dir)
    profile = profile_from_dict(record["config"])
    oof = read_predictions(run_dir / OOF_FILE)
    what, reads = describe_model(profile)
    parameters = run_dir / "parameters.json"
    trainable = json.loads(parameters.read_text())["trainable"] if parameters.is_file() else "not recorded"
    versions = record.get("versions", {})
    lines = [
        f"# Model card: {run_dir.name}", "",
        "## Model",
        f"- {what}; {trainable} trainable parameters; profile `{profile.name}`, seed {record['seed']}, "
        f"{oof['fold'].nunique()}-fold cross-validation, config hash `{record['config_hash']}`.",
        f"- Built with ichpro {versions.get('ichpro', '?')} (commit {versions.get('git commit', '?')}), "
        f"torch {versions.get('torch', '?')}.", "",
        "## Intended use", INTENDED_USE, "", "## Not for", NOT_FOR, "",
        "## Training data",
        f"- {len(oof)} patients, {int(oof['label'].sum())} bad outcomes ({oof['label'].mean():.0%}); "
        f"manifest checksum `{record['manifest_checksum']}`.", "",
        "## Inputs", f"- Reads {reads}.",
        *([f"- {_report_fields(manifest)}"] if "report" in reads else []), "",
        "## Discrimination and calibration",
        "Pooled out-of-fold predictions of the fold models (each patient predicted by the model that did not "
        "train on it); 95 % intervals from patient resamples.", "",
        *_discrimination(oof, n_boot), "",
        "## Decision curve",
        "Net benefit of acting when P(bad) reaches the threshold (`ichpro.decision_curve`).", "",
        *_decisions(oof, n_boot), "",
        "## Subgroups", *_subgroups(oof, manifest, n_boot), "",
        "## Heat map", _heatmap(profile), "",
        "## Known failure modes and the checks that guard them",
        *[f"- {mode}: {guard}." for mode, guard in FAILURE_MODES],
    ]
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: str | Path, manifest: pd.DataFrame | None = None, n_boot: int = 1000) -> Path:
    """Write :func:`model_card` to ``<run_dir>/model_card.md``."""
    path = Path(run_dir) / CARD_FILE
    path.write_text(model_card(run_dir, manifest, n_boot))
    return path
