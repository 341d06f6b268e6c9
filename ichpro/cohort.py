"""Synthetic ICH cohort: clinical variables, 90-day outcome, oracle probabilities.

The generative model, in the order variables are drawn:

1. **Demographics**: age ~ N(68, 12) clipped to 30-97, sex (58 % male), pre-ICH cognitive
   impairment (rises with age; invisible to both modalities, as in real data).
2. **Haematoma**: location deep 60 % / lobar 27 % / cerebellar 8 % / brainstem 5 %, with a
   subsite and side; volume log-normal per location; intraventricular extension (IVH) more likely
   for deep and large bleeds; midline shift grows with supratentorial volume.
3. **Admission state**: GCS falls with volume, IVH, brainstem location and shift; onset-to-CT time
   log-normal; treatment (conservative / minimally invasive / craniotomy) chosen by indication.
4. **Outcome**: an ordinal logistic model. A severity score
   ``eta = OutcomeModel.linear_predictor(x)`` plus standard logistic noise ``U = eta + e`` gives the
   90-day Glasgow Outcome Scale through ordered cut-points, and death within 30 days as the most
   severe tail ``U >= c_death30``. Hence, exactly,
   ``P(bad | x) = P(GOS <= 3 | x) = sigmoid(eta - c_bad)``: the all-variable oracle.
5. **Hospital stay** depends on the outcome (early deaths stay briefly, severe disability long):
   it leaks follow-up information into the report, as it does in real data.

The coefficients of :data:`OUTCOME_MODEL` were fitted once (by minimising squared error on a
20,000-patient covariate sample) so that 30-day mortality by ICH score reproduces Hemphill et al.
(Stroke 2001) and 90-day independence by FUNC score reproduces Rost et al. (Stroke 2008);
:func:`calibration_table` checks both on any cohort. They were never fitted to ICHPro's results.

The partial oracles, P(bad | image-visible variables) and P(bad | report-visible fields), have no
closed form; they are estimated with gradient-boosted trees on a large *reference* cohort drawn
from the same spec with another seed (no patient shared with the evaluation cohort).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.special import expit
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from tqdm.auto import tqdm

from ichpro import __version__
from ichpro.config import SPEC_DIR
from ichpro.errors import CohortSpecError
from ichpro.files import changed_files, checksums
from ichpro.phantom import ImageSpec, Lesion, render_phantom, save_phantom
from ichpro.reports import (
    KEYS,
    POSITION_CATEGORIES,
    SEPARATORS,
    TREATMENTS,
    Report,
    ReportStyle,
    position_category,
    render,
)

LOCATIONS = ("deep", "lobar", "cerebellar", "brainstem")
LOCATION_SHARE = (0.60, 0.27, 0.08, 0.05)
SUBSITES = {
    "deep": (("basal ganglia", "thalamus"), (0.65, 0.35)),
    "lobar": (("frontal", "parietal", "temporal", "occipital"), (0.30, 0.25, 0.30, 0.15)),
    "cerebellar": (("cerebellum",), (1.0,)),
    "brainstem": (("pons",), (1.0,)),
}
#: log-normal haematoma volume per location: (median mL, sd of log)
VOLUME_LOGNORMAL = {"deep": (17.0, 1.0), "lobar": (32.0, 0.85), "cerebellar": (13.0, 0.8),
                    "brainstem": (5.0, 0.8)}

#: Published 30-day mortality by ICH score (Hemphill et al. 2001).
HEMPHILL_MORTALITY = {0: 0.00, 1: 0.13, 2: 0.26, 3: 0.72, 4: 0.97, 5: 1.00, 6: 1.00}
#: Published 90-day functional independence (GOS >= 4) by FUNC band (Rost et al. 2008).
ROST_INDEPENDENCE = {"0-4": 0.00, "5-7": 0.29, "8": 0.48, "9-10": 0.75, "11": 0.95}


@dataclass(frozen=True)
class OutcomeModel:
    """Coefficients of the ordinal outcome model (severity scale: logistic noise, sd 1.81)."""

    age_per_decade: float = 0.91
    gcs_per_point: float = 0.20
    coma: float = 0.24  # extra severity for GCS <= 8
    log_volume: float = 0.94  # per unit of log(volume / 10 mL)
    location: dict[str, float] = field(
        default_factory=lambda: {"deep": 0.0, "lobar": -1.32, "cerebellar": 0.72, "brainstem": 0.33}
    )
    ivh: float = 2.68
    midline_shift_per_mm: float = 0.22
    surgery: float = -0.25  # fixed, not fitted
    cognitive_impairment: float = 1.0  # fixed, not fitted
    late_ct_per_log_hour: float = -0.10  # fixed: an early CT leaves room for haematoma growth
    cut_good_recovery: float = 1.50  # U below: GOS 5
    cut_bad: float = 3.09  # U at or above: GOS <= 3 (bad outcome)
    cut_vegetative: float = 3.90  # U at or above: GOS <= 2
    cut_death: float = 4.10  # U at or above: dead at 90 days
    cut_death30: float = 4.62  # U at or above: dead within 30 days

    def linear_predictor(self, t: pd.DataFrame) -> np.ndarray:
        """Severity ``eta`` of each patient in a table of clinical variables."""
        loc = t["location"].map(self.location).to_numpy(float)
        surgical = (t["treatment"] != TREATMENTS[0]).to_numpy(float)
        return (
            self.age_per_decade * (t["age"].to_numpy(float) - 65) / 10
            + self.gcs_per_point * (15 - t["gcs"].to_numpy(float))
            + self.coma * (t["gcs"].to_numpy(float) <= 8)
            + self.log_volume * np.log(t["volume_ml"].to_numpy(float) / 10)
            + loc
            + self.ivh * t["ivh"].to_numpy(float)
            + self.midline_shift_per_mm * t["midline_shift_mm"].to_numpy(float)
            + self.surgery * surgical
            + self.cognitive_impairment * t["cognitive_impairment"].to_numpy(float)
            + self.late_ct_per_log_hour * np.log(t["onset_to_ct_min"].to_numpy(float) / 60)
        )

    def p_bad(self, t: pd.DataFrame) -> np.ndarray:
        """Exact P(GOS <= 3 | all variables): the all-variable oracle."""
        return expit(self.linear_predictor(t) - self.cut_bad)



OUTCOME_MODEL = OutcomeModel()


@dataclass(frozen=True)
class ReportSpec:
    """How reports are written: missing fields, layout variation, vague positions, noisy volume."""

    missing_field_rate: float = 0.03
    variation_rate: float = 0.3  # share of reports not in the canonical layout
    generic_position_rate: float = 0.25  # "Supratentorial hemorrhage" instead of the subsite
    volume_log_bias: float = 0.15  # ABC/2 overestimates irregular haematomas
    volume_log_sd: float = 0.25


@dataclass(frozen=True)
class CohortSpec:
    """Everything that determines a synthetic cohort, together with its seed."""

    name: str
    n_patients: int
    seed: int = 0
    image: ImageSpec = field(default_factory=ImageSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    reference_size: int = 60_000  # patients simulated to estimate the partial oracles


def load_spec(path_or_name: str | Path) -> CohortSpec:
    """Read a cohort spec YAML, given as a path or as a name in ``data_synthetic/``."""
    path = Path(path_or_name)
    if not path.suffix:
        path = SPEC_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SPEC_DIR.glob("*.yaml")))
        raise CohortSpecError(f"cohort spec {path} not found; known specs: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        image = ImageSpec(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in raw.pop("image", {}).items()})
        report = ReportSpec(**raw.pop("report", {}))
        spec = CohortSpec(image=image, report=report, **raw)
    except TypeError as err:
        allowed = [f.name for f in fields(CohortSpec)]
        raise CohortSpecError(f"{path}: {err}; top-level keys are {allowed}") from err
    if spec.n_patients < 10:
        raise CohortSpecError(f"{path}: n_patients must be at least 10, got {spec.n_patients}")
    return spec


# --------------------------------------------------------------------------- clinical variables


def sample_clinical(n: int, rng: np.random.Generator, model: OutcomeModel = OUTCOME_MODEL
                    ) -> pd.DataFrame:
    """Draw n patients' clinical variables, 90-day GOS, label and 30-day death."""
    age = np.clip(np.round(rng.normal(68, 12, n)), 30, 97).astype(int)
    sex = np.where(rng.random(n) < 0.58, "Male", "Female")
    cognitive = rng.random(n) < expit(-3.4 + 0.07 * (age - 65))
    location = rng.choice(LOCATIONS, size=n, p=LOCATION_SHARE)
    subsite = np.empty(n, dtype=object)
    volume = np.empty(n)
    for loc in LOCATIONS:
        idx = np.flatnonzero(location == loc)
        names, shares = SUBSITES[loc]
        subsite[idx] = rng.choice(names, size=idx.size, p=shares)
        median, sd = VOLUME_LOGNORMAL[loc]
        volume[idx] = median * np.exp(rng.normal(0, sd, idx.size))
    volume = np.round(np.clip(volume, 0.5, 150), 1)
    side = np.where(location == "brainstem", "midline", np.where(rng.random(n) < 0.5, "left", "right"))
    deep, brainstem = location == "deep", location == "brainstem"
    supratentorial = np.isin(location, ("deep", "lobar"))
    ivh = rng.random(n) < expit(-1.3 + 0.7 * np.log(volume / 10) + 1.0 * deep + 0.6 * brainstem)
    shift = np.where(supratentorial, np.maximum(0, 0.11 * volume - 1.0 + rng.normal(0, 1.2, n)), 0)
    shift = np.round(shift, 1)
    depression = (-1.4 + 2.4 * np.log1p(volume / 8) + 2.0 * ivh + 3.0 * brainstem + 0.3 * shift
                  + rng.normal(0, 2.8, n))
    gcs = np.clip(np.round(15 - np.maximum(depression, 0)), 3, 15).astype(int)
    onset = np.clip(np.round(120 * np.exp(rng.normal(0, 0.7, n)) / 5) * 5, 15, 1440).astype(int)
    p_surgery = expit(-2.6 + 0.045 * (volume - 30) + 0.8 * (location == "lobar")
                      + 1.5 * ((location == "cerebellar") & (volume > 15)) - 0.03 * (age - 65)
                      - 0.15 * np.maximum(8 - gcs, 0))
    surgical = rng.random(n) < p_surgery
    craniotomy = rng.random(n) < np.where(location == "lobar", 0.6, 0.35)
    treatment = np.where(~surgical, TREATMENTS[0], np.where(craniotomy, TREATMENTS[2], TREATMENTS[1]))
    t = pd.DataFrame({
        "age": age, "sex": sex, "cognitive_impairment": cognitive.astype(int),
        "location": location, "subsite": subsite, "side": side, "volume_ml": volume,
        "ivh": ivh.astype(int), "midline_shift_mm": shift, "gcs": gcs,
        "onset_to_ct_min": onset, "treatment": treatment,
    })
    severity = model.linear_predictor(t) + rng.logistic(0, 1, n)
    cuts = [model.cut_good_recovery, model.cut_bad, model.cut_vegetative, model.cut_death]
    t["gos"] = 5 - np.searchsorted(cuts, severity, side="right")
    t["label"] = (t["gos"] <= 3).astype(int)
    t["died_30d"] = (severity >= model.cut_death30).astype(int)
    t["hospital_stay_days"] = _hospital_stay(t, rng)
    t["ich_score"] = ich_score(t)
    t["func_score"] = func_score(t)
    t["p_bad_oracle"] = model.p_bad(t)
    return t


def _hospital_stay(t: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """Length of stay in days: outcome-dependent, so it leaks follow-up into the report."""
    n = len(t)
    median = t["gos"].map({1: 22.0, 2: 28.0, 3: 24.0, 4: 17.0, 5: 12.0}).to_numpy()
    median = median + 5.0 * (t["treatment"] != TREATMENTS[0]).to_numpy()
    stay = median * np.exp(rng.normal(0, 0.6, n))
    early_death = 1 + rng.exponential(5, n)
    stay = np.where(t["died_30d"] == 1, np.minimum(early_death, 30), stay)
    return np.clip(np.round(stay), 1, 180).astype(int)


def ich_score(t: pd.DataFrame) -> np.ndarray:
    """ICH score (Hemphill 2001) from gcs, volume_ml, ivh, location and age."""
    gcs = t["gcs"].to_numpy(float)
    return (
        np.where(gcs <= 4, 2, np.where(gcs <= 12, 1, 0))
        + (t["volume_ml"].to_numpy(float) >= 30)
        + t["ivh"].to_numpy(int)
        + t["location"].isin(("cerebellar", "brainstem")).to_numpy()
        + (t["age"].to_numpy(float) >= 80)
    ).astype(int)


def func_score(t: pd.DataFrame) -> np.ndarray:
    """FUNC score (Rost 2008): volume, age, location, GCS and pre-ICH cognition."""
    vol = t["volume_ml"].to_numpy(float)
    age = t["age"].to_numpy(float)
    loc_points = t["location"].map({"lobar": 2, "deep": 1, "cerebellar": 0, "brainstem": 0})
    return (
        np.where(vol < 30, 4, np.where(vol <= 60, 2, 0))
        + np.where(age < 70, 2, np.where(age < 80, 1, 0))
        + loc_points.to_numpy(int)
        + np.where(t["gcs"].to_numpy(float) >= 9, 2, 0)
        + (1 - t["cognitive_impairment"].to_numpy(int))
    ).astype(int)


def func_band(score: np.ndarray) -> np.ndarray:
    """FUNC score bands of Rost's table: 0-4, 5-7, 8, 9-10, 11."""
    return np.select([score <= 4, score <= 7, score == 8, score <= 10], ["0-4", "5-7", "8", "9-10"],
                     "11")


def calibration_table(truth: pd.DataFrame, min_patients: int = 30) -> pd.DataFrame:
    """Observed vs published rates: 30-day mortality by ICH score, independence by FUNC band."""
    rows = []
    for score, published in HEMPHILL_MORTALITY.items():
        group = truth[truth["ich_score"] == score]
        rows.append(("ICH score -> 30-day mortality", str(score), len(group),
                     group["died_30d"].mean() if len(group) else np.nan, published, 0.08))
    bands = func_band(truth["func_score"].to_numpy())
    for band, published in ROST_INDEPENDENCE.items():
        group = truth[bands == band]
        rows.append(("FUNC -> independence (GOS>=4)", band, len(group),
                     (group["gos"] >= 4).mean() if len(group) else np.nan, published, 0.10))
    table = pd.DataFrame(rows, columns=["table", "score", "n", "observed", "published", "tolerance"])
    table["difference"] = table["observed"] - table["published"]
    checked = table["n"] >= min_patients
    within = table["difference"].abs() <= table["tolerance"]
    table["ok"] = pd.array(np.where(checked, within, None), dtype="boolean")  # NA: too few patients
    return table


def calibration_check(seed: int, n_patients: int = 5000) -> pd.DataFrame:
    """:func:`calibration_table` of a table-only draw large enough for the published tolerances."""
    return calibration_table(sample_clinical(n_patients, np.random.default_rng([seed, 3])))


# --------------------------------------------------------------------------- reports


def make_reports(t: pd.DataFrame, spec: ReportSpec, rng: np.random.Generator) -> list[Report]:
    """The report each patient's clinician would write (noisy volume, vague positions, gaps)."""
    n = len(t)
    estimate = t["volume_ml"].to_numpy() * np.exp(rng.normal(spec.volume_log_bias, spec.volume_log_sd, n))
    estimate = np.where(estimate < 1, 0.5, np.where(estimate < 10, np.round(estimate),
                                                    np.round(estimate / 5) * 5))
    generic = rng.random(n) < spec.generic_position_rate
    missing = rng.random((n, len(KEYS))) < spec.missing_field_rate
    reports = []
    for i, row in enumerate(t.itertuples(index=False)):
        values = {
            "age": int(row.age), "sex": row.sex, "onset_to_ct_min": int(row.onset_to_ct_min),
            "hospital_stay_days": int(row.hospital_stay_days), "gcs": int(row.gcs),
            "treatment": row.treatment,
            "position": _position_text(row.location, row.subsite, row.side, generic[i]),
            "volume_ml": float(estimate[i]),
        }
        for j, name in enumerate(KEYS):
            if missing[i, j]:
                values[name] = None
        reports.append(Report(**values))
    return reports


def _position_text(location: str, subsite: str, side: str, generic: bool) -> str:
    if generic:
        tent = "Supratentorial" if location in ("deep", "lobar") else "Infratentorial"
        return f"{tent} hemorrhage"
    site = {"basal ganglia": "basal ganglia", "thalamus": "thalamic", "cerebellum": "cerebellar"}
    if location == "brainstem":
        return "Brainstem (pontine) hemorrhage"
    if location == "lobar":
        return f"{side.capitalize()} {subsite} lobe hemorrhage"
    return f"{side.capitalize()} {site[subsite]} hemorrhage"


def report_styles(n: int, spec: ReportSpec, rng: np.random.Generator) -> list[ReportStyle]:
    """Canonical layout for most reports, a random variant for ``variation_rate`` of them."""
    varied = rng.random(n) < spec.variation_rate
    sep = rng.integers(0, len(SEPARATORS), n)
    synonym = rng.integers(0, 2, n)
    hours = rng.random(n) < 0.5
    return [ReportStyle(SEPARATORS[sep[i]], int(synonym[i]), bool(hours[i])) if varied[i]
            else ReportStyle() for i in range(n)]


def report_features(reports: list[Report], include_stay: bool = True) -> pd.DataFrame:
    """Numeric features of what the reports say (NaN where a field is missing)."""
    rows = []
    for r in reports:
        cat = position_category(r.position)
        row = {
            "age": r.age, "male": None if r.sex is None else float(r.sex == "Male"),
            "onset_to_ct_min": r.onset_to_ct_min, "gcs": r.gcs, "volume_ml": r.volume_ml,
            "treatment": None if r.treatment is None else float(TREATMENTS.index(r.treatment)),
            "position": None if cat is None else float(POSITION_CATEGORIES.index(cat)),
        }
        if include_stay:
            row["hospital_stay_days"] = r.hospital_stay_days
        rows.append(row)
    return pd.DataFrame(rows, dtype=float)


def image_features(t: pd.DataFrame) -> pd.DataFrame:
    """Numeric features of the image-visible variables."""
    f = t[["volume_ml", "ivh", "midline_shift_mm"]].astype(float)
    return f.assign(location=t["location"].map(LOCATIONS.index).astype(float))


# --------------------------------------------------------------------------- oracles


@dataclass
class PartialOracles:
    """Estimated Bayes-optimal P(bad) from the image alone and from the report alone."""

    image: HistGradientBoostingRegressor
    report: HistGradientBoostingClassifier
    report_no_stay: HistGradientBoostingClassifier

    def predict(self, t: pd.DataFrame, reports: list[Report]) -> pd.DataFrame:
        """The three partial oracle probabilities for each patient."""
        return pd.DataFrame({
            "p_bad_oracle_image": np.clip(self.image.predict(image_features(t)), 0, 1),
            "p_bad_oracle_report": self.report.predict_proba(report_features(reports))[:, 1],
            "p_bad_oracle_report_no_stay": self.report_no_stay.predict_proba(
                report_features(reports, include_stay=False))[:, 1],
        })


def fit_partial_oracles(spec: CohortSpec, seed: int) -> PartialOracles:
    """Fit the partial oracles on a reference cohort drawn with a seed distinct from ``seed``."""
    rng = np.random.default_rng([seed, 1])  # a separate stream: no patient is shared
    t = sample_clinical(spec.reference_size, rng)
    reports = make_reports(t, spec.report, rng)
    kw = dict(max_iter=300, learning_rate=0.05, max_leaf_nodes=31, random_state=0,
              early_stopping=True, validation_fraction=0.1, n_iter_no_change=20)
    cat_image = np.array([False, False, False, True])
    image = HistGradientBoostingRegressor(categorical_features=cat_image, **kw)
    image.fit(image_features(t), t["p_bad_oracle"])
    report = HistGradientBoostingClassifier(**kw).fit(report_features(reports), t["label"])
    no_stay = HistGradientBoostingClassifier(**kw).fit(
        report_features(reports, include_stay=False), t["label"])
    return PartialOracles(image, report, no_stay)


# --------------------------------------------------------------------------- files


TRUTH_COLUMNS = (
    "patient_id", "age", "sex", "cognitive_impairment", "gcs", "location", "subsite", "side",
    "volume_ml", "ivh", "midline_shift_mm", "onset_to_ct_min", "treatment", "hospital_stay_days",
    "gos", "label", "died_30d", "ich_score", "func_score", "p_bad_oracle", "p_bad_oracle_image",
    "p_bad_oracle_report", "p_bad_oracle_report_no_stay",
)
#: Columns a real site's manifest would have (no latent variables, no outcome beyond the label).
MANIFEST_CLINICAL = ("age", "sex", "gcs", "volume_ml", "ivh", "location", "midline_shift_mm",
                     "onset_to_ct_min", "treatment")


def generate_cohort(spec: CohortSpec, out_dir: Path, *, seed: int | None = None,
                    n_patients: int | None = None, images: bool = True,
                    progress: bool = True) -> pd.DataFrame:
    """Write a synthetic cohort to ``out_dir`` and return its truth table."""
    seed = spec.seed if seed is None else seed
    n = spec.n_patients if n_patients is None else n_patients
    out_dir = Path(out_dir)
    (out_dir / "reports").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    t = sample_clinical(n, rng)
    width = max(4, len(str(n)))
    t.insert(0, "patient_id", [f"ICH{i:0{width}d}" for i in range(1, n + 1)])
    reports = make_reports(t, spec.report, rng)
    styles = report_styles(n, spec.report, rng)
    oracles = fit_partial_oracles(spec, seed)
    t = pd.concat([t, oracles.predict(t, reports)], axis=1)

    manifest = t[["patient_id"]].copy()
    if images:
        (out_dir / "ct").mkdir(exist_ok=True)
        manifest["ct_path"] = [f"ct/{pid}.nii.gz" for pid in t["patient_id"]]
        manifest["mask_path"] = [f"ct/{pid}_mask.nii.gz" for pid in t["patient_id"]]
    manifest["report_path"] = [f"reports/{pid}.txt" for pid in t["patient_id"]]
    manifest["label"] = t["label"]
    for col in MANIFEST_CLINICAL:
        manifest[col] = t[col]

    rows = tqdm(range(n), desc=f"cohort {spec.name}", unit="patient", disable=not progress)
    for i in rows:
        pid = t.at[i, "patient_id"]
        (out_dir / "reports" / f"{pid}.txt").write_text(render(reports[i], styles[i]) + "\n")
        if images:
            lesion = Lesion(t.at[i, "location"], t.at[i, "subsite"], t.at[i, "side"],
                            float(t.at[i, "volume_ml"]), bool(t.at[i, "ivh"]),
                            float(t.at[i, "midline_shift_mm"]))
            phantom = render_phantom(lesion, spec.image, np.random.default_rng([seed, 2, i]))
            save_phantom(phantom, out_dir / "ct" / f"{pid}.nii.gz",
                         out_dir / "ct" / f"{pid}_mask.nii.gz")

    t = t[list(TRUTH_COLUMNS)]
    t.to_csv(out_dir / "truth.csv", index=False, float_format="%.6g")
    manifest.to_csv(out_dir / "manifest.csv", index=False, float_format="%.6g")
    _write_card(out_dir, spec, seed, n, images)
    return t


def ensure_cohort(spec: str | Path, out_dir: Path, *, seed: int | None = None, n_patients: int | None = None,
                  progress: bool = True) -> Path:
    """Generate the cohort of the spec named ``spec`` into ``out_dir`` unless it is there already;
    returns ``out_dir``. A generated cohort whose files no longer match the checksums of its
    ``cohort.json`` is generated again, with one line saying so; a folder with a manifest and no
    ``cohort.json`` (a site's own data) is left as it is."""
    out_dir = Path(out_dir)
    damaged = _damaged_files(out_dir)
    if damaged:
        print(f"the generated cohort in {out_dir} is damaged ({damaged[0]}"
              f"{f' and {len(damaged) - 1} more' if len(damaged) > 1 else ''}): generating it again",
              file=sys.stderr)
    if damaged or not (out_dir / "manifest.csv").is_file():
        generate_cohort(load_spec(spec), out_dir, seed=seed, n_patients=n_patients, progress=progress)
    return out_dir


def _damaged_files(out_dir: Path) -> list[str]:
    """Files of a generated cohort that are missing or differ from its card's checksums."""
    card = out_dir / "cohort.json"
    if not card.is_file():
        return []
    try:
        recorded = json.loads(card.read_text())["checksums"]
    except (ValueError, KeyError, TypeError):
        return ["cohort.json"]
    return changed_files(out_dir, recorded)


def _write_card(out_dir: Path, spec: CohortSpec, seed: int, n: int, images: bool) -> None:
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != "cohort.json")
    card = {
        "spec": asdict(spec), "seed": seed, "n_patients": n, "images": images,
        "ichpro_version": __version__,
        "checksums": checksums(out_dir, files),
    }
    (out_dir / "cohort.json").write_text(json.dumps(card, indent=1) + "\n")
