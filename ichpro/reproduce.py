"""Headless reproduction: the notebooks' shared set-up and the papermill runner behind
``ichpro reproduce``."""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from monai.utils import set_determinism

from ichpro.cohort import ensure_cohort
from ichpro.config import REPO_ROOT, Profile, cache_root, get_profile
from ichpro.errors import IchproError
from ichpro.pretrain import ensure_pretrained

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
RUNS_DIR = REPO_ROOT / "runs"
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

    @property
    def cache_dir(self) -> Path:
        """The cache of preprocessed CTs, frozen-encoder outputs and pretrained encoders."""
        return cache_root()


def setup_notebook(profile: str = "smoke", data_dir: str = "", output_dir: str = "",
                   figures_dir: str = "", seed: int = 0) -> RunContext:
    """Resolve a notebook's parameters, seed everything, and make sure the cohort exists."""
    prof = get_profile(profile)
    # absolute paths: the runner's kernels work in notebooks/, not in the caller's folder
    data = (Path(data_dir) if data_dir else REPO_ROOT / "data_synthetic" / prof.cohort).resolve()
    out = (Path(output_dir) if output_dir else RUNS_DIR / prof.name).resolve()
    figs = (Path(figures_dir) if figures_dir else out / "figures").resolve()
    figs.mkdir(parents=True, exist_ok=True)
    set_determinism(seed)
    ensure_cohort(prof.cohort, data)
    ensure_pretrained(prof)
    return RunContext(prof, data, out, figs, seed)


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


def run_notebooks(profile: str, only: list[str] | None = None, data_dir: str = "",
                  output_dir: str = "", figures_dir: str = "", seed: int = 0,
                  log_output: bool = False, notebook_dir: Path = NOTEBOOK_DIR) -> pd.DataFrame:
    """Execute notebooks in order with papermill; returns wall time per notebook.

    Executed copies go to ``<output_dir>/notebooks/``; a failing notebook's copy is kept
    there and an :class:`IchproError` carries the failing cell's error.
    """
    import papermill as pm  # heavy (Jupyter's client machinery): only the runner needs it

    notebooks = select_notebooks(only, notebook_dir)
    ctx = setup_notebook(profile, data_dir, output_dir, figures_dir, seed)
    executed = ctx.output_dir / "notebooks"
    executed.mkdir(parents=True, exist_ok=True)
    # the kernel named python3 must be this interpreter's (the project's .venv)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(Path(sys.prefix) / "share" / "jupyter"), os.environ.get("JUPYTER_PATH", "")])
    parameters = {"profile": ctx.profile.name, "data_dir": str(ctx.data_dir),
                  "output_dir": str(ctx.output_dir), "figures_dir": str(ctx.figures_dir),
                  "seed": seed}
    timings = []
    for nb in notebooks:
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
        print(f"[{ctx.profile.name}] {nb.name} done in {seconds:.1f} s", flush=True)
        timings.append({"notebook": nb.name, "seconds": round(seconds, 1)})
    table = pd.DataFrame(timings)
    table.to_csv(ctx.output_dir / "notebook_timings.csv", index=False)
    print(f"total {np.sum(table['seconds']) if len(table) else 0:.1f} s", flush=True)
    return table
