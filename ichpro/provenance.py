"""What a result was computed with: Python, platform, processor, git commit and package versions."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import pandas as pd

from ichpro.config import REPO_ROOT

PROVENANCE_PACKAGES = ("ichpro", "torch", "monai", "transformers", "numpy", "pandas",
                       "scikit-learn", "nibabel", "papermill")


def versions() -> pd.DataFrame:
    """Python, platform, git commit and the versions of the packages results depend on."""
    rows = {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpu": f"{cpu_model()}, {os.cpu_count()} cores", "git commit": git_commit()}
    for name in PROVENANCE_PACKAGES:
        try:
            rows[name] = version(name)
        except PackageNotFoundError:
            rows[name] = "not installed"
    return pd.DataFrame({"version": rows})


def cpu_model() -> str:
    """The processor's model name (CPU kernels round differently across processors)."""
    try:
        for line in open("/proc/cpuinfo").read().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: what a run's results are computed from: a change here makes the checkout "modified" (the figures
#: and executed notebooks a run writes are its outputs, not its inputs)
RUN_INPUTS = ("ichpro", "notebooks", "data_synthetic", "pyproject.toml")


def git_commit() -> str:
    """The short commit of the checkout the package runs from, with " (modified)" when the run's
    inputs (:data:`RUN_INPUTS`) differ from it ("unknown" outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *RUN_INPUTS],
                                 cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() + (" (modified)" if changed.stdout.strip() else "")
