"""Shared helpers of the benchmark suite: where it caches, timing, tables, tiny cohorts, machine info.

Importing this module (before any ``ichpro`` module) points ``ICHPRO_CACHE`` at ``runs/bench/cache``
(git-ignored; ``ICHPRO_BENCH_DIR`` moves the whole ``runs/bench`` folder), so that benchmarks never
read or fill the user's cache, and keeps every run offline.

The benchmarks measure compute, not accuracy, so they skip the vision pretraining of the smoke and
cpu profiles: :func:`bench_profile` points ``vision_weights`` at a randomly initialised encoder of
the same architecture (same shapes, same cost), and gives the paper profile a randomly initialised
BERT-base saved locally in place of Bio_ClinicalBERT (not available offline).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(os.environ.get("ICHPRO_BENCH_DIR") or REPO / "runs" / "bench")
CACHE = BENCH_DIR / "cache"
os.environ["ICHPRO_CACHE"] = str(CACHE)
for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("MPLBACKEND", "Agg"),
                      ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ichpro.config import Profile, get_profile  # noqa: E402

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- timing


def now() -> float:
    """A monotonic clock in seconds."""
    return time.perf_counter()


def timed(fn: Callable[..., object], *args: object) -> float:
    """Seconds one call of ``fn(*args)`` takes."""
    start = now()
    fn(*args)
    return now() - start


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, calling them in turn (A B A B ...) so that a change of load on
    the machine during the measurement hits every function alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def loglog_slope(sizes: list[float], values: list[float]) -> float:
    """Growth exponent k of ``value ~ size**k`` (least-squares slope in log-log)."""
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


# --------------------------------------------------------------------------- output


def fmt(value: object) -> str:
    """A table cell: floats with three significant digits (more for large numbers)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


def print_table(title: str, columns: list[str], rows: list[list[object]], notes: list[str] = ()) -> None:
    """Print a Markdown table with a ``###`` title and optional notes below it."""
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    if notes:
        lines += [""] + [f"* {note}" for note in notes]
    print("\n".join(lines) + "\n", flush=True)


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark has: ``--quick`` and ``--threads``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script quickly")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None, quick: dict | None = None
          ) -> argparse.Namespace:
    """Parse the options (under ``--quick``, ``quick`` replaces those left at their defaults), set
    torch's threads, and print a heading naming the script and the settings it runs with."""
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update({key: value for key, value in (quick or {}).items()
                           if getattr(args, key) == parser.get_default(key)})
    if args.threads:
        torch.set_num_threads(args.threads)
    options = []
    for key, value in vars(args).items():
        if value is not None and value is not False:
            value = " ".join(map(str, value)) if isinstance(value, list) else value
            options.append(f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}"))
    script = Path(sys.argv[0]).name
    print(f"## {script} {' '.join(options)}\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          "load average {:.2f}\n".format(os.getloadavg()[0]), flush=True)
    return args


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, str]:
    """CPU model and vector extensions, cores, memory, Python and torch, torch's threads, load average."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    info = {"CPU": cpu, "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable",
            "ISA": ", ".join(isa) or "unknown"}
    with contextlib.suppress(OSError, ValueError):
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        info["memory"] = f"{kb / 2**20:.1f} GiB"
    info["python"] = platform.python_version()
    info["torch"] = f"{torch.__version__} (oneDNN {torch.backends.mkldnn.is_available()})"
    info["torch threads"] = f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
    info["load average"] = "{:.2f} {:.2f} {:.2f} (1, 5, 15 min)".format(*os.getloadavg())
    return info


# --------------------------------------------------------------------------- data and profiles


POOL = 160  # patients per generated cohort; smaller cohorts are its first patients


def tiny_cohort(spec: str, n_patients: int, seed: int = 7, **image: object) -> pd.DataFrame:
    """The manifest of ``n_patients`` patients of a synthetic cohort spec (``image`` overrides its
    ImageSpec, e.g. ``matrix=512``).

    A pool of ``max(n_patients, POOL)`` patients is generated once into runs/bench/cohorts and
    smaller cohorts are its first patients. The partial oracles, which no benchmark uses, are fitted
    on a small reference cohort, with sklearn's OpenMP on one thread (it busy-waits on busy cores).
    """
    from threadpoolctl import threadpool_limits

    from ichpro.cohort import generate_cohort, load_spec
    from ichpro.manifest import load_manifest

    size = n_patients if image else max(n_patients, POOL)
    suffix = "".join(f"-{k}{v}" for k, v in sorted(image.items()))
    folder = BENCH_DIR / "cohorts" / f"{spec}{suffix}-seed{seed}-n{size}"
    if not (folder / "cohort.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        base = load_spec(spec)
        with threadpool_limits(limits=1, user_api="openmp"):
            generate_cohort(replace(base, reference_size=2000, image=replace(base.image, **image)), folder,
                            seed=seed, n_patients=size, progress=False)
    return load_manifest(folder / "manifest.csv").head(n_patients).reset_index(drop=True)


def derive(profile: Profile, **parts: dict) -> Profile:
    """The profile with fields of its parts replaced, e.g. ``derive(p, train={"epochs": 2})``."""
    return replace(profile, **{name: replace(getattr(profile, name), **changes)
                               for name, changes in parts.items()})


def end_to_end(profile: Profile) -> Profile:
    """The same profile with both encoders trainable."""
    return derive(profile, model={"freeze_vision": False, "freeze_text": False})


def random_vision_weights(profile: Profile) -> Path:
    """A randomly initialised vision encoder of the profile's architecture, saved once in the cache."""
    from ichpro.checkpoints import save_weights
    from ichpro.models.encoders import VisionEncoder

    cfg = profile.model
    name = "-".join(map(str, [cfg.vision_depth, *cfg.vision_widths, int(cfg.vision_no_max_pool)]))
    path = CACHE / "random-vision" / f"resnet{name}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            save_weights(path, VisionEncoder(cfg.vision_depth, cfg.vision_widths, cfg.vision_no_max_pool))
    return path


def paper_text_folder() -> Path:
    """A randomly initialised BERT-base (Bio_ClinicalBERT's size) with the offline MiniLM tokenizer,
    saved once as a local folder usable as ``ModelConfig.text_encoder``."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    from ichpro.text import _minilm_folder

    folder = CACHE / "random-bert-base"
    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(_minilm_folder(), local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = BertModel(BertConfig(vocab_size=len(tokenizer)))  # bert-base: 12 x 768
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE))
        hf_logging.disable_progress_bar()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def bench_profile(name: str) -> Profile:
    """The named profile, made runnable offline without pretraining (see the module docstring)."""
    profile = get_profile(name)
    if name == "paper":
        return derive(profile, model={"text_encoder": str(paper_text_folder())})
    return derive(profile, model={"vision_weights": str(random_vision_weights(profile))})


def text_backbone(profile: Profile, manifest: pd.DataFrame | None = None):
    """The profile's text encoder (the tiny one gets its vocabulary from the cohort's reports)."""
    from transformers.utils import logging as hf_logging

    from ichpro.text import load_text_backbone

    hf_logging.disable_progress_bar()
    reports = None if manifest is None else manifest["report"].tolist()
    return load_text_backbone(profile.model.text_encoder, reports=reports, seed=0)


def cached_text_stand_in(profile: Profile):
    """A randomly initialised one-layer BERT of the profile's text width: a frozen-feature model reads
    the encoder's cached states, so one layer stands for the encoder (speed does not depend on weights)."""
    from transformers import BertConfig, BertModel

    from ichpro.text import TINY_SIZES

    hidden = 384 if profile.model.text_encoder == "minilm" else TINY_SIZES["hidden_size"]  # MiniLM-L6: 384
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=1,
                                num_attention_heads=max(1, hidden // 64), intermediate_size=hidden))


def frozen_batch(grid: torch.Size, hidden: int, batch: int, tokens: int, report_words: int, seed: int = 0
                 ) -> dict[str, torch.Tensor]:
    """A frozen-feature training batch: random cached-output features, labels, masked-report targets
    among ``report_words`` tokens (ids 1000...), age and GCS, and the draws of a vision dropout."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((batch, tokens), -100)
    masked = max(1, tokens // 7)
    labels[:, 1:1 + masked] = 1000 + torch.randint(0, report_words, (batch, masked), generator=g)
    return {"attention_mask": torch.ones(batch, tokens, dtype=torch.long),
            "vision_features": torch.randn(batch, *grid, generator=g),
            "text_states": torch.randn(batch, tokens, hidden, generator=g),
            "masked_text_states": torch.randn(batch, tokens, hidden, generator=g), "mlm_labels": labels,
            "labels": torch.arange(batch) % 2, "age": 40 + 50 * torch.rand(batch, generator=g),
            "gcs": torch.randint(3, 16, (batch,), generator=g).float(),
            "vision_dropout_draw": torch.rand(batch, generator=g)}  # read when the model has the dropout


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A fresh temporary folder under runs/bench/tmp, removed afterwards."""
    (BENCH_DIR / "tmp").mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=BENCH_DIR / "tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- training


def first_fold(profile: Profile, labels: np.ndarray):
    """Fold 0 of the profile's cross-validation (seed 0) of patients with these labels."""
    from ichpro.train import split_folds

    return split_folds(labels, profile.train.n_folds, profile.train.val_fraction, seed=0)[0]


def fold_fit(profile: Profile, source, text, folder: Path):
    """A ``BatchedFit`` of fold 0 of ``source``'s patients alone (its ``members[0]``), built (and
    ``source`` prepared for its model) as cross-validation builds a fit."""
    from ichpro.ensemble import trainable_state
    from ichpro.runtime import SINGLE_PROCESS
    from ichpro.train import BatchedFit, Member, encoders_profile, fresh_model

    fold = first_fold(profile, source.labels.numpy())
    model = fresh_model(profile, text, 0)
    source.prepare(model, lambda: fresh_model(encoders_profile(profile), text, 0), CPU, 0, quiet=True)
    model.fit_training_patients(source.training_patients(fold.train))
    member = Member(0, fold, folder / "fold0", source)
    return BatchedFit(profile, [member], model, [trainable_state(model)], CPU, SINGLE_PROCESS, quiet=True)


def train_step(fit, batch: dict) -> None:
    """One training step of a one-member fit exactly as the engine takes it, in training mode."""
    fit.stack.train()
    fit.train_step({0: batch}, update=[0])


def adam_step(loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """A training step as a function: ``loss()`` (the forward), backward, the update, cleared gradients."""
    def step() -> None:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def fill_feature_cache(profile: Profile, manifest: pd.DataFrame, text, cache_dir: Path):
    """Time ``BatchSource.prepare`` three times on an empty ``cache_dir``: ``cold`` (CT
    preprocessing + encoding every patient), ``encode`` (features removed, CT cache warm) and
    ``warm`` (hashing the encoder weights and CT files, reading the features). Returns the last
    (precomputed) source and the seconds."""
    from ichpro.batches import BatchSource
    from ichpro.train import fresh_model

    seconds = {}
    for step in ("cold", "encode", "warm"):
        if step == "encode":
            shutil.rmtree(Path(cache_dir) / "features")
        source = BatchSource(manifest, profile, text, cache_dir)
        model = fresh_model(profile, text, seed=0)  # ICHPro: its own frozen encoders encode
        seconds[step] = timed(functools.partial(source.prepare, model, lambda m=model: m, CPU, 0, quiet=True))
    return source, seconds


def end_to_end_step(profile: Profile, batch_size: int, folder: Path):
    """A fold-0 fit (:func:`fold_fit`) of the profile with both encoders trainable, and a batch of
    ``batch_size`` preprocessed CTs and reports of a small cohort of the profile's spec."""
    from ichpro.batches import BatchSource

    profile = end_to_end(profile)
    manifest = tiny_cohort(profile.cohort, max(2 * batch_size, 24))
    text = text_backbone(profile, manifest)
    source = BatchSource(manifest, profile, text, cache_dir=None)
    fit = fold_fit(profile, source, text, folder)  # its MLM head decodes its training reports' words
    fold = fit.members[0].fold
    return fit, source.batch(fold.train[:batch_size].tolist(), CPU, epoch=1, generator=torch.Generator())

