"""Shared fixtures: one small synthetic cohort per test session."""

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# a fresh cache per session: pretrained encoders and cached features are made by the tests themselves
os.environ["ICHPRO_CACHE"] = tempfile.mkdtemp(prefix="ichpro-test-cache-")


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
