"""Cold latency of ``ichpro predict`` for one patient, per profile (target: <= 10 s for paper on CPU).

    .venv/bin/python bench/predict_latency.py [--profile smoke cpu paper] [--repeats 2] [--patients 40]
                                              [--paper-folds 1] [--run RUN] [--threads N] [--quick]

Latency is the wall time of a fresh subprocess running the CLI: ``--repeats`` runs of
``.venv/bin/ichpro predict --checkpoint RUN --ct CT --report TEXT``, then one more running the same
CLI (``ichpro.cli.main``) with timers around its stages, to show where the time goes: Python
start-up and exit, imports, text encoder load, model build (incl. a frozen vision encoder's weights
file), fold weight load, CT preprocessing, forward passes. The first run and the median of all runs
are reported; paper runs only the timed one unless ``--paper-repeats`` says otherwise.

Run folders (under runs/bench/predict, made once): smoke and cpu are trained for one epoch on a small
cohort with the profile's folds (``cross_validate``); paper gets a run folder with random weights: a
random BERT-base in a local folder as its text encoder and ``--paper-folds`` random fold checkpoints
(each holds the whole model, ~0.6 GB; the paper's cross-validation has 5, which is also estimated).
The paper CT is a synthetic 512 x 512 scan. ``--run`` measures an existing run folder instead.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MARKER = "BENCH_STAGES "
STAGES = ["python start-up + exit", "import", "text encoder load", "model build", "weight load",
          "preprocessing", "frozen encoders", "forward", "other"]
TARGET = 10.0


def child(argv: list[str]) -> int:
    """Run the ichpro CLI with timers around the stages of a prediction; print them as JSON."""
    start = time.perf_counter()
    import ichpro.data as data
    import ichpro.models.ichpro as model_module
    import ichpro.predict as predict
    from ichpro import cli
    from ichpro.batches import BatchSource

    spent = {"import": time.perf_counter() - start}

    def timing(name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - begin
        return wrapper

    predict.load_text_backbone = timing("text encoder load", predict.load_text_backbone)
    predict.fresh_model = timing("model build", predict.fresh_model)
    predict.load_weights = timing("weight load", predict.load_weights)
    transforms = data.preprocess_transforms
    data.preprocess_transforms = lambda cfg, **options: timing("preprocessing", transforms(cfg, **options))
    BatchSource._encode = timing("frozen encoders", BatchSource._encode)
    model_module.ICHPro.forward = timing("forward", model_module.ICHPro.forward)
    code = cli.main(argv)
    spent["total"] = time.perf_counter() - start
    print(MARKER + json.dumps(spent), flush=True)
    return code


def trained_run(name: str, patients: int, folds: int | None) -> Path:
    """A smoke or cpu run trained for one epoch (made once)."""
    import shutil

    import common

    from ichpro.train import cross_validate

    profile = common.bench_profile(name)
    folds = folds or profile.train.n_folds
    profile = common.derive(profile, train={"epochs": 1, "n_folds": folds})
    run = common.BENCH_DIR / "predict" / f"{name}-n{patients}-f{folds}"
    if not (run / "oof_predictions.csv").is_file():
        shutil.rmtree(run, ignore_errors=True)
        cross_validate(profile, common.tiny_cohort(profile.cohort, patients), run, seed=0, quiet=True,
                       cache_dir=common.CACHE / "data")
    return run


def paper_run(folds: int) -> Path:
    """A paper-profile run folder with random weights (made once): what ``load_run`` needs."""
    from dataclasses import asdict

    import common

    from ichpro.checkpoints import save_weights
    from ichpro.files import write_json
    from ichpro.train import fresh_model

    profile = common.bench_profile("paper")
    run = common.BENCH_DIR / "predict" / f"paper-f{folds}"
    if not (run / "run.json").is_file():
        text = common.text_backbone(profile)
        for k in range(folds):
            (run / f"fold{k}").mkdir(parents=True, exist_ok=True)
            save_weights(run / f"fold{k}" / "best.safetensors", fresh_model(profile, text, seed=k))
        write_json(run / "run.json", {"config": asdict(profile), "seed": 0})
    return run


def patient(config: dict) -> tuple[str, str]:
    """CT path and report text of a synthetic patient of the run's cohort spec (512 x 512 for paper)."""
    import common

    paper_sized = config["preprocess"]["spatial_size"][1] >= 512
    manifest = common.tiny_cohort(config["cohort"], 1, **({"matrix": 512} if paper_sized else {}))
    return manifest.at[0, "ct_path"], manifest.at[0, "report"]


def run_cli(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(args[:3])} ... failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def measure(run: Path, args, env: dict[str, str]) -> tuple[list, list, list[str]]:
    """Latency row, stage row and notes of one run folder; the timed run counts as one more sample."""
    import statistics

    import common

    config = json.loads((run / "run.json").read_text())["config"]
    paper = config["name"] == "paper"
    ct, report = patient(config)
    cli_args = ["predict", "--checkpoint", str(run), "--ct", ct, "--report", report]
    ichpro = str(Path(sys.executable).with_name("ichpro"))
    repeats = args.paper_repeats if paper else args.repeats
    walls = [run_cli([ichpro, *cli_args], env)[0] for _ in range(repeats)]
    wall, out = run_cli([sys.executable, __file__, "--child", *cli_args], env)
    walls.append(wall)
    stages = json.loads(next(line for line in out.splitlines() if line.startswith(MARKER))[len(MARKER):])
    stages["other"] = stages["total"] - sum(v for k, v in stages.items() if k != "total")
    stages["python start-up + exit"] = wall - stages["total"]
    folds = len(list(run.glob("fold*/best.safetensors")))
    latency = [config["name"], folds, walls[0], statistics.median(walls), len(walls),
               f"<= {TARGET:g}" if paper else "-", common.verdict(walls[0] <= TARGET) if paper else "-"]
    notes = []
    if paper and folds < 5:
        per_fold = sum(stages[stage] for stage in ("model build", "weight load", "forward")) / folds
        estimate = walls[0] + (5 - folds) * per_fold
        notes.append(f"paper with the paper's 5 fold models, estimated: {estimate:.1f} s (measured + "
                     f"{5 - folds} x the per-fold model build, weight load and forward)")
    return latency, [config["name"], *(stages.get(stage, 0.0) for stage in STAGES), wall], notes


def main(argv: list[str] | None = None) -> None:
    import common

    parser = common.make_parser(__doc__)
    parser.add_argument("--profile", nargs="+", default=["smoke", "cpu", "paper"],
                        choices=["smoke", "cpu", "paper"])
    parser.add_argument("--repeats", type=int, default=2, help="plain CLI runs besides the timed one")
    parser.add_argument("--paper-repeats", type=int, default=0, help="the same for paper (minutes each)")
    parser.add_argument("--patients", type=int, default=40, help="cohort of the tiny smoke/cpu runs")
    parser.add_argument("--folds", type=int, help="folds of the tiny smoke/cpu runs (default: the profile's)")
    parser.add_argument("--paper-folds", type=int, default=1)
    parser.add_argument("--run", type=Path, help="measure this run folder instead")
    args = common.parse(parser, argv, quick={"profile": ["smoke"], "repeats": 0, "patients": 16,
                                            "folds": 2})
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    runs = [args.run] if args.run else [
        paper_run(args.paper_folds) if name == "paper" else trained_run(name, args.patients, args.folds)
        for name in args.profile]
    latency, stages, notes = [], [], []
    for run in runs:
        row, breakdown, run_notes = measure(run, args, env)
        latency.append(row)
        stages.append(breakdown)
        notes += run_notes
    columns = ["profile", "fold models", "first run (s)", "median (s)", "runs", "target (s)", "result"]
    common.print_table("Cold latency of `ichpro predict`, one patient (fresh subprocess)", columns,
                       latency, notes)
    common.print_table("Where the time goes (one more fresh subprocess with stage timers), seconds",
                       ["profile", *STAGES, "total"], stages)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2:]))
    main()
