"""Tests of the synthetic head CT phantom: anatomy, haematoma, geometry, orientation and I/O."""

from __future__ import annotations

import gzip
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from ichpro.errors import IchproError
from ichpro.phantom import ImageSpec, Lesion, Phantom, render_phantom, save_phantom

SPEC = ImageSpec()
QUIET = ImageSpec(noise_hu=0.0)  # noise-free, to find CSF by its HU
DEEP = Lesion("deep", "basal ganglia", "right", 20.0, ivh=False, midline_shift_mm=0.0)


def render(lesion: Lesion, image: ImageSpec = SPEC, seed: int = 0, **kwargs) -> Phantom:
    """Render with a fresh generator of the given seed."""
    return render_phantom(lesion, image, np.random.default_rng(seed), **kwargs)


def world(phantom: Phantom) -> np.ndarray:
    """World RAS mm of every voxel, shape (nx, ny, nz, 3)."""
    index = np.indices(phantom.hu.shape).reshape(3, -1)
    xyz = phantom.affine[:3, :3] @ index + phantom.affine[:3, 3:]
    return xyz.T.reshape(*phantom.hu.shape, 3)


def centroid(phantom: Phantom, region: np.ndarray) -> np.ndarray:
    """World RAS centroid (mm) of a boolean region."""
    assert region.any()
    return world(phantom)[region].mean(axis=0)


def ventricular_csf(phantom: Phantom) -> np.ndarray:
    """CSF-valued voxels (noise-free render) in a box around the ventricles."""
    xyz = world(phantom)
    box = (np.abs(xyz[..., 0]) < 35) & (np.abs(xyz[..., 1]) < 45) & (xyz[..., 2] > 0)
    return box & (xyz[..., 2] < 35) & (phantom.hu > -20) & (phantom.hu < 14) & (phantom.mask == 0)


@pytest.mark.parametrize("matrix", [64, 96])
@pytest.mark.parametrize(
    ("volume_ml", "location", "subsite", "side"),
    [
        (1.0, "deep", "thalamus", "left"),
        (5.0, "lobar", "temporal", "right"),
        (30.0, "cerebellar", "cerebellum", "left"),
        (80.0, "lobar", "parietal", "right"),
        (80.0, "brainstem", "pons", "midline"),
    ],
)
def test_mask_volume_matches_request(matrix, volume_ml, location, subsite, side):
    lesion = Lesion(location, subsite, side, volume_ml, ivh=True, midline_shift_mm=4.0)
    phantom = render(lesion, ImageSpec(matrix=matrix), seed=matrix)
    voxel_ml = abs(np.linalg.det(phantom.affine[:3, :3])) / 1000
    assert (phantom.mask == 1).sum() * voxel_ml == pytest.approx(volume_ml, rel=0.1)


def test_arrays_types_and_blood_values():
    phantom = render(replace(DEEP, ivh=True, volume_ml=40.0), seed=3)
    assert phantom.hu.dtype == np.int16 and phantom.mask.dtype == np.uint8
    assert phantom.hu.shape == phantom.mask.shape and phantom.affine.shape == (4, 4)
    assert set(np.unique(phantom.mask)) == {0, 1, 2}
    for label in (1, 2):
        blood = phantom.hu[phantom.mask == label]
        assert blood.min() >= 50 and blood.max() <= 90
    assert 55 <= np.median(phantom.hu[phantom.mask == 1]) <= 82


def test_head_tissues_have_ct_values():
    phantom = render(DEEP, seed=5)
    xyz = world(phantom)
    lesion_zone = np.linalg.norm(xyz - centroid(phantom, phantom.mask == 1), axis=-1) < 45
    brain = (np.abs(xyz[..., 0]) < 45) & (np.abs(xyz[..., 1]) < 55) & (np.abs(xyz[..., 2] - 25) < 15)
    assert 15 <= np.median(phantom.hu[brain & ~lesion_zone]) <= 50
    assert (phantom.hu > 700).sum() > 200  # skull
    assert (phantom.hu[[0, 0, -1, -1], [0, -1, 0, -1], :] < -900).all()  # air in the corners


def test_grey_matter_is_denser_than_white_matter():
    phantom = render(DEEP, QUIET, seed=1)
    values = phantom.hu[(phantom.mask == 0) & (phantom.hu > 15) & (phantom.hu < 50)]
    assert np.isin([26, 40], values).all()  # white matter and cortex (and nuclei ~38) both present


def test_no_intraventricular_label_without_ivh():
    phantom = render(replace(DEEP, volume_ml=60.0, midline_shift_mm=10.0), seed=2)
    assert not (phantom.mask == 2).any()


def test_ivh_fills_the_dependent_part_of_the_ventricles():
    lesion = Lesion("deep", "thalamus", "left", 10.0, ivh=True, midline_shift_mm=3.0)
    with_ivh = render(lesion, QUIET, seed=4)
    without = render(replace(lesion, ivh=False), QUIET, seed=4)
    ivh = with_ivh.mask == 2
    csf = ventricular_csf(without)
    assert ((without.hu[ivh] < 20) & (without.mask[ivh] == 0)).mean() > 0.9  # in the ventricles
    assert 0.15 <= ivh.sum() / (csf | ivh).sum() <= 0.7
    assert centroid(with_ivh, ivh)[1] < centroid(without, csf)[1] - 5  # posterior (supine)
    assert np.array_equal(with_ivh.hu[~ivh], without.hu[~ivh])  # same anatomy otherwise


@pytest.mark.parametrize(
    ("location", "subsite"),
    [("deep", "basal ganglia"), ("deep", "thalamus"), ("lobar", "frontal"),
     ("lobar", "occipital"), ("cerebellar", "cerebellum")],
)  # fmt: skip
@pytest.mark.parametrize(("side", "sign"), [("left", -1), ("right", 1)])
def test_haematoma_lies_on_the_requested_side(location, subsite, side, sign):
    phantom = render(Lesion(location, subsite, side, 15.0, ivh=False, midline_shift_mm=0.0))
    assert sign * centroid(phantom, phantom.mask == 1)[0] > 5


def test_infratentorial_haematomas_are_lower_than_supratentorial_ones():
    def height(lesion: Lesion) -> float:
        phantom = render(lesion, seed=6)
        return centroid(phantom, phantom.mask == 1)[2]

    infra = [
        height(Lesion("cerebellar", "cerebellum", "right", 10.0, False, 0.0)),
        height(Lesion("brainstem", "pons", "midline", 5.0, False, 0.0)),
    ]
    supra = [
        height(Lesion("deep", "basal ganglia", "left", 10.0, False, 0.0)),
        height(Lesion("lobar", "temporal", "left", 10.0, False, 0.0)),
        height(Lesion("lobar", "parietal", "right", 10.0, False, 0.0)),
    ]
    assert max(infra) < min(supra) - 5


def test_haematoma_is_irregular():
    phantom = render(replace(DEEP, volume_ml=30.0), ImageSpec(matrix=96), seed=7)
    points = world(phantom)[phantom.mask == 1]
    voxel_ml = abs(np.linalg.det(phantom.affine[:3, :3])) / 1000
    radius = np.cbrt(3 * len(points) * voxel_ml * 1000 / (4 * np.pi))
    beyond_ball = np.linalg.norm(points - points.mean(axis=0), axis=1) > radius
    assert beyond_ball.mean() > 0.08  # a voxelised ball of equal volume gives ~0


@pytest.mark.parametrize(("side", "sign"), [("left", 1), ("right", -1)])
def test_midline_shift_moves_the_ventricles_away_from_the_lesion(side, sign):
    lesion = replace(DEEP, side=side)
    shift_mm = 8.0
    before = render(lesion, QUIET, seed=8)
    after = render(replace(lesion, midline_shift_mm=shift_mm), QUIET, seed=8)
    moved = centroid(after, ventricular_csf(after))[0] - centroid(before, ventricular_csf(before))[0]
    assert sign * moved == pytest.approx(shift_mm, rel=0.5)


def test_midline_shift_spares_infratentorial_lesions():
    lesion = Lesion("cerebellar", "cerebellum", "left", 20.0, ivh=False, midline_shift_mm=0.0)
    before = render(lesion, seed=9)
    after = render(replace(lesion, midline_shift_mm=6.0), seed=9)
    assert np.array_equal(before.hu, after.hu)


def test_geometry_is_sampled_within_the_spec():
    spec = ImageSpec(lps_fraction=0.0)
    for seed in range(6):
        phantom = render(DEEP, spec, seed=seed)
        spacing = np.abs(np.diag(phantom.affine)[:3])
        assert phantom.hu.shape[:2] == (spec.matrix, spec.matrix)
        assert spec.slices[0] <= phantom.hu.shape[2] <= spec.slices[1]
        assert spec.slice_mm[0] <= spacing[2] <= spec.slice_mm[1]
        assert spec.fov_mm[0] <= spacing[0] * spec.matrix <= spec.fov_mm[1]
        assert spacing[0] == spacing[1]
        assert np.abs(world(phantom)[..., :2].mean(axis=(0, 1, 2))).max() < 1.0  # centred


def test_lps_fraction_controls_the_voxel_order():
    ras = render(DEEP, ImageSpec(lps_fraction=0.0))
    lps = render(DEEP, ImageSpec(lps_fraction=1.0))
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")


def test_ras_and_lps_hold_the_same_physical_content():
    lesion = Lesion("lobar", "frontal", "left", 25.0, ivh=True, midline_shift_mm=5.0)
    ras = render(lesion, seed=10, orientation="RAS")
    lps = render(lesion, seed=10, orientation="LPS")
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    for name in ("hu", "mask"):
        canonical = nib.as_closest_canonical(nib.Nifti1Image(getattr(lps, name), lps.affine))
        assert np.array_equal(np.asanyarray(canonical.dataobj), getattr(ras, name))
        assert np.allclose(canonical.affine, ras.affine)


def test_rendering_is_deterministic_per_seed():
    lesion = replace(DEEP, ivh=True, midline_shift_mm=4.0)
    first, again, other = render(lesion, seed=11), render(lesion, seed=11), render(lesion, seed=12)
    for name in ("hu", "mask", "affine"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.mask, other.mask)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"location": "spinal"}, r"location 'spinal'.*deep, lobar, cerebellar, brainstem"),
        ({"subsite": "pons"}, r"subsite 'pons'.*basal ganglia, thalamus"),
        ({"side": "midline"}, r"side 'midline'.*left, right"),
        ({"volume_ml": -3.0}, r"volume_ml -3.0 must be >= 0.5"),
        ({"midline_shift_mm": -1.0}, r"midline_shift_mm -1.0 must be >= 0"),
    ],
)
def test_invalid_lesions_are_rejected(fields, match):
    values = {"location": "deep", "subsite": "thalamus", "side": "left", "volume_ml": 5.0,
              "ivh": False, "midline_shift_mm": 0.0} | fields  # fmt: skip
    with pytest.raises(IchproError, match=match):
        Lesion(**values)


def test_invalid_orientation_and_image_spec_are_rejected():
    with pytest.raises(IchproError, match=r"orientation 'RAI'.*RAS, LPS"):
        render(DEEP, orientation="RAI")
    with pytest.raises(IchproError, match=r"lps_fraction 1.5"):
        ImageSpec(lps_fraction=1.5)


def test_save_and_load_round_trip_exactly(tmp_path):
    phantom = render(replace(DEEP, ivh=True), seed=13, orientation="LPS")
    save_phantom(phantom, tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz")
    ct, mask = nib.load(tmp_path / "ct.nii.gz"), nib.load(tmp_path / "mask.nii.gz")
    assert ct.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
    assert (ct.dataobj.slope, ct.dataobj.inter) == (1.0, -1024.0)  # stored raw = HU + 1024
    assert np.asanyarray(ct.dataobj.get_unscaled()).min() >= 0
    assert np.array_equal(ct.get_fdata(), phantom.hu)
    assert np.array_equal(np.asanyarray(mask.dataobj), phantom.mask)
    for image in (ct, mask):
        assert np.allclose(image.affine, phantom.affine)
        assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1


def test_saved_files_are_byte_identical(tmp_path):
    paths = []
    for run in ("a", "b"):
        phantom = render(replace(DEEP, ivh=True), seed=14)
        ct_path, mask_path = tmp_path / run / "ct.nii.gz", tmp_path / run / "mask.nii.gz"
        save_phantom(phantom, ct_path, mask_path)
        paths.append((ct_path, mask_path))
    for first, second in zip(*paths, strict=True):
        assert first.read_bytes() == second.read_bytes()
        assert first.read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime 0: no timestamp in the file
        assert gzip.decompress(first.read_bytes())[:4] == (348).to_bytes(4, "little")
