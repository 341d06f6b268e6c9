"""Clinical report text in the ICHPro field format: render a :class:`Report` and parse it back.

The paper's report is a short list of fields (overview figure)::

    Age: 56 · Gender: Female · Onset-to-CT Time: 45 min · Hospital Stay: 20 days ·
    GCS Score: 13 · Treatment Method: Conservative treatment · Position: Occipital hemorrhage ·
    Volume: Less than 1 ml

Real reports vary in layout and wording, so :func:`render` takes a :class:`ReportStyle`
(separator, key synonyms, time format) and :func:`parse` accepts every style it can render.
A missing field is left out of the text, never written as "nan".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ichpro.errors import IchproError

TREATMENTS = ("Conservative treatment", "Minimally invasive surgery", "Craniotomy")

#: Field keys in the paper's order; each entry lists the canonical key first, then synonyms.
KEYS: dict[str, tuple[str, ...]] = {
    "age": ("Age", "Patient age"),
    "sex": ("Gender", "Sex"),
    "onset_to_ct_min": ("Onset-to-CT Time", "Time from onset to CT"),
    "hospital_stay_days": ("Hospital Stay", "Length of stay"),
    "gcs": ("GCS Score", "Glasgow Coma Scale"),
    "treatment": ("Treatment Method", "Treatment"),
    "position": ("Position", "Haemorrhage site"),
    "volume_ml": ("Volume", "Haematoma volume"),
}
SEPARATORS = ("\n", " · ", "; ")
LESS_THAN_ONE_ML = 0.5  # value parsed from "Less than 1 ml"


@dataclass(frozen=True)
class Report:
    """The fields of one clinical report; ``None`` marks a field the report does not give."""

    age: int | None = None
    sex: str | None = None  # "Male" | "Female"
    onset_to_ct_min: int | None = None
    hospital_stay_days: int | None = None
    gcs: int | None = None
    treatment: str | None = None
    position: str | None = None  # free text, e.g. "Left basal ganglia hemorrhage"
    volume_ml: float | None = None  # the radiologist's estimate; 0.5 means "less than 1 ml"


@dataclass(frozen=True)
class ReportStyle:
    """Layout of a rendered report: the canonical style is the paper's."""

    separator: str = "\n"
    synonym: int = 0  # index into each field's key list
    hours: bool = False  # onset time as "2 h 5 min" instead of "125 min"


def _format_minutes(minutes: int, hours: bool) -> str:
    if not hours or minutes < 60:
        return f"{minutes} min"
    h, m = divmod(minutes, 60)
    return f"{h} h {m} min" if m else f"{h} h"


def _format_volume(ml: float) -> str:
    if ml < 1:
        return "Less than 1 ml"
    return f"{ml:g} ml"


def render(report: Report, style: ReportStyle = ReportStyle()) -> str:
    """Render a report as text; fields that are ``None`` are left out."""
    values = {
        "age": report.age,
        "sex": report.sex,
        "onset_to_ct_min": None
        if report.onset_to_ct_min is None
        else _format_minutes(report.onset_to_ct_min, style.hours),
        "hospital_stay_days": None
        if report.hospital_stay_days is None
        else f"{report.hospital_stay_days} days",
        "gcs": report.gcs,
        "treatment": report.treatment,
        "position": report.position,
        "volume_ml": None if report.volume_ml is None else _format_volume(report.volume_ml),
    }
    parts = [
        f"{KEYS[name][min(style.synonym, len(KEYS[name]) - 1)]}: {value}"
        for name, value in values.items()
        if value is not None
    ]
    return style.separator.join(parts)


def drop_field(text: str, field: str) -> str:
    """The report text without one field (under any of its keys), keeping the rest of its layout."""
    if field not in KEYS:
        raise IchproError(f"unknown report field {field!r}; choose one of {', '.join(KEYS)}")
    keys = tuple(f"{key.lower()}:" for key in KEYS[field])
    pieces = re.split(r"(\n|·|;)", text)
    parts, separators = pieces[0::2], pieces[1::2]
    kept = [part for part in parts if not part.strip().lower().startswith(keys)]
    separator = separators[0] if separators else "\n"
    return separator.join(kept).strip()


_KEY_TO_FIELD = {key.lower(): name for name, keys in KEYS.items() for key in keys}
_SPLIT = re.compile(r"\n|·|;")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _parse_minutes(text: str) -> int:
    hours = re.search(r"(\d+(?:\.\d+)?)\s*h", text)
    minutes = re.search(r"(\d+)\s*min", text)
    if not hours and not minutes:
        raise ValueError(text)
    return round((float(hours.group(1)) * 60 if hours else 0) + (int(minutes.group(1)) if minutes else 0))


def _parse_number(text: str) -> float:
    match = _NUMBER.search(text)
    if match is None:
        raise ValueError(text)
    return float(match.group())


def _parse_volume(text: str) -> float:
    if "less than 1" in text.lower():
        return LESS_THAN_ONE_ML
    return _parse_number(text)


_PARSERS = {
    "age": lambda t: int(_parse_number(t)),
    "sex": lambda t: {"male": "Male", "m": "Male", "female": "Female", "f": "Female"}[t.lower()],
    "onset_to_ct_min": _parse_minutes,
    "hospital_stay_days": lambda t: int(_parse_number(t)),
    "gcs": lambda t: int(_parse_number(t)),
    "treatment": str,
    "position": str,
    "volume_ml": _parse_volume,
}


def parse(text: str) -> Report:
    """Parse a report rendered in any :class:`ReportStyle`; unknown lines are ignored."""
    found: dict[str, object] = {}
    for name, key, value in _fields(text):
        try:
            found[name] = _PARSERS[name](value)
        except (ValueError, KeyError) as err:
            raise IchproError(
                f"report field {key!r} has an unreadable value {value!r}; "
                f"write it like the canonical report (e.g. {render(EXAMPLE_REPORT)!r})"
            ) from err
    return Report(**found)


def _fields(text: str):
    """(field name, key as written, value) of each line of the report that names a known field."""
    for part in _SPLIT.split(text):
        key, sep, value = part.partition(":")
        name = _KEY_TO_FIELD.get(key.strip().lower())
        if sep and name is not None and value.strip():
            yield name, key.strip(), value.strip()


def field_status(text: str) -> dict[str, str]:
    """Each report field (:data:`KEYS`): ``"given"``, ``"missing"``, or ``"unreadable"`` (its key
    is there with a value :func:`parse` cannot read)."""
    status = dict.fromkeys(KEYS, "missing")
    for name, _, value in _fields(text):
        try:
            _PARSERS[name](value)
            status[name] = "given"
        except (ValueError, KeyError):
            status[name] = "unreadable"
    return status


def position_category(position: str | None) -> str | None:
    """Map a free-text position to deep / lobar / cerebellar / brainstem (or supra/infratentorial)."""
    if position is None:
        return None
    text = position.lower()
    for category, words in _POSITION_WORDS:
        if any(word in text for word in words):
            return category
    return None


_POSITION_WORDS = (
    ("deep", ("basal ganglia", "thalam", "putamen", "capsul")),
    ("lobar", ("lobe", "lobar", "frontal", "parietal", "temporal", "occipital")),
    ("cerebellar", ("cerebell",)),
    ("brainstem", ("brainstem", "pons", "pontine", "midbrain", "medulla")),
    ("supratentorial", ("supratentorial",)),
    ("infratentorial", ("infratentorial",)),
)
POSITION_CATEGORIES = tuple(category for category, _ in _POSITION_WORDS)

#: the overview figure's report, shown as the format to follow
EXAMPLE_REPORT = Report(56, "Female", 45, 20, 13, TREATMENTS[0], "Occipital hemorrhage", 0.5)
