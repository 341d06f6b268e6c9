"""Test helper: four rendered clinical reports that differ in every field."""

from ichpro.reports import Report, render

REPORTS = [
    render(Report(56, "Female", 45, 20, 13, "Conservative treatment", "Occipital hemorrhage", 0.5)),
    render(Report(81, "Male", 120, 4, 5, "Craniotomy", "Left basal ganglia hemorrhage", 45.0)),
    render(Report(67, "Male", 200, 30, 9, "Minimally invasive surgery", "Right thalamic hemorrhage", 15.0)),
    render(Report(45, "Female", 60, 12, 15, "Conservative treatment", "Right cerebellar hemorrhage", 5.0)),
]
