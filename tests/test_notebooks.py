"""Every notebook is a clean source of short cells and executes on the smoke profile with papermill."""

import ast
import io
import json
import re
import shlex
import subprocess
import tokenize

import nbformat
import pandas as pd
import pytest

from ichpro.config import REPO_ROOT, get_profile
from ichpro.errors import IchproError
from ichpro.reproduce import (
    NOTEBOOK_DIR,
    SETUP_ROW,
    execution_order,
    first_run_plan,
    notebook_relative,
    run_notebooks,
    select_notebooks,
    setup_notebook,
    strip_source_notebook,
)

NOTEBOOKS = select_notebooks()
PARAMETERS = ("profile", "data_dir", "output_dir", "figures_dir", "seed", "device")
#: files each notebook must write into the figures folder
EXPECTED_FIGURES = {
    "00": ("verdicts.csv",),
    "01": ("cohort_distributions.png", "cohort_calibration.png", "cohort_calibration.csv",
           "cohort_ct_examples.png", "oracle_auc.csv", "oracle_roc.png"),
    "02": ("preprocessing_steps.png", "preprocessing_windows.png"),
    "03": ("encoders_pretraining.png", "encoders_pretraining_card.md",
           "encoders_pretrained_features.png"),
    "04": ("fusion_parameter_counts.csv",),
    "05": ("vtmf_temperature.png", "vtmf_gradients.png"),
    "06": ("training_curves.png", "training_roc.png", "training_calibration_confusion.png",
           "training_oof_metrics.csv"),
    "07": ("table1_modalities.csv", "table1_modalities_comparisons.csv", "table1_modalities.md",
           "table1_modalities.png", "table1_pooled_vs_per_fold.csv", "table1_hospital_stay.png",
           "table1_text_probe.csv"),
    "08": ("table2_fusion.csv", "table2_fusion_comparisons.csv", "table2_fusion.md", "table2_fusion.png"),
    "09": ("table3_losses.csv", "table3_losses_comparisons.csv", "table3_losses.md", "table3_losses.png",
           "table3_losses_versus_ce.csv", "table3_loss_curves.png"),
    "10": ("table4_comparison.csv", "table4_comparison_comparisons.csv", "second_cohort.csv",
           "second_cohort_comparisons.csv", "table4_comparison.md", "table4_comparison.png",
           "table4_systems.png", "table4_auxiliary.csv", "table4_volume.png", "table4_grad_cam.png",
           "table4_roc.png", "table4_grad_cam_summary.csv"),
    "11": ("attention_examples.png", "attention_counterfactual.png", "attention_counterfactual.csv",
           "attention_counterfactual_summary.csv",
           "attention_counterfactual_truth.png", "attention_report_words.png", "attention_localisation.png",
           "attention_localisation.csv", "attention_localisation_summary.csv"),
    "12": ("clinical_calibration.csv", "clinical_calibration_curves.csv", "clinical_calibration.png",
           "clinical_decision_curves.csv", "clinical_decision_curves.png", "clinical_subgroups.csv",
           "clinical_subgroups.png", "clinical_sample_size.csv"),
}


def test_notebooks_are_numbered_uniquely_from_00():
    numbers = [int(nb.name[:2]) for nb in NOTEBOOKS]
    assert numbers[0] == 0 and numbers == sorted(set(numbers)) and len(numbers) >= 3


#: the kernelspec JupyterLab writes for the project's kernel (``ipykernel install --name python3``)
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
MAX_LOGIC_LINES = 10


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=NOTEBOOK_DIR, capture_output=True, text=True).stdout.strip()


def _clean_filter() -> list[str]:
    """The checkout's nbstripout clean command (configured by ``make setup``), or []."""
    return shlex.split(_git("config", "--get", "filter.nbstripout.clean"))


def committed_text(notebook) -> str:
    """The notebook as git would commit it: through the clean filter when the checkout has it."""
    text = notebook.read_text()
    if _clean_filter() and _git("check-attr", "filter", str(notebook)).endswith("nbstripout"):
        text = subprocess.run(_clean_filter(), input=text, capture_output=True, text=True, check=True,
                              cwd=NOTEBOOK_DIR).stdout
    return text


def logic_lines(source: str) -> int:
    """Python logical lines of a cell, less imports (IPython magics, comments and blanks do not count)."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    import_ends = {node.end_lineno for node in ast.walk(ast.parse(code))
                   if isinstance(node, ast.Import | ast.ImportFrom)}
    return sum(1 for tok in tokenize.generate_tokens(io.StringIO(code + "\n").readline)
               if tok.type == tokenize.NEWLINE and tok.start[0] not in import_ends)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_source_notebook_is_clean_and_parameterised(notebook):
    nb = nbformat.reads(committed_text(notebook), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip the outputs (make setup)"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "the first code cell is the parameters cell"
    assert all(f"{name} =" in tagged[0].source for name in PARAMETERS)
    assert 'profile = "cpu"' in tagged[0].source, "notebooks default to the profile of the committed figures"
    assert code[-1].source.strip() == "versions()", "end with the provenance cell"
    assert nb.metadata["kernelspec"] == KERNELSPEC, "JupyterLab's metadata: opening is a no-op"


@pytest.mark.skipif(not _clean_filter(), reason="the notebook filter is set up by make setup")
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_clean_filter_leaves_the_committed_notebook_unchanged(notebook):
    committed = _git("show", f"HEAD:notebooks/{notebook.name}")
    if not committed:
        pytest.skip("not committed yet")
    filtered = subprocess.run(_clean_filter(), input=committed + "\n", capture_output=True, text=True,
                              check=True).stdout
    assert filtered.strip() == committed, "write notebooks as the filter does (nbstripout --keep-id)"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_cells_are_short(notebook):
    nb = nbformat.read(notebook, as_version=4)
    long = {i: n for i, c in enumerate(nb.cells) if c.cell_type == "code"
            and (n := logic_lines(c.source)) > MAX_LOGIC_LINES}
    assert not long, f"cells (index: logic lines) {long} over {MAX_LOGIC_LINES}: move the logic into ichpro"


@pytest.mark.parametrize(("source", "expected"), [
    ("import numpy as np\nfrom a import (\n  b,\n  c,\n)\n", 0),
    ("x = f(\n  1,\n  2,\n)\n# a comment\n\ny = 2\n%matplotlib inline\n", 2),
    ('def f(a):\n    """doc"""\n    return a\n', 3),
])
def test_logic_lines_count_statements_not_physical_lines(source, expected):
    assert logic_lines(source) == expected


def test_injected_folders_are_relative_inside_the_repository(tmp_path):
    assert notebook_relative(NOTEBOOK_DIR.parent / "figures", NOTEBOOK_DIR) == "../figures"
    assert notebook_relative(tmp_path, NOTEBOOK_DIR) == str(tmp_path.resolve())


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
    assert executed.metadata["papermill"]["input_path"] == f"notebooks/{notebook.name}"
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


def test_executed_copies_and_timings_go_to_the_chosen_folder(smoke_cohort, tmp_path):
    table = run_notebooks("smoke", only=["00"], data_dir=str(smoke_cohort), output_dir=str(tmp_path / "run"),
                          executed_dir=str(tmp_path / "executed"))
    assert (tmp_path / "executed" / "00_overview.ipynb").is_file()
    assert not (tmp_path / "run" / "notebooks").exists()
    timings = pd.read_csv(tmp_path / "executed" / "timings.csv")
    assert list(timings["notebook"]) == [SETUP_ROW, "00_overview.ipynb"] == list(table["notebook"])
    assert (timings["seconds"] >= 0).all()


def test_the_first_run_says_what_it_makes():
    profile = get_profile("cpu")
    plan = first_run_plan(profile)
    pretrain = f"{profile.pretrain.n_patients} synthetic CTs, {profile.pretrain.epochs} epochs"
    assert "480 patients" in plan and pretrain in plan
    assert "pretrained" not in first_run_plan(get_profile("paper"))  # the paper profile brings its weights


def test_a_partial_run_keeps_the_other_notebooks_timings(smoke_cohort, tmp_path):
    executed = tmp_path / "executed"
    executed.mkdir()
    pd.DataFrame({"notebook": [SETUP_ROW, "00_overview.ipynb", "99_other.ipynb"], "seconds": [1.0, 2.0, 3.0]}
                 ).to_csv(executed / "timings.csv", index=False)
    run_notebooks("smoke", only=["00"], data_dir=str(smoke_cohort), output_dir=str(tmp_path / "run"),
                  executed_dir=str(executed))
    timings = pd.read_csv(executed / "timings.csv").set_index("notebook")["seconds"]
    assert list(timings.index) == [SETUP_ROW, "00_overview.ipynb", "99_other.ipynb"]
    assert timings["99_other.ipynb"] == 3.0 and timings["00_overview.ipynb"] != 2.0


def test_printed_paths_name_no_machine(tmp_path):
    ctx = setup_notebook("smoke", figures_dir=str(tmp_path))
    assert ctx.describe().startswith("profile smoke, cohort data_synthetic/smoke, figures -> /")
    assert ctx.shown(NOTEBOOK_DIR / "x.ipynb") == "notebooks/x.ipynb"


class _ContentsManager:
    root_dir = str(NOTEBOOK_DIR.parent)


def _as_jupyterlab_saves_it(notebook) -> dict:
    """The save request of a source notebook after a run: outputs, counts and the kernel's version."""
    nb = nbformat.read(notebook, as_version=4)
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("stream", text="ran\n")]
    return {"type": "notebook", "content": json.loads(nbformat.writes(nb))}


def test_jupyterlab_saves_a_source_notebook_as_it_is_committed():
    notebook = NOTEBOOKS[0]
    model = _as_jupyterlab_saves_it(notebook)
    strip_source_notebook(model, f"notebooks/{notebook.name}", _ContentsManager())
    assert nbformat.writes(nbformat.from_dict(model["content"])) + "\n" == committed_text(notebook)


def test_jupyterlab_keeps_the_outputs_of_other_notebooks():
    model = _as_jupyterlab_saves_it(NOTEBOOKS[0])
    strip_source_notebook(model, f"figures/notebooks/{NOTEBOOKS[0].name}", _ContentsManager())
    assert any(c.get("outputs") for c in model["content"]["cells"])


def test_the_overview_runs_last_since_its_verdicts_read_the_other_notebooks_results():
    order = [nb.name[:2] for nb in execution_order(NOTEBOOKS)]
    assert order == [*(nb.name[:2] for nb in NOTEBOOKS[1:]), "00"]


#: the executed ``cpu`` reference notebooks, committed beside the figures
EXECUTED = REPO_ROOT / "figures" / "notebooks"
MACHINE_FOLDERS = ("/tmp/", "/root/", "/home/", "/Users/", str(REPO_ROOT))


def _cells(notebook, kind):
    return [c.source for c in notebook.cells if c.cell_type == kind
            and "injected-parameters" not in c.metadata.get("tags", [])]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_executed_notebook_is_its_source_run_once_and_names_no_machine(notebook):
    text = (EXECUTED / notebook.name).read_text()
    executed, source = nbformat.reads(text, as_version=4), nbformat.read(notebook, as_version=4)
    assert _cells(executed, "markdown") == _cells(source, "markdown"), "written by make reproduce only"
    assert _cells(executed, "code") == _cells(source, "code")
    assert not [folder for folder in MACHINE_FOLDERS if folder in text]
    stderr = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs
              if o.get("name") == "stderr"]
    assert not stderr, "".join(o.text for o in stderr)[:500]


def test_the_executed_notebooks_name_one_commit_of_the_history_unmodified():
    commits = set()
    for notebook in NOTEBOOKS:
        executed = nbformat.read(EXECUTED / notebook.name, as_version=4)
        shown = "".join(o.get("data", {}).get("text/plain", "") for o in executed.cells[-1].outputs)
        commits |= set(re.findall(r"git commit\s+(\S+(?: \(modified\))?)", shown))
    assert len(commits) == 1, commits
    (commit,) = commits
    assert "modified" not in commit and commit != "unknown"
    if _git("rev-parse", "--is-shallow-repository") == "false":
        assert _git("cat-file", "-t", commit) == "commit"
