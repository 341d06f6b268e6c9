"""Synthetic head CT phantoms: an analytic anatomy with a haematoma of exact volume.

Anatomy model
-------------
Everything is drawn in the world frame (RAS, millimetres, brain centred near the origin)
through *anatomical* coordinates ``u``: the world coordinates after a small random head pose
(yaw, in-plane translation) and a per-patient head size. Each structure is an approximate
signed distance function (SDF, negative inside) of ``u``, and partial volume is modelled by
mixing tissue values with the occupancy ``clip(0.5 - sdf / voxel_size, 0, 1)``.

* Intracranial cavity: the smooth union of a cerebral ellipsoid (cut by the floor of the
  anterior and middle cranial fossae, raised in the midline over sella and clivus), a
  posterior fossa ellipsoid and a brainstem ellipsoid. A tentorial surface sloping down
  posteriorly separates supratentorial from infratentorial brain.
* Skull: a 5-7 mm shell with dense inner and outer tables (~1350 HU) and a textured diploe
  (~800 HU); under the cerebral floor the skull base is diploic bone with air cells. A thin
  scalp (~30 HU) covers it and air (-1000 HU) lies outside.
* Brain: subarachnoid CSF of patchy thickness (scaled by an atrophy factor), a grey-matter
  cortical ribbon (~40 HU) over white matter (~26 HU), caudate and lentiform nuclei and thalami
  (~38 HU), two curved lateral ventricles with third and fourth ventricles (CSF ~7 HU), a dense
  falx in the midline outside the corpus callosum, the cerebellum (~34 HU) and brainstem (~31 HU).
* Haematoma: grown from a seed at the lesion's subsite by taking the ``round(volume / voxel
  volume)`` eligible voxels of lowest score, the score being an anisotropic distance to the
  seed divided by a smooth random function of direction, so the blob is irregular but
  star-shaped and its volume exact to half a voxel. Eligible voxels lie in the lesion's
  compartment (ipsilateral supratentorial hemisphere, or posterior fossa) outside the
  ventricles. A hypodense rim of perihaematomal oedema surrounds it.
* Intraventricular haemorrhage fills the dependent part of the lateral ventricles: the patient
  lies supine, so the blood-CSF level is a coronal plane and the blood is posterior (low y).
* Mass effect: a smooth displacement field along x, largest at the septum pellucidum and
  fading towards the vertex and the cortex, moves ventricles, falx and deep nuclei away from a
  supratentorial lesion by ``midline_shift_mm``.

The volume is rendered in RAS voxel order and flipped to LPS when required, so both voxel
orders hold the same physical content. Every random draw happens in a fixed order whatever the
lesion, so lesions that differ only in IVH, shift or orientation share the same anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ichpro.errors import IchproError

SUBSITES: dict[str, tuple[str, ...]] = {
    "deep": ("basal ganglia", "thalamus"),
    "lobar": ("frontal", "parietal", "temporal", "occipital"),
    "cerebellar": ("cerebellum",),
    "brainstem": ("pons",),
}
SIDES: dict[str, tuple[str, ...]] = {
    "deep": ("left", "right"),
    "lobar": ("left", "right"),
    "cerebellar": ("left", "right"),
    "brainstem": ("midline",),
}
SUPRATENTORIAL = ("deep", "lobar")
ORIENTATIONS = ("RAS", "LPS")
MIN_VOLUME_ML = 0.5

#: Haematoma seed of each subsite in anatomical mm, right side (x is mirrored for the left).
_SEEDS: dict[str, tuple[float, float, float]] = {
    "basal ganglia": (22.0, 3.0, 4.0),
    "thalamus": (12.0, -14.0, 8.0),
    "frontal": (30.0, 48.0, 28.0),
    "parietal": (36.0, -22.0, 42.0),
    "temporal": (48.0, 2.0, -10.0),
    "occipital": (22.0, -60.0, 14.0),
    "cerebellum": (22.0, -52.0, -32.0),
    "pons": (0.0, -20.0, -26.0),
}
_SIDE_SIGN = {"left": -1.0, "right": 1.0, "midline": 0.0}

AIR_HU, SCALP_HU, FACE_HU, CSF_HU = -1000.0, 30.0, 35.0, 7.0
GM_HU, WM_HU, NUCLEI_HU = 40.0, 26.0, 38.0
CEREBELLUM_HU, BRAINSTEM_HU, FALX_HU = 34.0, 31.0, 22.0
TABLE_HU, DIPLOE_HU = 1350.0, 800.0
BLOOD_CLIP_HU = (50.0, 90.0)
OEDEMA_HU = -7.0
HU_RANGE = (-1024, 3071)
RAW_OFFSET = 1024  # stored raw value = HU + 1024, read back with scl_inter = -1024

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ImageSpec:
    """Scanner-like acquisition parameters for the phantoms of one cohort."""

    matrix: int = 64  # in-plane voxels (square)
    fov_mm: tuple[float, float] = (220.0, 250.0)  # in-plane field of view range, per patient
    slices: tuple[int, int] = (24, 36)  # slice count range (inclusive), per patient
    slice_mm: tuple[float, float] = (4.5, 5.5)  # slice spacing range
    lps_fraction: float = 0.3  # share of volumes stored in LPS voxel order (rest RAS)
    noise_hu: float = 6.0  # sd of image noise

    def __post_init__(self) -> None:
        problems = []
        if self.matrix < 32:
            problems.append(f"matrix {self.matrix} < 32")
        if not 200.0 <= self.fov_mm[0] <= self.fov_mm[1]:
            problems.append(f"fov_mm {self.fov_mm} must be ordered and >= 200 (a smaller one cuts the head)")
        if not 1 < self.slices[0] <= self.slices[1]:
            problems.append(f"slices {self.slices} must be ordered and > 1")
        if not 0.0 < self.slice_mm[0] <= self.slice_mm[1]:
            problems.append(f"slice_mm {self.slice_mm} must be ordered and positive")
        if not 0.0 <= self.lps_fraction <= 1.0:
            problems.append(f"lps_fraction {self.lps_fraction} outside [0, 1]")
        if self.noise_hu < 0:
            problems.append(f"noise_hu {self.noise_hu} is negative")
        if problems:
            raise IchproError("invalid ImageSpec: " + "; ".join(problems))


@dataclass(frozen=True)
class Lesion:
    """What one patient's CT must show."""

    location: str  # "deep" | "lobar" | "cerebellar" | "brainstem"
    subsite: str  # see SUBSITES
    side: str  # "left" | "right" (brainstem: "midline")
    volume_ml: float  # parenchymal haematoma volume (>= 0.5)
    ivh: bool  # intraventricular extension
    midline_shift_mm: float  # >= 0

    def __post_init__(self) -> None:
        if self.location not in SUBSITES:
            raise IchproError(
                f"unknown lesion location {self.location!r}; choose one of {', '.join(SUBSITES)}"
            )
        allowed = SUBSITES[self.location]
        if self.subsite not in allowed:
            raise IchproError(
                f"unknown subsite {self.subsite!r} for a {self.location} lesion; "
                f"choose one of {', '.join(allowed)}"
            )
        if self.side not in SIDES[self.location]:
            raise IchproError(
                f"unknown side {self.side!r} for a {self.location} lesion; "
                f"choose one of {', '.join(SIDES[self.location])}"
            )
        if not self.volume_ml >= MIN_VOLUME_ML:
            raise IchproError(f"volume_ml {self.volume_ml!r} must be >= {MIN_VOLUME_ML}")
        if not self.midline_shift_mm >= 0:
            raise IchproError(f"midline_shift_mm {self.midline_shift_mm!r} must be >= 0")


@dataclass
class Phantom:
    """A rendered CT (HU), its label mask and the voxel-to-world (RAS mm) affine."""

    hu: np.ndarray  # int16 Hounsfield units, shape (nx, ny, nz) in the voxel order of affine
    mask: np.ndarray  # uint8: 0 background, 1 parenchymal haematoma, 2 intraventricular blood
    affine: np.ndarray  # 4x4 float64, voxel index -> world RAS mm (nibabel convention)


@dataclass(frozen=True)
class _Geometry:
    """Per-patient acquisition and head pose."""

    spacing: float  # in-plane mm
    slice_mm: float
    n_slices: int
    z_base: float  # world z of the lowest candidate slice (skull base)
    crop_offset: int  # slices skipped above the base when the lesion allows
    yaw: float  # radians
    shift_xy: tuple[float, float]  # head translation, mm
    head_scale: float


@dataclass(frozen=True)
class _Patient:
    """Per-patient anatomy and lesion appearance."""

    skull_mm: float
    scalp_mm: float
    atrophy: float
    blood_hu: float
    ivh_hu: float
    ivh_fraction: float
    oedema: float  # rim width relative to the haematoma's score threshold
    seed_jitter: np.ndarray  # (3,) mm
    shape: np.ndarray  # (3, 3): rotation and anisotropy of the haematoma
    wave_freq: np.ndarray  # (5, 3): directional modulation of the haematoma outline
    wave_phase: np.ndarray  # (5,)
    wave_amp: np.ndarray  # (5,), sums to 1


@dataclass(frozen=True)
class _Grid:
    """The full-height sampling grid (skull base to vertex) in anatomical coordinates."""

    u: Coords  # ux, uy of shape (n, n, 1); uz of shape (1, 1, k)
    spacing: float
    slice_mm: float
    h: float  # partial-volume width in anatomical mm

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel counts along x, y and z."""
        return (self.u[0].shape[0], self.u[0].shape[1], self.u[2].shape[2])


@dataclass(frozen=True)
class _Compartments:
    """Signed distances (mm) of the intracranial compartments, and the infratentorial weight."""

    cavity: np.ndarray  # the intracranial cavity (inner skull surface)
    envelope: np.ndarray  # the cavity without its floor: the skull base lies in between
    stem: np.ndarray  # the brainstem
    infra: np.ndarray  # 1 below the tentorium, 0 above, partial in between


def render_phantom(
    lesion: Lesion,
    image: ImageSpec,
    rng: np.random.Generator,
    *,
    orientation: str | None = None,
) -> Phantom:
    """Render one patient's head CT and label mask; `orientation` ("RAS"/"LPS") forces the order."""
    if orientation not in (None, *ORIENTATIONS):
        raise IchproError(
            f"unknown orientation {orientation!r}; choose one of {', '.join(ORIENTATIONS)} or None"
        )
    geo = _sample_geometry(image, rng)
    patient = _sample_patient(rng)
    grid = _make_grid(image.matrix, geo)
    fields = _smooth_fields(grid, rng)
    noise = _image_noise((image.matrix, image.matrix, geo.n_slices), rng) * image.noise_hu
    if rng.random() < image.lps_fraction and orientation is None:
        orientation = "LPS"

    voxel_ml = geo.spacing**2 * geo.slice_mm / 1000.0
    hu, mask = _draw_head(grid, lesion, patient, fields, lesion.volume_ml / voxel_ml)
    start = _crop_start(mask, geo)
    hu = hu[:, :, start : start + geo.n_slices] + noise
    mask = mask[:, :, start : start + geo.n_slices]
    blood = mask > 0
    hu[blood] = np.clip(hu[blood], *BLOOD_CLIP_HU)
    hu = np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
    affine = _ras_affine(image.matrix, geo, start)
    if orientation == "LPS":
        return Phantom(hu[::-1, ::-1].copy(), mask[::-1, ::-1].copy(), _to_lps(affine, hu.shape))
    return Phantom(hu, mask, affine)


def save_phantom(phantom: Phantom, ct_path: Path, mask_path: Path) -> None:
    """Write the CT (int16, raw = HU + 1024, scl_inter -1024) and the uint8 mask as NIfTI-1."""
    raw = (phantom.hu.astype(np.int32) + RAW_OFFSET).astype(np.int16)
    ct = _nifti(raw, phantom.affine)
    ct.header.set_slope_inter(1.0, -float(RAW_OFFSET))
    mask = _nifti(phantom.mask.astype(np.uint8), phantom.affine)
    for image, path in ((ct, Path(ct_path)), (mask, Path(mask_path))):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(image, path)  # nibabel's gzip is deterministic: mtime 0, no file name


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI-1 image with scanner-coordinate sform and qform and millimetre units."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(data.dtype)
    image.header.set_xyzt_units("mm", "sec")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    return image


def _sample_geometry(image: ImageSpec, rng: np.random.Generator) -> _Geometry:
    """Draw the field of view, slices, slice spacing and head pose of one patient."""
    fov = rng.uniform(*image.fov_mm)
    n_slices = int(rng.integers(image.slices[0], image.slices[1] + 1))
    slice_mm = rng.uniform(*image.slice_mm)
    return _Geometry(
        spacing=fov / image.matrix,
        slice_mm=slice_mm,
        n_slices=n_slices,
        z_base=rng.uniform(-64.0, -56.0),
        crop_offset=int(rng.integers(0, 3)),
        yaw=np.deg2rad(rng.uniform(-4.0, 4.0)),
        shift_xy=(rng.uniform(-4.0, 4.0), rng.uniform(-4.0, 4.0)),
        head_scale=rng.uniform(0.94, 1.06),
    )


def _sample_patient(rng: np.random.Generator) -> _Patient:
    """Draw the anatomy and lesion appearance parameters of one patient."""
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    stretch = np.exp(rng.normal(0.0, 0.18, 3))
    amp = rng.uniform(0.2, 1.0, 5)
    return _Patient(
        skull_mm=rng.uniform(5.0, 7.0),
        scalp_mm=rng.uniform(3.0, 5.0),
        atrophy=rng.uniform(0.9, 1.35),
        blood_hu=rng.uniform(55.0, 80.0),
        ivh_hu=rng.uniform(55.0, 68.0),
        ivh_fraction=rng.uniform(0.25, 0.5),
        oedema=rng.uniform(0.12, 0.3),
        seed_jitter=rng.uniform(-3.0, 3.0, 3),
        shape=rotation / (stretch / np.cbrt(stretch.prod())),
        wave_freq=rng.normal(0.0, 2.2, (5, 3)),
        wave_phase=rng.uniform(0.0, 2 * np.pi, 5),
        wave_amp=amp / amp.sum(),
    )


def _make_grid(matrix: int, geo: _Geometry) -> _Grid:
    """Anatomical coordinates of a grid reaching from the skull base to above the vertex."""
    n_z = max(geo.n_slices, int(np.ceil((82.0 - geo.z_base) / geo.slice_mm)) + 1)
    xy = (np.arange(matrix) - (matrix - 1) / 2) * geo.spacing
    wx = (xy - geo.shift_xy[0])[:, None, None]
    wy = (xy - geo.shift_xy[1])[None, :, None]
    cos, sin = np.cos(geo.yaw), np.sin(geo.yaw)
    scale = geo.head_scale
    ux = ((cos * wx + sin * wy) / scale).astype(np.float32)
    uy = ((cos * wy - sin * wx) / scale).astype(np.float32)
    uz = ((geo.z_base + np.arange(n_z) * geo.slice_mm) / scale).astype(np.float32)
    return _Grid((ux, uy, uz[None, None, :]), geo.spacing, geo.slice_mm, geo.spacing / scale)


def _smooth_fields(grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """Independent smooth random fields of unit sd: two coarse (7 mm), one gyral (4.5 mm)."""
    fields = rng.standard_normal((3, *grid.shape), dtype=np.float32)
    for field, scale_mm in zip(fields, (7.0, 7.0, 4.5), strict=True):
        sigma = (scale_mm / grid.spacing, scale_mm / grid.spacing, scale_mm / grid.slice_mm)
        ndimage.gaussian_filter(field, sigma, mode="wrap", output=field)
    return fields / fields.std(axis=(1, 2, 3), keepdims=True)


def _image_noise(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Scanner-like noise of unit sd, lightly correlated in plane."""
    noise = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), (0.6, 0.6, 0.0), mode="wrap"
    )
    return noise / noise.std()


def _draw_head(
    grid: _Grid, lesion: Lesion, patient: _Patient, fields: np.ndarray, n_voxels: float
) -> tuple[np.ndarray, np.ndarray]:
    """HU (before noise) and label mask on the full-height grid."""
    ux, uy, uz = grid.u
    sign = _SIDE_SIGN[lesion.side]
    ux_shifted = ux - _midline_displacement(grid.u, lesion)
    moved = (ux_shifted, uy, uz)
    parts = _compartments(grid.u)
    lateral = _lateral_ventricles(moved, patient.atrophy)
    fourth = _ellipsoid(grid.u, (0.0, -36.0, -28.0), (5.0, 3.5, 7.0))
    ventricles = np.minimum(np.minimum(lateral, fourth), _third_ventricle(moved, grid.h))

    hu = _skull_and_scalp(parts, patient, fields, grid.h)
    brain = _brain_tissue(moved, parts, ventricles, patient, fields, grid.h)
    hu += (brain - hu) * _occupancy(parts.cavity, grid.h)

    inside = (parts.cavity < 0) & (ventricles > 0)
    if lesion.location in SUPRATENTORIAL:
        eligible = inside & (parts.infra < 0.5) & (sign * ux_shifted > 0)
    else:
        eligible = inside & (parts.infra >= 0.5)
    seed = np.array(_SEEDS[lesion.subsite]) * [sign, 1.0, 1.0] + patient.seed_jitter
    haematoma, rim = _grow_haematoma(grid, eligible, seed, n_voxels, patient)

    hu[rim] += OEDEMA_HU
    mask = haematoma.astype(np.uint8)
    hu[haematoma] = patient.blood_hu + 3.0 * fields[1][haematoma]
    if lesion.ivh:
        ivh = _dependent_part(lateral < 0, uy, patient.ivh_fraction)
        mask[ivh] = 2
        hu[ivh] = patient.ivh_hu
    return hu, mask


def _occupancy(sdf: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume fraction inside a surface, from its signed distance."""
    return np.clip(0.5 - sdf / h, 0.0, 1.0)


def _ellipsoid(u: Coords, centre: tuple[float, ...], semi: tuple) -> np.ndarray:
    """First-order signed distance (mm) to an ellipsoid; semi-axes may vary in space."""
    d = [(ui - c) / a for ui, c, a in zip(u, centre, semi, strict=True)]
    q = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    grad = np.sqrt((d[0] / semi[0]) ** 2 + (d[1] / semi[1]) ** 2 + (d[2] / semi[2]) ** 2)
    return (q - 1.0) / np.maximum(grad / np.maximum(q, 1e-3), 1e-3)


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float = 6.0) -> np.ndarray:
    """Union of two SDFs with a fillet of about k mm."""
    w = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * w - k * w * (1.0 - w)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


def _compartments(u: Coords) -> _Compartments:
    """Cerebrum over the cranial fossae, posterior fossa and brainstem, split by the tentorium."""
    ux, uy, uz = u
    cerebrum = _ellipsoid(u, (0.0, 2.0, 10.0), (67.0, 84.0, 58.0))
    sella_and_clivus = _sigmoid((uy + 22.0) / 4.0) * _sigmoid((25.0 - uy) / 4.0)
    floor = -40.0 + 26.0 * _sigmoid((uy - 30.0) / 6.0)  # middle, then anterior cranial fossa
    floor = floor + 22.0 * np.exp(-((ux / 16.0) ** 2)) * sella_and_clivus
    fossa = _ellipsoid(u, (0.0, -45.0, -28.0), (50.0, 34.0, 24.0))
    stem = _ellipsoid(u, (0.0, -20.0, -30.0), (13.0, 13.0, 30.0))
    infratentorial_sdf = _smooth_min(fossa, stem)
    cavity = _smooth_min(np.maximum(cerebrum, floor - uz), infratentorial_sdf)
    envelope = _smooth_min(cerebrum, infratentorial_sdf)
    tentorium = -8.0 + 0.25 * (uy + 20.0)
    infra = np.clip(0.5 - np.maximum(infratentorial_sdf, uz - tentorium) / 3.0, 0.0, 1.0)
    return _Compartments(cavity, envelope, stem, infra)


def _midline_displacement(u: Coords, lesion: Lesion) -> np.ndarray | float:
    """x displacement of midline structures, away from a supratentorial lesion."""
    if lesion.location not in SUPRATENTORIAL or lesion.midline_shift_mm == 0:
        return 0.0
    ux, uy, uz = u
    weight = np.exp(-0.5 * ((ux / 45.0) ** 2 + (uy / 40.0) ** 2 + ((uz - 14.0) / 30.0) ** 2))
    return -_SIDE_SIGN[lesion.side] * lesion.midline_shift_mm * weight


def _lateral_ventricles(u: Coords, atrophy: float) -> np.ndarray:
    """SDF of both lateral ventricles: curved tubes from the frontal horns to the atria."""
    ux, uy, uz = u
    t = np.clip((25.0 - uy) / 60.0, 0.0, 1.0)  # 0 at the frontal horn, 1 at the atrium
    centre_x = 6.0 + 12.0 * t**2
    centre_z = 19.0 - 0.005 * (uy + 5.0) ** 2
    offsets = (np.abs(ux) - centre_x, uy + 5.0, uz - centre_z)
    semi = ((4.0 + 3.5 * t) * atrophy, 33.0, 10.0 * atrophy)
    return _ellipsoid(offsets, (0.0, 0.0, 0.0), semi)


def _third_ventricle(u: Coords, h: float) -> np.ndarray:
    """SDF of the third ventricle, a midline slit at least one voxel wide."""
    return _ellipsoid(u, (0.0, -8.0, 2.0), (max(2.0, 0.55 * h), 12.0, 8.0))


def _deep_nuclei(u: Coords) -> np.ndarray:
    """SDF of the caudate heads, lentiform nuclei and thalami of both sides."""
    mirrored = (np.abs(u[0]), u[1], u[2])
    caudate = _ellipsoid(mirrored, (11.0, 14.0, 12.0), (5.0, 8.0, 7.0))
    lentiform = _ellipsoid(mirrored, (22.0, 3.0, 4.0), (7.0, 14.0, 9.0))
    thalamus = _ellipsoid(mirrored, (11.0, -14.0, 8.0), (8.0, 11.0, 8.0))
    return np.minimum(np.minimum(caudate, lentiform), thalamus)


def _skull_and_scalp(parts: _Compartments, patient: _Patient, fields: np.ndarray, h: float) -> np.ndarray:
    """HU outside the brain: air, scalp, skull tables and diploe, skull base with air cells."""
    cavity, envelope, thick = parts.cavity, parts.envelope, patient.skull_mm
    depth = np.clip(np.minimum(cavity, thick - envelope) / (thick / 2), 0.0, 1.0)
    bone = np.clip(TABLE_HU - (TABLE_HU - DIPLOE_HU) * depth + 60.0 * fields[0], 700.0, 1500.0)
    face = (cavity > thick) & (envelope < -2.5)
    bone[face] = np.where(fields[1][face] > 0.8, AIR_HU, FACE_HU)  # soft tissue, sinus air
    hu = AIR_HU + (SCALP_HU - AIR_HU) * _occupancy(envelope - thick - patient.scalp_mm, h)
    return hu + (bone - hu) * _occupancy(envelope - thick, h)


def _brain_tissue(
    moved: Coords,
    parts: _Compartments,
    ventricles: np.ndarray,
    patient: _Patient,
    fields: np.ndarray,
    h: float,
) -> np.ndarray:
    """HU of the intracranial contents (CSF, cortex, white matter, nuclei, posterior fossa)."""
    sulci = np.clip(1.0 - np.abs(fields[2]) / 0.3, 0.0, 1.0)  # zero set of a random field
    csf = patient.atrophy * (1.0 + 1.5 * np.maximum(fields[0], 0.0) + 7.0 * sulci)
    ribbon = 3.5 + 0.8 * fields[1]
    cortex = _occupancy(parts.cavity + csf, h)
    brain = CSF_HU + (GM_HU - CSF_HU) * cortex
    brain += (WM_HU - brain) * _occupancy(parts.cavity + csf + ribbon, h)
    brain += (NUCLEI_HU - brain) * _occupancy(_deep_nuclei(moved), h)
    posterior = CSF_HU + (CEREBELLUM_HU - CSF_HU) * cortex
    posterior += (BRAINSTEM_HU - posterior) * _occupancy(parts.stem + 1.5, h)
    brain += (posterior - brain) * parts.infra
    brain += (CSF_HU - brain) * _occupancy(ventricles, h)
    return brain + FALX_HU * _falx(moved, h) * (1.0 - parts.infra)


def _falx(u: Coords, h: float) -> np.ndarray:
    """Partial-volume weight of the falx: the midline plane outside the corpus callosum arch."""
    ux, uy, uz = u
    outside_callosum = ((uy + 3.0) / 40.0) ** 2 + ((uz - 8.0) / 24.0) ** 2 > 1.0
    return np.clip(1.0 - np.abs(ux) / h, 0.0, 1.0) * outside_callosum


def _grow_haematoma(
    grid: _Grid, eligible: np.ndarray, seed: np.ndarray, n_voxels: float, patient: _Patient
) -> tuple[np.ndarray, np.ndarray]:
    """The exact number of eligible voxels nearest the seed (irregular metric), and the oedema rim."""
    index = np.flatnonzero(eligible)
    rel = np.stack([np.broadcast_to(ui, grid.shape).ravel()[index] for ui in grid.u], axis=1)
    rel = (rel - seed) @ patient.shape
    radius = np.linalg.norm(rel, axis=1)
    direction = rel / np.maximum(radius, 1e-6)[:, None]
    wave = np.cos(direction @ patient.wave_freq.T + patient.wave_phase) @ patient.wave_amp
    score = radius / (1.0 + 0.45 * wave)
    count = int(np.clip(round(n_voxels), 1, index.size))
    chosen = np.argpartition(score, count - 1)[:count]
    threshold = score[chosen].max()
    haematoma = np.zeros(grid.shape, dtype=bool)
    haematoma.flat[index[chosen]] = True
    rim = np.zeros(grid.shape, dtype=bool)
    rim.flat[index[(score > threshold) & (score <= threshold * (1.0 + patient.oedema))]] = True
    return haematoma, rim


def _dependent_part(region: np.ndarray, uy: np.ndarray, fraction: float) -> np.ndarray:
    """The posterior `fraction` of a region: blood settles below a coronal fluid level."""
    index = np.flatnonzero(region)
    depth = np.broadcast_to(uy, region.shape).ravel()[index]
    count = round(fraction * index.size)
    part = np.zeros(region.shape, dtype=bool)
    if count:
        part.flat[index[np.argpartition(depth, count - 1)[:count]]] = True
    return part


def _crop_start(mask: np.ndarray, geo: _Geometry) -> int:
    """First slice kept: near the skull base, moved up just enough to keep the whole lesion."""
    planes = np.flatnonzero(mask.any(axis=(0, 1)))
    start = max(geo.crop_offset, int(planes.max()) - geo.n_slices + 1)
    return int(np.clip(start, 0, min(planes.min(), mask.shape[2] - geo.n_slices)))


def _ras_affine(matrix: int, geo: _Geometry, start: int) -> np.ndarray:
    """Voxel (RAS order) to world mm, the in-plane grid centred on the origin."""
    corner = -(matrix - 1) / 2 * geo.spacing
    affine = np.diag([geo.spacing, geo.spacing, geo.slice_mm, 1.0])
    affine[:3, 3] = (corner, corner, geo.z_base + start * geo.slice_mm)
    return affine


def _to_lps(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The affine of the same volume stored with the x and y voxel axes reversed."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = (shape[0] - 1, shape[1] - 1)
    return affine @ flip
