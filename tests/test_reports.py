import numpy as np
import pytest

from ichpro.cohort import ReportSpec, make_reports, report_styles, sample_clinical
from ichpro.errors import IchproError
from ichpro.reports import Report, ReportStyle, parse, position_category, render

PAPER_REPORT = Report(56, "Female", 45, 20, 13, "Conservative treatment", "Occipital hemorrhage", 0.5)


def test_canonical_render_is_the_paper_format():
    assert render(PAPER_REPORT).splitlines() == [
        "Age: 56", "Gender: Female", "Onset-to-CT Time: 45 min", "Hospital Stay: 20 days",
        "GCS Score: 13", "Treatment Method: Conservative treatment",
        "Position: Occipital hemorrhage", "Volume: Less than 1 ml",
    ]


@pytest.mark.parametrize("style", [
    ReportStyle(), ReportStyle(" · ", 1, True), ReportStyle("; ", 0, True), ReportStyle("\n", 1),
])
def test_round_trip_over_styles_and_a_generated_cohort(style):
    rng = np.random.default_rng(0)
    reports = make_reports(sample_clinical(300, rng), ReportSpec(missing_field_rate=0.2), rng)
    for report in reports:
        assert parse(render(report, style)) == report


def test_missing_fields_are_left_out_not_written_as_nan():
    text = render(Report(age=70, gcs=None, volume_ml=12.0))
    assert text == "Age: 70\nVolume: 12 ml"
    assert "nan" not in text.lower() and "none" not in text.lower()
    assert parse(text) == Report(age=70, volume_ml=12.0)


def test_hours_format_parses_to_minutes():
    assert parse("Onset-to-CT Time: 2 h 5 min").onset_to_ct_min == 125
    assert parse("Time from onset to CT: 3 h").onset_to_ct_min == 180


def test_unreadable_value_names_the_field():
    with pytest.raises(IchproError, match="GCS Score.*'high'"):
        parse("Age: 50\nGCS Score: high")


def test_unknown_lines_are_ignored():
    assert parse("Comment: patient anxious\nAge: 61") == Report(age=61)


@pytest.mark.parametrize("text, category", [
    ("Left basal ganglia hemorrhage", "deep"), ("Right thalamic hemorrhage", "deep"),
    ("Occipital hemorrhage", "lobar"), ("Left frontal lobe hemorrhage", "lobar"),
    ("Right cerebellar hemorrhage", "cerebellar"), ("Brainstem (pontine) hemorrhage", "brainstem"),
    ("Supratentorial hemorrhage", "supratentorial"), ("somewhere", None), (None, None),
])
def test_position_category(text, category):
    assert position_category(text) == category


def test_report_styles_vary_for_the_configured_share():
    styles = report_styles(2000, ReportSpec(variation_rate=0.3), np.random.default_rng(1))
    varied = np.mean([s != ReportStyle() for s in styles])
    assert 0.2 < varied < 0.3  # some random variants coincide with the canonical style
