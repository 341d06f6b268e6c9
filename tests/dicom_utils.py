"""Test helper: write a HU volume as a DICOM CT series the way a scanner would (LPS, one file per slice)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

RESCALE_INTERCEPT = -1024.0
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_dicom_series(hu: np.ndarray, affine: np.ndarray, folder: Path) -> list[Path]:
    """Write `hu` (RAS voxel order x, y, z; world affine in RAS) as one DICOM CT file per axial slice."""
    folder.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(hu, dtype=np.float32), affine)
    # Store the slices as scanners do: columns run to the patient's left, rows to the back.
    to_lps = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("LPS")
    )
    image = image.as_reoriented(to_lps)
    volume = np.asarray(image.dataobj)
    lps = LPS_FROM_RAS @ image.affine  # DICOM patient coordinates are LPS
    col_step, row_step, slice_step = (np.linalg.norm(lps[:3, i]) for i in range(3))
    orientation = [*(lps[:3, 0] / col_step), *(lps[:3, 1] / row_step)]
    series = {name: generate_uid() for name in ("Study", "Series", "FrameOfReference")}
    paths = []
    for k in range(volume.shape[2]):
        position = (lps @ [0.0, 0.0, k, 1.0])[:3]
        # pixel_array[row, column] with the column index along x and the row index along y
        pixels = np.round(volume[:, :, k].T - RESCALE_INTERCEPT).astype(np.int16)
        ds = _ct_slice(pixels, series)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
        ds.PixelSpacing = [round(float(row_step), 6), round(float(col_step), 6)]
        ds.SliceThickness = round(float(slice_step), 6)
        path = folder / f"slice_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ct_slice(pixels: np.ndarray, series: dict[str, str]) -> Dataset:
    """One CT Image Storage dataset with file meta, holding int16 stored values (HU = value - 1024)."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = series["Study"]
    ds.SeriesInstanceUID = series["Series"]
    ds.FrameOfReferenceUID = series["FrameOfReference"]
    ds.Modality = "CT"
    ds.PatientID = "TEST"
    ds.PatientName = "Test^Phantom"
    ds.SeriesNumber = 1
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=16)
    return ds
