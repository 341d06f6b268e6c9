"""CT headers and preprocessing (MONAI), cached datasets and cross-validation folds (manifests:
:mod:`ichpro.manifest`).

The model input is a float32 tensor of shape (1, D, H, W) in a fixed anatomical orientation:
D runs inferior -> superior (slice 0 is the lowest), H runs anterior -> posterior (row 0 is the
front of the head) and W runs from the patient's right to left (column 0 is the patient's right).
An axial slice ``x[0, k]`` therefore displays like a radiology viewer shows it (nose up, patient's
right on the image's left), whatever the orientation the CT was stored in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import torch
from monai.data import MetaTensor, NibabelReader, PydicomReader
from monai.transforms import (
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    Resized,
    ScaleIntensityRanged,
    Transform,
)
from monai.utils import ImageMetaKey, convert_to_tensor
from nibabel.filebasedimages import ImageFileError
from pydicom.errors import InvalidDicomError
from scipy import ndimage
from sklearn.model_selection import StratifiedKFold
from torch.utils.data import Dataset

from ichpro.config import PreprocessConfig
from ichpro.errors import IchproError, ImageError
from ichpro.features import cache_key, cached

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Values below this are no tissue nor air (-1000 HU) but a scanner's padding outside its field of
#: view (-2000, -3024, ...); the air check reads the scanned voxels only, so that a copy stored
#: without its rescale intercept (air near 0, padding near -2000) is not taken for HU.
PADDING_BELOW = -1500.0
#: HU range of intracranial tissue (CSF, brain, fresh blood) used to find the brain.
INTRACRANIAL_HU = (-20.0, 100.0)
#: MONAI axis labels for world axes x, y, z (RAS+): given explicitly to pin Orientation's behaviour.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: Model axes (D, H, W) = towards Superior, Posterior, Left; see the module docstring.
MODEL_AXCODES = "SPL"
DICOM_GEOMETRY_TAGS = [
    "SeriesInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
]
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------------------------
# CT headers (cheap: no pixel data is read)


class CTGeometry(NamedTuple):
    """Size and voxel spacing of a CT along the RAS axes (x, y, z), and its stored axis codes."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    axcodes: str


def ct_geometry(path: str | Path) -> CTGeometry:
    """Read a CT's geometry from its header(s); raise ImageError if unreadable or not a 3D volume."""
    path = Path(path)
    return _dicom_geometry(path) if path.is_dir() else _nifti_geometry(path)


def _nifti_geometry(path: Path) -> CTGeometry:
    """Geometry of a NIfTI file, from its header only."""
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise ImageError(
            f"CT {path} is neither a NIfTI file (.nii or .nii.gz) nor a folder of DICOM files: "
            "convert it to NIfTI (e.g. with dcm2niix) or give the DICOM folder"
        )
    try:
        image = nib.load(path)
    except (ImageFileError, OSError, EOFError) as err:
        raise ImageError(
            f"CT {path} cannot be read as NIfTI ({err}): re-export it as a .nii or .nii.gz volume"
        ) from err
    _check_shape(path, image.shape)
    return _geometry_from_affine(image.shape, image.affine)


def _dicom_geometry(folder: Path) -> CTGeometry:
    """Geometry of a DICOM series folder, from the slices' headers only."""
    headers = []
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            headers.append(
                pydicom.dcmread(file, stop_before_pixels=True, specific_tags=DICOM_GEOMETRY_TAGS)
            )
        except (InvalidDicomError, OSError):
            continue
    if not headers:
        raise ImageError(
            f"CT folder {folder} holds no readable DICOM file: "
            "give a folder holding one DICOM series, or a NIfTI file"
        )
    series = {h.get("SeriesInstanceUID") for h in headers}
    if len(series) > 1:
        raise ImageError(
            f"CT folder {folder} mixes {len(series)} DICOM series: "
            "move each series to its own folder and give the one to use"
        )
    headers.sort(key=lambda h: int(h.get("InstanceNumber", 0)))
    first, last = headers[0], headers[-1]
    try:
        shape = (int(first.Columns), int(first.Rows), len(headers))
        _check_shape(folder, shape)
        cosines = np.array(first.ImageOrientationPatient, dtype=float)
        row_step, col_step = (float(v) for v in first.PixelSpacing)
        start = np.array(first.ImagePositionPatient, dtype=float)
        end = np.array(last.ImagePositionPatient, dtype=float)
    except AttributeError as err:
        raise ImageError(
            f"CT folder {folder} has DICOM files without geometry ({err}): export the series "
            "with ImagePositionPatient, ImageOrientationPatient and PixelSpacing"
        ) from err
    _check_slices(folder, headers, cosines)
    lps = np.eye(4)
    lps[:3, 0] = cosines[:3] * col_step  # the column index runs along the row direction
    lps[:3, 1] = cosines[3:] * row_step
    lps[:3, 2] = (end - start) / (len(headers) - 1)
    lps[:3, 3] = start
    return _geometry_from_affine(shape, _LPS_TO_RAS @ lps)


def _check_slices(folder: Path, headers: list, cosines: np.ndarray) -> None:
    """Raise ImageError for a series whose slices change orientation, repeat a position or leave a gap."""
    try:
        orientations = {tuple(np.round(np.array(h.ImageOrientationPatient, dtype=float), 3)) for h in headers}
        normal = np.cross(cosines[:3], cosines[3:])
        positions = np.sort([float(normal @ np.array(h.ImagePositionPatient, dtype=float)) for h in headers])
    except AttributeError as err:
        raise ImageError(f"CT folder {folder} has DICOM slices without geometry ({err}): export the series "
                         "with ImagePositionPatient and ImageOrientationPatient on every slice") from err
    if len(orientations) > 1:
        raise ImageError(f"CT folder {folder} mixes {len(orientations)} slice orientations: it holds "
                         "more than one acquisition; keep the slices of one in the folder")
    gaps = np.diff(positions)
    if (gaps < 1e-3).any():
        raise ImageError(f"CT folder {folder} has {int((gaps < 1e-3).sum())} slice(s) at a position another "
                         "slice already holds: remove the duplicated slices")
    if gaps.max() > 1.5 * np.median(gaps):
        raise ImageError(f"CT folder {folder} has a gap of {gaps.max():.2f} mm between slices spaced "
                         f"{np.median(gaps):.2f} mm apart: slices are missing; export the complete series")


def _check_shape(path: Path, shape: Sequence[int]) -> None:
    """Raise ImageError unless `shape` (spatial axes first) is a single volume with >= 2 slices."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise ImageError(f"CT {path} is not a 3D volume (shape {shape}): give a 3D CT volume")
    if math.prod(shape[3:]) > 1:
        raise ImageError(
            f"CT {path} holds {math.prod(shape[3:])} volumes (shape {shape}): give a single 3D volume"
        )
    if min(shape[:3]) < 2:
        raise ImageError(
            f"CT {path} has a single slice (shape {shape}): give a 3D volume of at least 2 slices"
        )


def _geometry_from_affine(shape: Sequence[int], affine: np.ndarray) -> CTGeometry:
    """Shape and spacing reordered to the RAS axes, with the stored axis codes."""
    ras_axis = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    order = np.argsort(ras_axis)  # stored axis holding each of x, y, z
    sizes = nib.affines.voxel_sizes(affine)
    return CTGeometry(
        shape=tuple(int(shape[i]) for i in order),
        spacing=tuple(float(sizes[i]) for i in order),
        axcodes="".join(nib.aff2axcodes(affine)),
    )


# --------------------------------------------------------------------------------------------
# Preprocessing


class LoadCTd(MapTransform):
    """Load a NIfTI file or a DICOM series folder (HU, with its RAS affine) as a MetaTensor."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _read_ct(Path(d[key]))
        return d


def _read_ct(path: Path) -> MetaTensor:
    """Read a CT with MONAI's pydicom (folders) or nibabel (files) reader."""
    reader = PydicomReader() if path.is_dir() else NibabelReader()
    try:
        array, meta = reader.get_data(reader.read(path))
    except Exception as err:  # the readers raise many types; all mean "cannot read"
        raise ImageError(
            f"CT {path} cannot be read ({type(err).__name__}: {err}): give a NIfTI file "
            "(.nii/.nii.gz) or a folder holding one DICOM series"
        ) from err
    meta[ImageMetaKey.FILENAME_OR_OBJ] = str(path)
    return MetaTensor(np.asarray(array, dtype=np.float32), meta=meta)


class CheckCTd(MapTransform):
    """Raise ImageError (naming the file) for a non-3D, single-slice, non-finite or constant CT, or
    one that does not look like a head CT in Hounsfield units (:func:`check_hounsfield`)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image, source = d[key], _source(d[key])
            _check_shape(source, (*image.shape[1:], image.shape[0]))  # channel axis last
            if not torch.isfinite(image).all():
                raise ImageError(f"CT {source} contains NaN or infinite values: fix or re-export it")
            if image.min() == image.max():
                raise ImageError(
                    f"CT {source} is empty (every voxel is {float(image.min()):g}): "
                    "give a CT with image content"
                )
            check_hounsfield(np.asarray(image), source)
        return d


class CTWarning(UserWarning):
    """A CT that may be legitimate but does not look like the head CTs the model was made for."""


def check_hounsfield(hu: np.ndarray, source: Path) -> None:
    """Raise ImageError unless the volume looks like a head CT in Hounsfield units (air near -1000,
    brain 0-80 HU); warn (:class:`CTWarning`) when it has no bone, as after skull stripping."""
    sample = hu.reshape(-1)[:: max(1, hu.size // 200_000)]
    distinct = np.unique(sample)
    if len(distinct) <= 16 and distinct.min() >= 0 and np.all(distinct == np.round(distinct)):
        raise ImageError(f"CT {source} holds only {len(distinct)} distinct values ({_listed(distinct)}): "
                         "it looks like a label map or mask, not a CT; give the CT volume")
    scanned = sample[sample > PADDING_BELOW]  # scanners pad outside the field of view with -2000, -3024 ...
    low, high = np.percentile(scanned, [0.5, 99.5]) if scanned.size else (float(sample.min()),) * 2
    if low > -500:
        raise ImageError(f"CT {source} has no air (its lowest values are near {low:.0f}; air is near -1000 "
                         "HU): it is not in Hounsfield units (stored values without the rescale intercept, "
                         "an MR, or a normalised image); export the CT in HU")
    brain = float(((scanned >= 0) & (scanned <= 80)).mean()) if scanned.size else 0.0
    if brain < 0.005:
        raise ImageError(f"CT {source} has almost no voxel in the brain's range 0-80 HU ({brain:.1%}): "
                         "it is not a head CT in Hounsfield units (wrong units, offset or body part)")
    if high < 300:
        warnings.warn(f"CT {source} has no bone (99.5 % of its voxels are below {high:.0f} HU): is it "
                      "skull-stripped or cropped already? The preprocessing finds the brain inside the "
                      "skull", CTWarning, stacklevel=2)


def _listed(values: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:6])
    return shown + (", ..." if len(values) > 6 else "")


class BrainMaskd(Transform):
    """Add the intracranial mask of the HU volume under `key` as `mask_key` (see brain_mask)."""

    def __init__(self, key: str = "ct", mask_key: str = "brain") -> None:
        self.key, self.mask_key = key, mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = brain_mask(d[self.key][0].numpy())
        if not mask.any():
            lo, hi = INTRACRANIAL_HU
            raise ImageError(
                f"CT {_source(d[self.key])} has no brain (no region between {lo:g} and {hi:g} HU): "
                "give a head CT in Hounsfield units"
            )
        d[self.mask_key] = torch.from_numpy(mask[None])
        return d


class SkullStripd(Transform):
    """Set every voxel outside the brain mask to `fill` (the HU window's lower bound)."""

    def __init__(self, fill: float, key: str = "ct", mask_key: str = "brain") -> None:
        self.fill, self.key, self.mask_key = fill, key, mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d[self.key] = d[self.key].masked_fill(~d[self.mask_key], self.fill)
        return d


def brain_mask(hu: np.ndarray) -> np.ndarray:
    """Intracranial mask of a HU volume in RAS voxel order (axial slices along the last axis).

    As in the paper's code: threshold to intracranial HU, opening (in-plane: cuts thin links to
    scalp and neck tissue), largest connected component; then in-plane hole filling
    (calcifications and other bright spots inside the brain).
    """
    in_plane = ndimage.generate_binary_structure(2, 1)[:, :, None]
    lo, hi = INTRACRANIAL_HU
    mask = ndimage.binary_opening((hu >= lo) & (hu <= hi), structure=in_plane, iterations=2)
    components, n = ndimage.label(mask)
    if n == 0:
        return mask
    largest = 1 + np.argmax(np.bincount(components.ravel())[1:])
    return ndimage.binary_fill_holes(components == largest, structure=in_plane)


def _source(image: Any) -> Path:
    """The file a MetaTensor was loaded from (for messages)."""
    meta = getattr(image, "meta", {})
    return Path(str(meta.get(ImageMetaKey.FILENAME_OR_OBJ, "<in-memory array>")))


class _Pipeline(Compose):
    """A Compose that lets ichpro errors out as themselves, not wrapped in MONAI's RuntimeError."""

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as err:
            cause = _ichpro_cause(err)
            if cause is None:
                raise
            raise cause from cause.__cause__


def _ichpro_cause(err: BaseException | None) -> IchproError | None:
    """The IchproError in an exception's chain of causes, if any."""
    while err is not None and not isinstance(err, IchproError):
        err = err.__cause__
    return err


def _load_steps(keys: Sequence[str] = ("ct",)) -> dict[str, Transform]:
    """Named steps that load a CT (and a label mask) as (1, x, y, z) MetaTensors in RAS orientation."""
    steps = {"load": LoadCTd(keys=keys), "channel_first": EnsureChannelFirstd(keys=keys)}
    if "ct" in keys:
        steps["check"] = CheckCTd(keys="ct")
    if "blood" in keys:
        steps["split_labels"] = BloodChannelsd(key="blood")
    steps["orient_ras"] = Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS)
    return steps


class BloodChannelsd(Transform):
    """Label mask (0 background, 1 haematoma, 2 intraventricular blood) -> two float channels."""

    def __init__(self, key: str = "blood") -> None:
        self.key = key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        labels = d[self.key][0]
        d[self.key] = torch.stack([labels == 1, labels == 2]).float()
        return d


def preprocess_steps(cfg: PreprocessConfig, with_blood: bool = False) -> dict[str, Transform]:
    """The named preprocessing steps, in order (for notebooks showing each step's effect).

    ``with_blood`` also carries the label mask given as ``"blood"`` through every spatial step:
    the result is a (2, D, H, W) float tensor on the model grid whose channels are the share of
    each voxel that is parenchymal haematoma and intraventricular blood (area resizing averages
    the merged voxels, so the total volume is kept).
    """
    lo, hi = cfg.hu_window
    images = ["ct", "blood"] if with_blood else ["ct"]
    steps = _load_steps(images)
    if cfg.skull_strip or cfg.crop_to_brain:
        steps["brain_mask"] = BrainMaskd(key="ct", mask_key="brain")
    if cfg.skull_strip:
        steps["skull_strip"] = SkullStripd(fill=lo, key="ct", mask_key="brain")
    if cfg.crop_to_brain:
        steps["crop_to_brain"] = CropForegroundd(
            keys=[*images, "brain"], source_key="brain", start_coord_key=None, end_coord_key=None
        )
    if cfg.skull_strip or cfg.crop_to_brain:
        steps["drop_mask"] = DeleteItemsd(keys="brain")
    steps["window"] = ScaleIntensityRanged(
        keys="ct", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True
    )
    steps["to_model_axes"] = Orientationd(keys=images, axcodes=MODEL_AXCODES, labels=RAS_LABELS)
    # area interpolation averages the voxels it merges: anti-aliased shrinking at little cost
    steps["resize"] = Resized(keys=images, spatial_size=cfg.spatial_size, mode="area")
    steps["to_tensor"] = EnsureTyped(keys=images, dtype=torch.float32, track_meta=False)
    return steps


def preprocess_transforms(cfg: PreprocessConfig, with_blood: bool = False) -> Compose:
    """MONAI pipeline mapping {"ct": path} to a float32 (1, D, H, W) tensor; see the module docstring.

    With ``with_blood``, {"ct": path, "blood": mask path} also gives the (2, D, H, W) blood shares.
    """
    return _Pipeline(list(preprocess_steps(cfg, with_blood).values()))


def windowed(hu: float | Sequence[float] | np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU values as the ``window`` step maps them, ``(hu - low) / (high - low)``, before it clips to
    [0, 1] (so that a HU range, such as a display window, can also be read on the model's scale)."""
    lo, hi = window
    return (np.asarray(hu, dtype=float) - lo) / (hi - lo)


def load_ct(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a CT (NIfTI file or DICOM folder, checked: :class:`CheckCTd`) as a HU array in RAS voxel
    order and its affine."""
    return _load_volume(path, "ct")


def load_mask(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a label mask (such as a cohort's ``mask_path``) in RAS voxel order and its affine."""
    return _load_volume(path, "mask")


def _load_volume(path: str | Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    image = _Pipeline(list(_load_steps((key,)).values()))({key: str(path)})[key]
    return image[0].numpy(), image.affine.numpy()


# --------------------------------------------------------------------------------------------
# Datasets and folds


def config_hash(obj: Any) -> str:
    """Short stable hash (16 hex characters of sha256) of a dataclass, dict or string."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_dataset(df: pd.DataFrame, cfg: PreprocessConfig, cache_dir: Path | None = None) -> Dataset:
    """Dataset of {"ct", "label", "patient_id", "report"} items, each CT preprocessed once per
    (file contents' size and mtime, ``cfg``) into ``cache_dir/config_hash(cfg)`` (checked on read:
    :func:`ichpro.features.cached`)."""
    folder = None if cache_dir is None else Path(cache_dir) / config_hash(cfg)
    return PreprocessedCTs([_item(record) for record in df.to_dict("records")], cfg, folder)


class PreprocessedCTs(Dataset):
    """Manifest items with their CT preprocessed (``ct``: a (1, D, H, W) tensor), from the cache if there."""

    def __init__(self, items: list[dict[str, Any]], cfg: PreprocessConfig, folder: Path | None):
        self.items, self.folder, self.transform = items, folder, preprocess_transforms(cfg)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        key = cache_key("ct", path=item["ct"], size=item["ct_size"], mtime_ns=item["ct_mtime_ns"])
        tensors, _ = cached(self.folder, key, lambda: self.preprocess(item["ct"]))
        return {**item, "ct": tensors["ct"]}

    def preprocess(self, path: str) -> dict[str, torch.Tensor]:
        return {"ct": convert_to_tensor(self.transform({"ct": path})["ct"], track_meta=False)}


def _item(record: dict[Hashable, Any]) -> dict[str, Any]:
    """A dataset item before preprocessing; the CT's size and mtime make a changed file a cache miss."""
    path = Path(record["ct_path"])
    size, mtime_ns = _file_stamp(path)
    return {
        "ct": str(path),
        "label": int(record["label"]),
        "patient_id": str(record["patient_id"]),
        "report": str(record["report"]),
        "ct_size": size,
        "ct_mtime_ns": mtime_ns,
    }


def _file_stamp(path: Path) -> tuple[int, int]:
    """Total size and latest mtime (ns) of a file, or of a folder and the files in it."""
    stats = [path.stat()]
    if path.is_dir():
        stats += [p.stat() for p in path.iterdir() if p.is_file()]
    return sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)


def make_folds(labels: Sequence[int] | np.ndarray, n_splits: int = 5, seed: int = 0) -> np.ndarray:
    """Stratified fold index (0..n_splits-1) of each patient, shuffled with `seed`."""
    labels = np.asarray(labels)
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    if smallest < n_splits:
        raise IchproError(
            f"cannot make {n_splits} stratified folds: the rarer outcome has only {smallest} "
            f"patient(s); use at most {smallest} folds or add patients"
        )
    folds = np.empty(len(labels), dtype=int)
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        folds[held_out] = fold
    return folds
