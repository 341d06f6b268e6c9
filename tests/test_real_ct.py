"""The CT checks and the brain mask on real anatomy: one non-contrast head CT slice.

The slice is ``693_UNCR.dcm`` of the ``pydicom-data`` package (a test dependency, found offline by
``pydicom.data.get_testdata_file``; never committed here): 512 x 512 pixels of 0.48 mm, 5 mm thick,
stored with rescale intercept -1024, from the CQ500 collection (Chilamkurthy et al., Lancet 2018;
qure.ai, CC BY-NC-SA 4.0). The checks and the mask work on any array, so the slice is used as it is,
with a depth of one where a function wants a volume (``brain_mask`` reads axial slices along the
last axis); nothing here needs more depth.
"""

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from ichpro.data import BrainMaskd, SkullStripd, check_hounsfield
from ichpro.errors import ImageError

SOURCE = Path("693_UNCR.dcm")
BONE = 300  # HU: cortical bone is above 700; 300 keeps partial-volume voxels of the skull's edge too


@pytest.fixture(scope="module")
def dataset():
    path = get_testdata_file(SOURCE.name)
    assert path, "pydicom-data is a test dependency (make setup installs it): pip install pydicom-data"
    return pydicom.dcmread(path)


@pytest.fixture(scope="module")
def hu(dataset):
    return apply_modality_lut(dataset.pixel_array, dataset).astype(np.float32)


def test_the_fixture_is_the_slice_described(dataset):
    assert dataset.Modality == "CT" and (dataset.Rows, dataset.Columns) == (512, 512)
    assert float(dataset.SliceThickness) == 5.0 and float(dataset.RescaleIntercept) == -1024


def test_a_real_head_ct_in_hounsfield_units_is_accepted(hu):
    check_hounsfield(hu, SOURCE)  # air near -1000, brain 0-80 HU, bone: no error, no warning


def test_its_stored_values_without_the_intercept_are_refused(dataset):
    with pytest.raises(ImageError, match="has no air"):
        check_hounsfield(dataset.pixel_array.astype(np.float32), SOURCE)  # HU + 1024


def test_a_label_map_drawn_on_it_is_refused(hu):
    labels = np.digitize(hu, [0, 80, BONE]).astype(np.float32)  # air, brain, blood/soft tissue, bone
    with pytest.raises(ImageError, match="holds only 4 distinct values .* looks like a label map"):
        check_hounsfield(labels, SOURCE)


def test_skull_stripping_keeps_the_brain_and_drops_the_bone(hu):
    data = {"ct": torch.from_numpy(hu[None, ..., None])}  # (channel, x, y, one slice)
    stripped = SkullStripd(fill=-20.0)(BrainMaskd()(data))
    brain, kept = stripped["brain"][0, ..., 0].numpy(), stripped["ct"][0, ..., 0].numpy()
    bone = hu > BONE
    inside_skull = ndimage.binary_fill_holes(bone) & ~bone  # the closed skull ring of an axial slice
    brain_range = inside_skull & (hu >= 0) & (hu <= 80)
    # no bone survives (measured: none of the mask's voxels is above 300 HU)
    assert (kept > BONE).sum() == 0 and (brain & bone).sum() == 0
    # the mask lies inside the skull (measured: all of it) and keeps its brain-range voxels
    # (measured: 99.96 %; 97 % leaves room for the opening's erosion at the inner table)
    assert (brain & inside_skull).sum() / brain.sum() > 0.99
    assert (brain & brain_range).sum() / brain_range.sum() > 0.97
    assert np.array_equal(kept[brain], hu[brain]) and (kept[~brain] == -20.0).all()
