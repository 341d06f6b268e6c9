"""Shared fixtures: one small synthetic cohort per test session."""

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: one thread per worker, subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")
# a fresh cache per session: pretrained encoders and cached features are made by the tests themselves
os.environ["ICHPRO_CACHE"] = tempfile.mkdtemp(prefix="ichpro-test-cache-")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """The notebook runs start first, in two groups that ``pytest -n 2 --dist loadgroup`` gives one
    worker each: notebook 10 (the longest) alone, the others in order, sharing one output folder as
    ``ichpro reproduce`` does; the other tests fill both workers around them."""
    groups = {}
    for item in items:
        if item.originalname == "test_notebook_runs_on_smoke":
            groups[item] = "notebook10" if "[10_" in item.name else "notebooks"
            item.add_marker(pytest.mark.xdist_group(groups[item]))
    items.sort(key=lambda item: ["notebook10", "notebooks", None].index(groups.get(item)))  # stable


@pytest.fixture(scope="session")
def smoke_cohort(tmp_path_factory):
    """The smoke profile's cohort, generated once into a temporary folder."""
    from ichpro.cohort import generate_cohort, load_spec

    out = tmp_path_factory.mktemp("smoke_cohort")
    generate_cohort(load_spec("smoke"), out, progress=False)
    return out


@pytest.fixture(scope="session")
def manifest(smoke_cohort):
    """The smoke cohort's validated manifest (shared: tests must not modify it in place)."""
    from ichpro.manifest import load_manifest

    return load_manifest(smoke_cohort / "manifest.csv")
