"""Notebook 02's views: the window mapping, the blood slice, the step-by-step run and its figures."""

import re

import numpy as np
import pytest

from ichpro.config import BRAIN_WINDOW, PAPER_WINDOW, PreprocessConfig
from ichpro.data import preprocess_steps, windowed
from ichpro.errors import IchproError
from ichpro.phantom import ImageSpec, Lesion, render_phantom, save_phantom
from ichpro.views.preprocessing import (
    SHOWN_STEPS,
    Snapshot,
    blood_slice,
    plot_steps,
    plot_windows,
    step_by_step,
)

CFG = PreprocessConfig(spatial_size=(8, 32, 32))


def write_phantom(folder, seed: int = 0):
    """A lobar-haematoma phantom CT and its label mask as NIfTI files; returns (ct, mask, phantom)."""
    lesion = Lesion("lobar", "frontal", "right", volume_ml=30.0, ivh=False, midline_shift_mm=0.0)
    phantom = render_phantom(lesion, ImageSpec(matrix=48, slices=(16, 16)), np.random.default_rng(seed),
                             orientation="RAS")
    ct, mask = folder / "ct.nii.gz", folder / "mask.nii.gz"
    save_phantom(phantom, ct, mask)
    return ct, mask, phantom


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("phantom"))


def test_windowed_maps_the_window_to_0_1_without_clipping():
    assert windowed(PAPER_WINDOW, PAPER_WINDOW).tolist() == [0.0, 1.0]
    assert windowed(207.5, PAPER_WINDOW) == pytest.approx(0.5)
    assert windowed((-80.0, 160.0), BRAIN_WINDOW).tolist() == [-1.0, 2.0]


def test_blood_slice_counts_voxels_strictly_inside_the_band_along_the_axis():
    volume = np.zeros((4, 3, 5))
    volume[2, :2, 0] = 70.0  # two voxels in slice 2 along axis 0, both in slice 0 along axis 2
    volume[1, 0, 4] = 50.0  # on the band's edge: not inside
    volume[3, :, 3] = 70.0  # three voxels in slice 3 along axis 0, in slice 3 along axis 2
    assert blood_slice(volume, (50.0, 90.0), axis=0) == 3
    assert blood_slice(volume, (50.0, 90.0), axis=2) == 3
    volume[0, :, 0] = 60.0
    assert blood_slice(volume, (50.0, 90.0), axis=2) == 0


def test_snapshot_units_convert_a_hu_range_after_the_window_step_only():
    image = np.zeros((2, 2, 2))
    assert Snapshot(image, False, False).units(BRAIN_WINDOW, PAPER_WINDOW) == BRAIN_WINDOW
    low, high = Snapshot(image, True, True).units(BRAIN_WINDOW, PAPER_WINDOW)
    assert (low, high) == pytest.approx((-15 / 385, 65 / 385))


def test_step_by_step_runs_every_step_and_snapshots_the_shown_ones(phantom_files):
    ct, _, phantom = phantom_files
    summary, snapshots = step_by_step(ct, CFG)
    assert summary["step"].tolist() == list(preprocess_steps(CFG))
    assert summary["shape"].iloc[-1] == (1, *CFG.spatial_size)
    assert summary.loc[summary["step"] == "orient_ras", "shape"].item() == (1, *phantom.hu.shape)
    assert (summary["ms"] >= 0).all()
    window = summary.loc[summary["step"] == "window"]
    assert window["min"].item() >= 0 and window["max"].item() <= 1
    assert list(snapshots) == list(SHOWN_STEPS)
    flags = {name: (snap.windowed, snap.model_axes) for name, snap in snapshots.items()}
    assert flags == {"orient_ras": (False, False), "skull_strip": (False, False),
                     "crop_to_brain": (False, False), "window": (True, False), "resize": (True, True)}
    assert snapshots["resize"].image.shape == CFG.spatial_size


def test_step_by_step_names_an_unknown_step(phantom_files):
    with pytest.raises(IchproError, match="no preprocessing step 'crop_to_brain'.*its steps are load"):
        step_by_step(phantom_files[0], PreprocessConfig(crop_to_brain=False), shown=("crop_to_brain",))


def test_plot_steps_titles_each_step_on_the_slice_through_the_haematoma(phantom_files):
    ct, _, phantom = phantom_files
    _, snapshots = step_by_step(ct, CFG)
    fig = plot_steps(snapshots, CFG.hu_window, "a title")
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split(" ")[0].rstrip(":") for t in titles] == list(SHOWN_STEPS)
    assert fig.get_suptitle() == "a title"
    haematoma_slices = np.flatnonzero((phantom.mask == 1).any(axis=(0, 1)))
    shown = fig.axes[0].images[0].get_array()
    assert fig.axes[0].images[0].get_clim() == BRAIN_WINDOW
    z = [z for z in range(phantom.hu.shape[2]) if np.array_equal(shown, phantom.hu[::-1, :, z].T)]
    assert z and z[0] in haematoma_slices


def test_plot_windows_reports_the_blood_intensity_of_each_window(phantom_files):
    ct, mask, _ = phantom_files
    fig = plot_windows(ct, mask, CFG, {"paper": PAPER_WINDOW, "brain": BRAIN_WINDOW})
    for ax, window in zip(fig.axes, (PAPER_WINDOW, BRAIN_WINDOW)):
        numbers = re.search(r"blood ([\d.]+), rest of the brain ([\d.]+)", ax.get_title()).groups()
        blood, rest = map(float, numbers)
        low, high = windowed((40.0, 90.0), window)  # the phantom's blood (50-90 HU), less partial volume
        assert low <= blood <= high
        assert 0 <= rest < blood
        assert ax.images[0].get_clim() == (0, 1)
