"""Wall time per notebook of the last ``make reproduce``, per profile (targets: smoke 15 min, cpu 60 min).

    .venv/bin/python bench/reproduce_times.py [--profile smoke cpu] [--runs-dir runs] [--quick]

Reads nothing but the executed notebooks that ``make reproduce`` wrote (``figures/notebooks/`` for
cpu, ``runs/<profile>/notebooks/`` for the others): their papermill metadata hold each notebook's and
each cell's duration, start time and failure; the folder's ``timings.csv`` adds the set-up before the
first notebook (the cohorts and the vision pretraining, which a cold run makes). Every notebook of
``notebooks/`` is listed, so a notebook that has not run (or failed, or was edited after it ran)
shows; a profile whose every notebook ran is compared with its target, a partial one is not. Run
``make reproduce`` (``PROFILE=smoke make reproduce`` for smoke) first; this script runs nothing.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import common
import pandas as pd

from ichpro.reproduce import SETUP_ROW, TIMINGS_FILE

TARGET_MINUTES = {"smoke": 15, "cpu": 60}
NOTEBOOKS = common.REPO / "notebooks"
EXECUTED = {"cpu": common.REPO / "figures" / "notebooks"}  # the Makefile's OUTPUTS; others under --runs-dir


def setup_row(profile: str, folder: Path) -> tuple[list[object], float]:
    """The set-up before the first notebook (cohorts, pretraining) from the run's ``timings.csv``."""
    path = folder / TIMINGS_FILE
    timings = pd.read_csv(path).set_index("notebook")["seconds"] if path.is_file() else pd.Series(dtype=float)
    if SETUP_ROW not in timings:
        return [profile, SETUP_ROW, "not recorded", "-", "-", "-"], 0.0
    return [profile, SETUP_ROW, "ok", float(timings[SETUP_ROW]), "-", "-"], float(timings[SETUP_ROW])


def notebook_row(profile: str, source: Path, executed: Path) -> tuple[list[object], float, datetime | None]:
    """Row of one notebook, its seconds (0 unless it ran to the end) and when it started."""
    if not executed.is_file():
        return [profile, source.stem, "not run", "-", "-", "-"], 0.0, None
    notebook = json.loads(executed.read_text())
    meta = notebook["metadata"].get("papermill", {})
    cells = [(c.get("execution_count"), c["metadata"].get("papermill", {}).get("duration") or 0.0)
             for c in notebook["cells"] if c["cell_type"] == "code"]
    started = datetime.fromisoformat(meta["start_time"]) if meta.get("start_time") else None
    ended = datetime.fromisoformat(meta["end_time"]) if meta.get("end_time") else None
    if meta.get("exception"):
        status = "failed"
    elif meta.get("duration") is None:
        status = "running or interrupted"
    elif source.is_file() and ended and source.stat().st_mtime > ended.timestamp():
        status = "ok (notebook edited since)"
    else:
        status = "ok"
    seconds = meta.get("duration")
    slowest = max(cells, key=lambda cell: cell[1], default=(None, 0.0))
    row = [profile, source.stem, status, "-" if seconds is None else float(seconds),
           f"{started:%Y-%m-%d %H:%M}" if started else "-", f"In [{slowest[0]}]: {slowest[1]:.1f} s"]
    return row, float(seconds) if status.startswith("ok") else 0.0, started


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", nargs="+", default=["smoke", "cpu"], choices=sorted(TARGET_MINUTES))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help="the runs folder of the profiles other than cpu (relative: to the repository)")
    args = common.parse(parser, argv)
    sources = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    rows, totals, notes = [], [], []
    for profile in args.profile:
        folder = EXECUTED.get(profile, common.REPO / args.runs_dir / profile / "notebooks")
        names = {p.name for p in sources} | {p.name for p in folder.glob("[0-9][0-9]_*.ipynb")}
        results = [notebook_row(profile, NOTEBOOKS / name, folder / name) for name in sorted(names)]
        setup, setup_seconds = setup_row(profile, folder)
        rows += [setup] + [row for row, _, _ in results]
        done = sum(1 for row, _, _ in results if row[2].startswith("ok"))
        total = (setup_seconds + sum(seconds for _, seconds, _ in results)) / 60
        target = TARGET_MINUTES[profile]
        if done == 0:
            result = f"not run: `PROFILE={profile} make reproduce`"
        elif done < len(results):
            result = f"MISS (already over, {done} of {len(results)} ran)" if total > target else (
                f"INCOMPLETE: {done} of {len(results)} notebooks ran")
        else:
            result = common.verdict(total <= target)
        totals.append([profile, f"{done} / {len(results)}", total, f"<= {target}", result])
        starts = [started for _, _, started in results if started]
        if len(starts) > 1:
            notes.append(f"{profile}: notebooks started between {min(starts):%Y-%m-%d %H:%M} and "
                         f"{max(starts):%Y-%m-%d %H:%M} UTC (several invocations if far apart)")
    common.print_table("Wall time per notebook of the last `make reproduce` (papermill metadata)",
                       ["profile", "notebook", "status", "seconds", "started (UTC)", "slowest cell"], rows)
    common.print_table("make reproduce: total against target",
                       ["profile", "notebooks ok", "total (min)", "target (min)", "result"], totals, notes)


if __name__ == "__main__":
    main()
