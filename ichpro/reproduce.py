"""Headless reproduction: the notebooks' shared set-up and the papermill runner behind
``ichpro reproduce``."""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
from monai.utils import set_determinism

from ichpro.cohort import ensure_cohort, load_spec
from ichpro.config import REPO_ROOT, Profile, cache_root, get_profile
from ichpro.errors import IchproError
from ichpro.pretrain import ensure_pretrained, pretrained_ready

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
RUNS_DIR = REPO_ROOT / "runs"
TIMINGS_FILE = "timings.csv"
SETUP_ROW = "set-up: cohort and pretraining"
#: notebook metadata the kernel rewrites on every run (its Python version): never part of a source
#: notebook (the git filter of ``make setup`` strips the same key)
VOLATILE_METADATA = ["metadata.language_info"]
OVERVIEW = "00_"  # the overview notebook, executed last
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in kernel tracebacks


@dataclass(frozen=True)
class RunContext:
    """Resolved folders and settings of one notebook run."""

    profile: Profile
    data_dir: Path
    output_dir: Path
    figures_dir: Path
    seed: int

    def figure_path(self, name: str) -> Path:
        """Path of a figure or table file in the figures folder."""
        return self.figures_dir / name

    def describe(self) -> str:
        """One line on where this run reads and writes."""
        return (f"profile {self.profile.name}, cohort {self.shown(self.data_dir)}, "
                f"figures -> {self.shown(self.figures_dir)}")

    @staticmethod
    def shown(path: Path) -> str:
        """A path as printed: repository-relative inside the repository, so outputs name no machine."""
        path = Path(path).resolve()
        return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)

    @property
    def cache_dir(self) -> Path:
        """The cache of preprocessed CTs, frozen-encoder outputs and pretrained encoders."""
        return cache_root()


def setup_notebook(profile: str = "cpu", data_dir: str = "", output_dir: str = "",
                   figures_dir: str = "", seed: int = 0) -> RunContext:
    """Resolve a notebook's parameters, seed everything, quieten library noise, and make sure the
    cohort and the pretrained vision encoder exist (made once, with progress bars, on a first run)."""
    quiet_libraries()
    prof = get_profile(profile)
    # absolute paths: the runner's kernels work in notebooks/, not in the caller's folder
    data = (Path(data_dir) if data_dir else REPO_ROOT / "data_synthetic" / prof.cohort).resolve()
    out = (Path(output_dir) if output_dir else RUNS_DIR / prof.name).resolve()
    figs = (Path(figures_dir) if figures_dir else out / "figures").resolve()
    figs.mkdir(parents=True, exist_ok=True)
    set_determinism(seed)
    if not (data / "manifest.csv").is_file() or not pretrained_ready(prof):
        print(first_run_plan(prof), flush=True)
    ensure_cohort(prof.cohort, data)
    ensure_pretrained(prof)
    return RunContext(prof, data, out, figs, seed)


def quiet_libraries() -> None:
    """Silence what libraries print on every load (weight-loading bars, advisory warnings), so that
    a notebook shows only its own output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="monai")


def first_run_plan(profile: Profile) -> str:
    """What a profile's first run on a machine makes once (the progress bars below it show the time left)."""
    cohort = load_spec(profile.cohort)
    steps = [f"the {cohort.name} cohort ({cohort.n_patients} patients)"]
    if profile.pretrain is not None and profile.model.vision_weights is None:
        steps.append(f"a pretrained vision encoder ({profile.pretrain.n_patients} synthetic CTs, "
                     f"{profile.pretrain.epochs} epochs)")
    return (f"first run of the {profile.name} profile on this machine: making {' and '.join(steps)} once, "
            "into the cache; later runs reuse them. Progress bars show the time left.")


def select_notebooks(only: list[str] | None = None, notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The ordered notebooks ``NN_*.ipynb``, optionally only those whose number is in ``only``."""
    notebooks = sorted(Path(notebook_dir).glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {n.zfill(2) for n in only}
        unknown = wanted - {nb.name[:2] for nb in notebooks}
        if unknown:
            raise IchproError(f"no notebook numbered {', '.join(sorted(unknown))} in {notebook_dir}")
        notebooks = [nb for nb in notebooks if nb.name[:2] in wanted]
    return notebooks


def execution_order(notebooks: list[Path]) -> list[Path]:
    """The order a run executes notebooks in: 00 (the overview, whose verdict table reads every other
    notebook's results) last."""
    return sorted(notebooks, key=lambda nb: (nb.name.startswith(OVERVIEW), nb.name))


def run_notebooks(profile: str, only: list[str] | None = None, data_dir: str = "",
                  output_dir: str = "", figures_dir: str = "", seed: int = 0,
                  log_output: bool = False, notebook_dir: Path = NOTEBOOK_DIR,
                  executed_dir: str = "", readme: str = "") -> pd.DataFrame:
    """Execute notebooks in order with papermill; returns wall time per notebook (and of the set-up).

    Executed copies, and their timings, go to ``executed_dir`` (default ``<output_dir>/notebooks/``);
    a failing notebook's copy is kept there and an :class:`IchproError` carries the failing cell's
    error. With ``readme``, that file's generated blocks are filled from the figures at the end
    (:func:`fill_readme`).
    """
    import papermill as pm  # heavy (Jupyter's client machinery): only the runner needs it

    notebooks = select_notebooks(only, notebook_dir)
    start = time.perf_counter()
    ctx = setup_notebook(profile, data_dir, output_dir, figures_dir, seed)
    timings = [{"notebook": SETUP_ROW, "seconds": round(time.perf_counter() - start, 1)}]
    executed = Path(executed_dir).resolve() if executed_dir else ctx.output_dir / "notebooks"
    executed.mkdir(parents=True, exist_ok=True)
    # the kernel named python3 must be this interpreter's (the project's .venv)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(Path(sys.prefix) / "share" / "jupyter"), os.environ.get("JUPYTER_PATH", "")])
    folders = {"data_dir": ctx.data_dir, "output_dir": ctx.output_dir, "figures_dir": ctx.figures_dir}
    parameters = {"profile": ctx.profile.name, "seed": seed,
                  **{name: notebook_relative(path, notebook_dir) for name, path in folders.items()}}
    for nb in execution_order(notebooks):
        start = time.perf_counter()
        print(f"[{ctx.profile.name}] {nb.name} ...", flush=True)
        try:
            pm.execute_notebook(nb, executed / nb.name, parameters=parameters,
                                kernel_name="python3", cwd=str(notebook_dir),
                                log_output=log_output, progress_bar=False)
        except pm.PapermillExecutionError as err:
            raise IchproError(
                f"{nb.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                + _ANSI.sub("", "".join(err.traceback[-5:]))
                + f"\nexecuted copy kept at {executed / nb.name}") from err
        seconds = time.perf_counter() - start
        name_no_machine(executed / nb.name)
        print(f"[{ctx.profile.name}] {nb.name} done in {seconds:.1f} s", flush=True)
        timings.append({"notebook": nb.name, "seconds": round(seconds, 1)})
    table = pd.DataFrame(timings)
    _record_timings(table, executed / TIMINGS_FILE)
    if readme:
        fill_readme(Path(readme), ctx.figures_dir)
        print(f"filled the verdict and results tables of {readme}", flush=True)
    print(f"total {np.sum(table['seconds']):.1f} s", flush=True)
    return table


#: the README's generated blocks: the verdict table between two comment lines, and each results table
#: after the line that links its Markdown file
README_VERDICTS = re.compile(r"(<!-- verdicts:[^\n]*-->\n)(.*?)(<!-- /verdicts -->)", re.S)
README_TABLES = re.compile(r"(\(figures/(table\d_\w+)\.md\)[^\n]*\n(?:[^|\n][^\n]*\n)*\n)((?:\|[^\n]*\n)+)")


def fill_readme(readme: Path, figures: Path) -> None:
    """Rewrite the README's generated blocks from a run's CSVs: the verdict table
    (:func:`ichpro.verdicts.verdict_markdown`) and the results tables
    (:func:`ichpro.experiments.readme_table`); the prose around them is kept."""
    from ichpro.experiments import readme_table
    from ichpro.verdicts import verdict_markdown, verdict_table

    readme, figures = Path(readme), Path(figures)
    text = readme.read_text()
    if not README_VERDICTS.search(text):
        raise IchproError(f"{readme} has no verdict block (<!-- verdicts: ... --> ... <!-- /verdicts -->)")
    verdicts = verdict_markdown(verdict_table(figures))
    text = README_VERDICTS.sub(lambda m: m.group(1) + verdicts + m.group(3), text)
    text = README_TABLES.sub(lambda m: m.group(1) + readme_table(pd.read_csv(figures / f"{m.group(2)}.csv")),
                            text)
    readme.write_text(text)


def name_no_machine(executed: Path) -> None:
    """Rewrite the papermill metadata of an executed notebook (``input_path``, ``output_path``) as
    :meth:`RunContext.shown` writes paths: repository-relative, so that it names no machine's folders."""
    notebook = nbformat.read(executed, as_version=4)
    record = notebook.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if record.get(key):
            record[key] = RunContext.shown(Path(record[key]))
    nbformat.write(notebook, executed)


def _record_timings(table: pd.DataFrame, path: Path) -> None:
    """Write the run's timings, keeping the earlier rows of notebooks this run did not execute."""
    if path.is_file():
        earlier = pd.read_csv(path)
        table = pd.concat([earlier[~earlier["notebook"].isin(table["notebook"])], table])
        table = table.sort_values("notebook", key=lambda names: names.ne(SETUP_ROW).astype(str) + names)
    table.to_csv(path, index=False)


def strip_source_notebook(model: dict, path: str, contents_manager, **kwargs) -> None:
    """Jupyter pre-save hook (installed by ``make setup``): a source notebook in ``notebooks/`` is saved
    without outputs, execution counts or the kernel's version, as git would commit it, so that running
    it in JupyterLab leaves ``git status`` clean. Its outputs stay on screen until the tab is closed;
    the executed reference notebooks in ``figures/notebooks/`` are saved as they are."""
    from nbstripout import strip_output

    target = (Path(contents_manager.root_dir) / path).resolve()
    if model.get("type") != "notebook" or target.parent != NOTEBOOK_DIR.resolve():
        return
    notebook = nbformat.from_dict(model["content"])
    model["content"] = strip_output(notebook, keep_output=False, keep_count=False, keep_id=True,
                                    extra_keys=VOLATILE_METADATA)


def notebook_relative(path: Path, notebook_dir: Path) -> str:
    """A folder as a notebook's kernel (working in ``notebook_dir``) reaches it: relative inside
    the repository, so that executed notebooks name no machine's paths; absolute elsewhere."""
    path, notebook_dir = Path(path).resolve(), Path(notebook_dir).resolve()
    if path.is_relative_to(REPO_ROOT) and notebook_dir.is_relative_to(REPO_ROOT):
        return os.path.relpath(path, notebook_dir)
    return str(path)
