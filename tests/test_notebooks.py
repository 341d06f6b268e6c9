"""Every notebook is a clean source and executes on the smoke profile with papermill."""

import json

import nbformat
import pytest

from ichpro.errors import IchproError
from ichpro.reproduce import NOTEBOOK_DIR, run_notebooks, select_notebooks

NOTEBOOKS = select_notebooks()
PARAMETERS = ("profile", "data_dir", "output_dir", "figures_dir", "seed", "device")
#: files each notebook must write into the figures folder
EXPECTED_FIGURES = {
    "01": ("cohort_distributions.png", "cohort_calibration.png", "cohort_calibration.csv",
           "cohort_ct_examples.png", "oracle_auc.csv", "oracle_roc.png"),
    "02": ("preprocessing_steps.png",),
    "03": ("encoders_pretraining.png", "encoders_pretrained_features.png"),
    "07": ("table1_modalities.csv", "table1_modalities.md", "table1_modalities.png",
           "table1_pooled_vs_per_fold.csv"),
    "08": ("table2_fusion.csv", "table2_fusion.md", "table2_fusion.png"),
    "09": ("table3_losses.csv", "table3_losses.md", "table3_losses.png"),
    "10": ("table4_comparison.csv", "table4_comparison.md", "table4_comparison.png", "table4_systems.png",
           "table4_auxiliary.csv", "table4_volume.png", "table4_grad_cam.png", "table4_roc.png"),
    "11": ("attention_examples.png", "attention_counterfactual.png", "attention_counterfactual.csv",
           "attention_counterfactual_truth.png", "attention_report_words.png", "attention_localisation.png",
           "attention_localisation.csv", "attention_localisation_summary.csv"),
}


def test_notebooks_are_numbered_uniquely_from_00():
    numbers = [int(nb.name[:2]) for nb in NOTEBOOKS]
    assert numbers[0] == 0 and numbers == sorted(set(numbers)) and len(numbers) >= 3


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_source_notebook_is_clean_and_parameterised(notebook):
    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip the outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "the first code cell is the parameters cell"
    assert all(f"{name} =" in tagged[0].source for name in PARAMETERS)
    assert code[-1].source.strip() == "versions()", "end with the provenance cell"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.fixture(scope="module")
def notebook_runs(tmp_path_factory):
    """One output folder for every notebook, as ``ichpro reproduce`` has: a table row that several
    notebooks share (ICHPro) is trained by the first and loaded by the others."""
    return tmp_path_factory.mktemp("notebook_runs")


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_smoke(notebook, smoke_cohort, notebook_runs, tmp_path):
    number = notebook.name[:2]
    figures = tmp_path / "figures"
    run_notebooks("smoke", only=[number], data_dir=str(smoke_cohort), output_dir=str(notebook_runs),
                  figures_dir=str(figures))
    executed = nbformat.read(notebook_runs / "notebooks" / notebook.name, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    for name in EXPECTED_FIGURES.get(number, ()):
        assert (figures / name).is_file(), f"{notebook.name} did not write {name}"


def test_a_failing_notebook_keeps_its_copy_and_reports_the_cell(smoke_cohort, tmp_path):
    source = nbformat.read(NOTEBOOKS[0], as_version=4)
    params = next(c for c in source.cells if "parameters" in c.metadata.get("tags", []))
    failing = nbformat.v4.new_notebook(metadata=source.metadata)
    failing.cells = [params, nbformat.v4.new_code_cell("raise ValueError('boom in cell')")]
    folder = tmp_path / "nbs"
    folder.mkdir()
    nbformat.write(failing, folder / "00_failing.ipynb")
    with pytest.raises(IchproError, match="00_failing.ipynb failed.*ValueError: boom in cell"):
        run_notebooks("smoke", data_dir=str(smoke_cohort), output_dir=str(tmp_path / "run"),
                      notebook_dir=folder)
    kept = json.loads((tmp_path / "run" / "notebooks" / "00_failing.ipynb").read_text())
    assert any(o.get("ename") == "ValueError" for c in kept["cells"] for o in c.get("outputs", []))


def test_notebook_dir_is_inside_the_repository():
    assert NOTEBOOK_DIR.name == "notebooks" and (NOTEBOOK_DIR.parent / "pyproject.toml").is_file()


def test_relative_folders_are_resolved_against_the_callers_folder(smoke_cohort, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_notebooks("smoke", only=["00"], data_dir=str(smoke_cohort), output_dir="run",
                  figures_dir="figs")
    assert (tmp_path / "run" / "notebooks" / "00_overview.ipynb").is_file()
    assert (tmp_path / "figs").is_dir() and not (NOTEBOOK_DIR / "figs").exists()
