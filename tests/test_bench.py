"""Every benchmark script runs at its smallest sizes (``--quick``), so that none can break silently.

They share one bench folder (``ICHPRO_BENCH_DIR``) per test module, as ``bench/run_all.py --quick``
shares ``runs/bench``: its small cohorts and random encoders are made once. What they print is not
checked (timings are not results), only that each ends cleanly and prints its tables.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
#: the scripts that need options of their own (the quality scripts read runs another one makes)
ORDERED = ["design_cohort", "fusion_headroom", "machine_spread", "reproduce_times", "run_all"]
SPEED = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in {"common", *ORDERED})


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def run(script: str, bench_dir: Path, *options: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", *options],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ICHPRO_BENCH_DIR": str(bench_dir)})
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize("script", SPEED)
def test_a_speed_benchmark_runs_quick(script, bench_dir):
    assert "### " in run(script, bench_dir)


def test_the_quality_benchmarks_run_quick(bench_dir):
    cache = os.environ["ICHPRO_CACHE"]  # the session's: its smoke pretraining is made once
    design = run("design_cohort", bench_dir, "--out", str(bench_dir / "design"), "--cache", cache)
    assert "Design cohort: smoke spec, seed 2" in design
    smoke = bench_dir / "design" / "smoke"
    headroom = run("fusion_headroom", bench_dir, "--profile", "smoke", "--cohort",
                   str(smoke / "cohort-seed2"), "--runs", str(smoke))
    assert "Late fusion of the report's frozen states" in headroom
    assert "Tables 1-4 on both machines" in run("machine_spread", bench_dir)  # the committed run, twice


def test_the_suite_driver_and_the_reproduce_times_run(bench_dir):
    out = run("run_all", bench_dir, "--only", "reproduce_times", "--out", str(bench_dir / "results.md"))
    assert "make reproduce: total against target" in out and (bench_dir / "results.md").is_file()
