"""The whole benchmark suite, what ``make bench`` runs: every benchmark in order, then bench/results.md.

    .venv/bin/python bench/run_all.py [--only fit_time scaling ...] [--threads N] [--quick] [--out FILE]
                                      [--no-readme]

Each benchmark runs in a fresh subprocess with its default settings (sized so that the suite takes
about 15-20 minutes on an idle 2-core CPU; the first run also generates small cohorts and the paper
run folder, once, under runs/bench/), its tables are printed as they come, and bench/results.md gets
the machine (CPU, cores, torch, threads, load) and every table. The "Latest results" section of
bench/README.md is then refreshed from it. ``--quick`` runs every benchmark with tiny sizes and writes
runs/bench/results-quick.md instead (README untouched). Timings are only meaningful on an otherwise
idle machine: the load average is recorded before and after.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
SUITE = ["batched_fit", "fit_time", "step_ratio", "fusion_cost", "pretrain_cost", "row_workers",
         "data_wait", "conv_throughput", "predict_latency", "reproduce_times", "scaling"]
README = HERE / "README.md"
START, END = "<!-- latest-results:start -->", "<!-- latest-results:end -->"


def run(name: str, options: list[str]) -> tuple[str, float, int]:
    """Run one benchmark, echoing its output; returns the output, seconds and exit code."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), *options], stdout=subprocess.PIPE,
                               text=True, bufsize=1)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    code = process.wait()
    return "".join(lines), time.perf_counter() - start, code


def machine_table(info: dict[str, str]) -> str:
    return "\n".join(["| | |", "| --- | --- |", *(f"| {key} | {value} |" for key, value in info.items())])


def refresh_readme(results: str) -> None:
    """Put the results (headings one level down) between the README's markers."""
    body = re.sub(r"^(#+) ", r"#\1 ", results.split("\n", 1)[1].strip(), flags=re.MULTILINE)
    text = README.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        README.write_text(f"{head}{START}\n{body}\n{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = common.make_parser(__doc__)
    parser.add_argument("--only", nargs="+", choices=SUITE, help="run only these benchmarks")
    parser.add_argument("--out", type=Path, help="results file (default bench/results.md)")
    parser.add_argument("--no-readme", action="store_true", help="leave bench/README.md alone")
    args = parser.parse_args(argv)
    if args.threads:
        common.torch.set_num_threads(args.threads)  # so that the machine table shows what the scripts use
    out = args.out or (common.BENCH_DIR / "results-quick.md" if args.quick else HERE / "results.md")
    options = (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])
    before = machine_table(common.machine_info())
    print(f"# Benchmark suite\n\n{before}\n", flush=True)
    load = os.getloadavg()[0]
    warning = (f"**Warning:** load average {load:.2f} at the start: other processes were using the "
               "CPU, so every time below is inflated (ratios less so).\n\n" if load > 0.5 else "")
    start, sections, failed = time.perf_counter(), [], []
    for name in args.only or SUITE:
        output, seconds, code = run(name, options)
        status = f"_{name} took {seconds:.0f} s_" + (f" **FAILED (exit code {code})**" if code else "")
        print(status + "\n", flush=True)
        sections.append(f"{output.strip()}\n\n{status}\n")
        if code:
            failed.append(name)
    minutes = (time.perf_counter() - start) / 60
    command = " ".join(["bench/run_all.py", *(sys.argv[1:] if argv is None else argv)])
    results = (f"# Benchmark results{' (--quick: tiny sizes, not results)' if args.quick else ''}\n\n"
               f"Written by `{command}` on "
               f"{datetime.now():%Y-%m-%d %H:%M}; the suite took {minutes:.1f} min.\n\n{warning}"
               f"## Machine\n\n{before}\n\nLoad average at the end: "
               "{:.2f} {:.2f} {:.2f}.\n\n".format(*os.getloadavg()) + "\n".join(sections))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(results)
    if not args.quick and not args.no_readme and not args.only:
        refresh_readme(results)
    print(f"wrote {out} ({minutes:.1f} min)" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
