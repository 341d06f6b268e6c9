"""Manifests: checked row by row with a fix for every problem (:func:`load_manifest`), summarised,
and the true haematoma volume of each patient.

A manifest is a CSV with one row per patient: ``patient_id``, ``ct_path`` (a NIfTI file or a folder
holding one DICOM series), ``label`` (0 = good outcome, 1 = bad) or ``gos`` (Glasgow Outcome Scale
1-5, bad = GOS <= 3), and the clinical report as ``report`` (text) or ``report_path`` (a text file).
Relative paths are read from the manifest's folder. Row numbers in messages count the header as
row 1, as a spreadsheet shows them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from ichpro.data import ct_geometry, load_ct
from ichpro.errors import ImageError, ManifestError
from ichpro.reports import EXAMPLE_REPORT, KEYS, field_status, render

NUMERIC_COLUMNS = (
    "age",
    "gcs",
    "volume_ml",
    "midline_shift_mm",
    "onset_to_ct_min",
    "hospital_stay_days",
    "ich_score",
    "func_score",
)


def load_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest CSV; raise ManifestError listing every problem, else return it."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"manifest {path} does not exist: give the path of a CSV file with one row per patient"
        )
    try:
        df = pd.read_csv(path, dtype=str, skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(
            f"manifest {path} cannot be read as CSV ({err}): save it as comma-separated UTF-8 text"
        ) from err
    df.columns = df.columns.str.strip()
    return checked_manifest(df, path.resolve().parent, f"manifest {path}")


def checked_manifest(df: pd.DataFrame, root: Path, name: str) -> pd.DataFrame:
    """``df`` checked (a ManifestError listing every problem, ``name`` saying whose) and normalised:
    absolute paths, report text, integer label, float clinical columns."""
    problems = check_manifest(df, root)
    if problems:
        raise ManifestError("\n".join([f"{name} has {len(problems)} problem(s):", *problems]))
    return normalised(df, root)


def check_manifest(df: pd.DataFrame, root: Path) -> list[str]:
    """Return every problem in the manifest, one sentence each: row, patient, what is wrong, fix."""
    problems = _column_problems(df)
    if df.empty:
        problems.append("the manifest has no patients: add one row per patient.")
    first_row_of: dict[str, int] = {}
    for row, record in enumerate(df.to_dict("records"), start=2):
        problems += _row_problems(row, record, Path(root), first_row_of)
    return problems


def _column_problems(df: pd.DataFrame) -> list[str]:
    """Problems with the manifest's columns: each required column, or one of its alternatives."""
    required = {
        ("patient_id",): "a 'patient_id' column (a unique id per patient)",
        ("ct_path",): "a 'ct_path' column (each patient's CT: a .nii/.nii.gz file or a DICOM folder)",
        ("label", "gos"): "a 'label' column (0 = good outcome, 1 = bad) "
        "or a 'gos' column (Glasgow Outcome Scale 1-5)",
        ("report", "report_path"): "a 'report' column (the report text) "
        "or a 'report_path' column (a text file per patient)",
    }
    problems = []
    for names, wanted in required.items():
        if not any(name in df.columns for name in names):
            hint = _close_column(names, df.columns)
            problems.append(f"the manifest lacks {wanted}: add it{hint}.")
    return problems


def _close_column(names: Sequence[str], columns: Sequence[str]) -> str:
    """A ' (rename column X to Y?)' hint when a column looks like a misspelt required name."""
    for name in names:
        close = difflib.get_close_matches(name, [str(c) for c in columns], n=1, cutoff=0.7)
        if close:
            return f" (rename column {close[0]!r} to {name!r}?)"
    return ""


def _row_problems(
    row: int, record: dict[Hashable, Any], root: Path, first_row_of: dict[str, int]
) -> list[str]:
    """Problems of one data row, each prefixed with its row number and patient id."""
    pid = _text(record.get("patient_id"))
    where = f"row {row} (patient {pid!r})" if pid else f"row {row}"
    if not any(_text(value) for value in record.values()):
        return [f"{where}: the row is empty: delete it."]
    found = [
        _id_problem(pid, row, first_row_of) if "patient_id" in record else None,
        ct_problem(record["ct_path"], root) if "ct_path" in record else None,
        _label_problem(record),
        report_problem(record, root),
        *(_numeric_problem(record, column) for column in NUMERIC_COLUMNS if column in record),
    ]
    return [f"{where}: {problem}" for problem in found if problem]


def _id_problem(pid: str, row: int, first_row_of: dict[str, int]) -> str | None:
    """An empty or duplicate patient_id."""
    if not pid:
        return "patient_id is empty: give every row a unique patient_id."
    if pid in first_row_of:
        return (
            f"patient_id {pid!r} is already used on row {first_row_of[pid]}: "
            "give each patient a unique id or delete the duplicate row."
        )
    first_row_of[pid] = row
    return None


def ct_problem(value: Any, root: Path) -> str | None:
    """A missing, unreadable or non-3D CT, or one that is not a head CT in Hounsfield units."""
    text = _text(value)
    if not text:
        return "ct_path is empty: give the path of the patient's CT (a NIfTI file or a DICOM folder)."
    path = _resolve(text, root)
    if not path.exists():
        return _does_not_exist("CT", path, root)
    try:
        ct_geometry(path)
        load_ct(path)  # the voxels: a CT in Hounsfield units (ichpro.data.check_hounsfield)
    except ImageError as err:
        return f"{err}."
    return None


def _does_not_exist(what: str, path: Path, root: Path) -> str:
    return f"{what} {path} does not exist: fix its path (relative paths are read from {root})."


def _label_problem(record: dict[Hashable, Any]) -> str | None:
    """A label outside {0, 1}, a GOS outside 1..5 (where given), or a label the GOS contradicts."""
    if "label" in record:
        value = _text(record["label"])
        if _number(value) not in (0, 1):
            return f"label is {_shown(value)}: set it to 0 (good outcome) or 1 (bad outcome)."
    if "gos" in record:
        gos = _text(record["gos"])
        if _number(gos) not in (1, 2, 3, 4, 5) and (gos or "label" not in record):
            return (
                f"gos is {_shown(gos)}: set it to the Glasgow Outcome Scale score, "
                "a whole number from 1 to 5."
            )
        if "label" in record and gos and _number(record["label"]) != (_number(gos) <= 3):
            return (
                f"label {_text(record['label'])} contradicts gos {gos} (bad outcome = GOS <= 3): "
                "fix one of them or drop one column."
            )
    return None


def report_problem(record: dict[Hashable, Any], root: Path) -> str | None:
    """An empty report, or a report file that is missing, empty or not UTF-8."""
    if "report" not in record and "report_path" not in record:
        return None  # already reported as a missing column
    if _text(record.get("report")):
        return None
    path_text = _text(record.get("report_path"))
    if not path_text:
        return (
            "the report is empty: write the clinical report in the 'report' column "
            "or give a text file in 'report_path'."
        )
    path = _resolve(path_text, root)
    if not path.is_file():
        return _does_not_exist("report file", path, root)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return f"report file {path} is not UTF-8 text: save it with UTF-8 encoding."
    if not text.strip():
        return f"report file {path} is empty: write the clinical report into it."
    return None


def _numeric_problem(record: dict[Hashable, Any], column: str) -> str | None:
    """A non-empty, non-numeric value in a numeric clinical column."""
    value = _text(record[column])
    if value and _number(value) is None:
        return f"{column} is {value!r}, not a number: write a number (e.g. 63 or 4.5) or leave it empty."
    return None


def normalised(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    """The checked manifest with absolute ct_path, report text, integer label and float columns."""
    out = df.copy()
    out["patient_id"] = out["patient_id"].map(_text)
    out["ct_path"] = [str(_resolve(_text(p), root)) for p in out["ct_path"]]
    if "mask_path" in out.columns:
        out["mask_path"] = [str(_resolve(_text(p), root)) if _text(p) else None for p in out["mask_path"]]
    out["report"] = [report_text(record, root) for record in df.to_dict("records")]
    if "label" in out.columns:
        out["label"] = out["label"].map(_number).astype(int)
    else:
        out["label"] = (out["gos"].map(_number) <= 3).astype(int)
    for column in [*NUMERIC_COLUMNS, "gos"]:
        if column in out.columns:
            out[column] = out[column].map(_number).astype(float)
    return out


def report_text(record: dict[Hashable, Any], root: Path) -> str:
    """The report text of a validated row: the 'report' cell, else the report file's content."""
    text = _text(record.get("report"))
    if text:
        return text
    return _resolve(_text(record["report_path"]), root).read_text(encoding="utf-8").strip()


def _text(value: Any) -> str:
    """A cell as stripped text; empty for None, NaN and blanks."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _number(value: Any) -> float | None:
    """A cell as a finite float, or None when it is empty or not a number."""
    try:
        number = float(_text(value))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _shown(value: str) -> str:
    """A cell value quoted for a message, or 'empty'."""
    return repr(value) if value else "empty"


def _resolve(text: str, root: Path) -> Path:
    """An absolute path: `text` itself if absolute, else relative to `root`."""
    return (Path(root) / Path(text).expanduser()).resolve()


def summarize_manifest(df: pd.DataFrame) -> str:
    """Human summary of a loaded manifest: patients, outcome balance, CT geometry, clinical columns."""
    n = len(df)
    bad = int(df["label"].sum())
    geometries = [ct_geometry(Path(p)) for p in df["ct_path"]]
    shapes = np.array([g.shape for g in geometries])
    spacings = np.array([g.spacing for g in geometries])
    orientations = pd.Series([g.axcodes for g in geometries]).value_counts()
    clinical = [c for c in NUMERIC_COLUMNS if c in df.columns]
    known = {"patient_id", "ct_path", "label", "gos", "report", "report_path", *clinical}
    lines = [
        f"patients: {n}",
        f"outcome: {n - bad} good ({_percent(n - bad, n)}), {bad} bad ({_percent(bad, n)})",
        f"CT size (voxels, x × y × z in RAS order): {_triple(shapes.min(0), 'd')} "
        f"to {_triple(shapes.max(0), 'd')}",
        f"voxel spacing (mm, x × y × z): {_triple(spacings.min(0), '.2f')} "
        f"to {_triple(spacings.max(0), '.2f')}",
        "stored orientation: " + ", ".join(f"{code} ({k})" for code, k in orientations.items()),
        "clinical columns: " + (", ".join(_filled(df[c]) for c in clinical) or "none"),
        "other columns: " + (", ".join(c for c in df.columns if c not in known) or "none"),
        *report_fields_summary(df),
    ]
    return "\n".join(lines)


def report_fields_summary(df: pd.DataFrame) -> list[str]:
    """How many reports give each field (:data:`ichpro.reports.KEYS`), and a ``warning:`` line for
    values that cannot be read and for reports that give no field at all."""
    statuses = [field_status(text) for text in df["report"]]
    n = len(statuses)
    given = {name: sum(s[name] == "given" for s in statuses) for name in KEYS}
    lines = ["report fields given: " + ", ".join(f"{name} {k}/{n}" for name, k in given.items())]
    unreadable = {name: sum(s[name] == "unreadable" for s in statuses) for name in KEYS}
    if any(unreadable.values()):
        lines.append("warning: report values that cannot be read: " + ", ".join(
            f"{name} in {k} report(s)" for name, k in unreadable.items() if k)
            + f"; write them like {render(EXAMPLE_REPORT)!r}")
    empty = [pid for pid, s in zip(df["patient_id"], statuses) if "given" not in s.values()]
    if empty:
        lines.append(f"warning: {len(empty)} report(s) give none of the expected fields, e.g. patient "
                     f"{empty[0]!r}: the clinical baselines and the multi-task comparators read them "
                     f"(one 'Key: value' per line, e.g. {render(EXAMPLE_REPORT)!r}); ICHPro reads the "
                     "text as it is")
    return lines


def _filled(column: pd.Series) -> str:
    """A column's name, with how many rows fill it when some are empty."""
    filled = int(column.notna().sum())
    return column.name if filled == len(column) else f"{column.name} ({filled}/{len(column)} filled)"


def _percent(k: int, n: int) -> str:
    """k out of n as a percentage with one decimal."""
    return f"{100 * k / n:.1f}%" if n else "n/a"


def _triple(values: Sequence[float], fmt: str) -> str:
    """Three numbers joined as 'a×b×c'."""
    return "×".join(format(v, fmt) for v in values)


def haematoma_volumes(manifest: pd.DataFrame) -> np.ndarray:
    """Haematoma volume (mL) of each patient: the label-1 voxels of its ``mask_path`` (1 haematoma,
    2 intraventricular blood) times the voxel volume; the ``volume_ml`` column where there is no mask."""
    absent = pd.Series(np.nan, index=manifest.index)
    masks, noted = (manifest.get(name, absent) for name in ("mask_path", "volume_ml"))
    volumes = []
    for mask_path, volume, pid in zip(masks, noted, manifest["patient_id"]):
        if _text(mask_path):
            image = nib.load(str(mask_path))
            voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
            volumes.append(float((np.asarray(image.dataobj) == 1).sum() * voxel_ml))
        elif _number(volume) is not None:
            volumes.append(float(volume))
        else:
            raise ManifestError(f"patient {pid} has neither a mask_path nor a volume_ml: the haematoma "
                                "volume target needs one of them for every patient")
    return np.array(volumes)
