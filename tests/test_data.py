"""Tests of ichpro.data: manifests, CT preprocessing, cached datasets and folds."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from dicom_utils import write_dicom_series

from ichpro.config import BRAIN_WINDOW, PAPER_WINDOW, PreprocessConfig
from ichpro.data import (
    LoadCTd,
    config_hash,
    load_ct,
    make_dataset,
    make_folds,
    preprocess_steps,
    preprocess_transforms,
)
from ichpro.errors import IchproError, ImageError, ManifestError
from ichpro.manifest import check_manifest, load_manifest, summarize_manifest

CFG = PreprocessConfig(spatial_size=(16, 64, 64))
BLOB_HU = 70.0
RAS_TO_LPS = nib.orientations.ornt_transform(
    nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("LPS")
)


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """A 32x32x12 head (RAS voxel order): 30 HU brain in a 1000 HU skull, air outside, and a
    70 HU blob towards the patient's right, front and top so that orientation errors show."""
    x, y, z = np.meshgrid(
        np.arange(32) - 15.5, np.arange(32) - 15.5, np.arange(12) - 5.5, indexing="ij"
    )
    radius = np.sqrt((x / 13) ** 2 + (y / 14) ** 2 + (z / 6.5) ** 2)
    hu = np.where(radius < 0.8, 30.0, np.where(radius < 1.0, 1000.0, -1000.0))
    hu[(x - 5) ** 2 + (y - 6) ** 2 + (z - 2) ** 2 <= 5] = BLOB_HU
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    affine[:3, 3] = [-12.0, -14.0, -30.0]
    return hu.astype(np.float32), affine


def save_nifti(path: Path, hu: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write a float32 NIfTI file (identity affine if none is given) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(hu, dtype=np.float32), affine), path)
    return path


def write_cohort(tmp_path: Path, n: int = 4) -> Path:
    """A valid manifest of n patients with relative paths; odd patients have a report file."""
    hu, affine = phantom()
    rows = []
    for i in range(n):
        save_nifti(tmp_path / "ct" / f"p{i}.nii.gz", hu, affine)
        row = {"patient_id": f"P{i}", "ct_path": f"ct/p{i}.nii.gz", "label": i % 2, "age": 60 + i}
        if i % 2:
            (tmp_path / "reports").mkdir(exist_ok=True)
            (tmp_path / "reports" / f"p{i}.txt").write_text(f"Report of patient {i}.\n")
            row["report_path"] = f"reports/p{i}.txt"
        else:
            row["report"] = f"Patient {i}: left basal ganglia haemorrhage."
        rows.append(row | {"sex": "F"})
    return write_manifest(tmp_path, rows)


def write_manifest(tmp_path: Path, rows: list[dict]) -> Path:
    """Write rows as manifest.csv in tmp_path."""
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def edit_manifest(path: Path, row: int, **values: object) -> None:
    """Set cells of one data row (1-based spreadsheet row number: the first data row is row 2)."""
    df = pd.read_csv(path, dtype=str)
    for column, value in values.items():
        df.loc[row - 2, column] = value
    df.to_csv(path, index=False)


# ---------------------------------------------------------------------------- manifests


def test_good_manifest_loads(tmp_path: Path) -> None:
    df = load_manifest(write_cohort(tmp_path))
    assert list(df["patient_id"]) == ["P0", "P1", "P2", "P3"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["ct_path"])
    assert df.loc[1, "report"] == "Report of patient 1."
    assert df.loc[0, "report"].startswith("Patient 0:")
    assert df["label"].dtype == np.int64 and list(df["label"]) == [0, 1, 0, 1]
    assert df["age"].dtype == float and df["age"].tolist() == [60.0, 61.0, 62.0, 63.0]
    assert list(df["sex"]) == ["F"] * 4  # other columns pass through


def test_gos_gives_label_and_dicom_folder_is_accepted(tmp_path: Path) -> None:
    hu, affine = phantom()
    write_dicom_series(hu, affine, tmp_path / "dicom")
    rows = [
        {"patient_id": f"G{gos}", "ct_path": "dicom", "gos": gos, "report": "text", "age": ""}
        for gos in (1, 2, 3, 4, 5)
    ]
    df = load_manifest(write_manifest(tmp_path, rows))
    assert list(df["label"]) == [1, 1, 1, 0, 0]
    assert df["age"].isna().all()


def test_check_manifest_returns_nothing_for_a_good_manifest(tmp_path: Path) -> None:
    path = write_cohort(tmp_path)
    assert check_manifest(pd.read_csv(path, dtype=str), tmp_path) == []


def _broken_ct(tmp_path: Path, kind: str) -> str:
    """Relative path to a CT that is bad in the given way."""
    if kind == "text":
        (tmp_path / "ct" / "bad.nii.gz").write_text("not an image")
        return "ct/bad.nii.gz"
    if kind == "png":
        (tmp_path / "ct" / "slice.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        return "ct/slice.png"
    if kind == "2d":
        save_nifti(tmp_path / "ct" / "flat.nii.gz", np.zeros((8, 8)))
        return "ct/flat.nii.gz"
    if kind == "one_slice":
        save_nifti(tmp_path / "ct" / "one.nii.gz", np.zeros((8, 8, 1)))
        return "ct/one.nii.gz"
    (tmp_path / "ct" / "notdicom").mkdir()
    (tmp_path / "ct" / "notdicom" / "readme.txt").write_text("no dicom here")
    return "ct/notdicom"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("text", r"bad\.nii\.gz cannot be read as NIfTI .*: re-export it"),
        ("png", r"slice\.png is neither a NIfTI file .*: convert it to NIfTI"),
        ("2d", r"flat\.nii\.gz is not a 3D volume \(shape \(8, 8\)\): give a 3D CT volume"),
        ("one_slice", r"one\.nii\.gz has a single slice .*: give a 3D volume of at least 2"),
        ("folder", r"notdicom holds no readable DICOM file: give a folder"),
    ],
)
def test_unusable_ct_is_reported(tmp_path: Path, kind: str, message: str) -> None:
    path = write_cohort(tmp_path)
    edit_manifest(path, 3, ct_path=_broken_ct(tmp_path, kind))
    with pytest.raises(ManifestError, match=r"row 3 \(patient 'P1'\): CT .*" + message):
        load_manifest(path)


@pytest.mark.parametrize(
    ("row", "values", "message"),
    [
        (3, {"patient_id": ""}, r"row 3: patient_id is empty: give every row a unique"),
        (4, {"patient_id": "P0"}, r"'P0'\): patient_id 'P0' is already used on row 2: give each"),
        (2, {"ct_path": "ct/gone.nii.gz"}, r"'P0'\): CT .*gone\.nii\.gz does not exist: fix its path"),
        (2, {"ct_path": ""}, r"'P0'\): ct_path is empty: give the path"),
        (5, {"label": "2"}, r"'P3'\): label is '2': set it to 0 \(good outcome\) or 1"),
        (5, {"label": ""}, r"'P3'\): label is empty: set it to 0"),
        (2, {"report": " "}, r"'P0'\): the report is empty: write the clinical report"),
        (3, {"report_path": "reports/none.txt"}, r"'P1'\): report file .*none\.txt does not exist"),
        (4, {"age": "forty"}, r"'P2'\): age is 'forty', not a number: write a number"),
        (3, {"gos": "5"}, r"'P1'\): label 1 contradicts gos 5 \(bad outcome = GOS <= 3\): fix one"),
    ],
)
def test_row_problem_is_reported(tmp_path: Path, row: int, values: dict, message: str) -> None:
    path = write_cohort(tmp_path)
    edit_manifest(path, row, **values)
    where = rf"\nrow {row} \(patient " if message.startswith("'") else "\n"
    with pytest.raises(ManifestError, match=where + message):
        load_manifest(path)


def test_empty_report_file_and_bad_gos_are_reported(tmp_path: Path) -> None:
    hu, affine = phantom()
    save_nifti(tmp_path / "ct.nii.gz", hu, affine)
    (tmp_path / "empty.txt").write_text("\n")
    rows = [
        {"patient_id": "A", "ct_path": "ct.nii.gz", "gos": 7, "report_path": "empty.txt"},
    ]
    with pytest.raises(ManifestError) as caught:
        load_manifest(write_manifest(tmp_path, rows))
    assert "row 2 (patient 'A'): gos is '7': set it to the Glasgow Outcome Scale" in str(caught.value)
    assert re.search(r"row 2 \(patient 'A'\): report file .*empty\.txt is empty: write", str(caught.value))


@pytest.mark.parametrize(
    ("dropped", "renamed", "message"),
    [
        (["label"], {}, r"lacks a 'label' column .* or a 'gos' column .*: add it\."),
        (["report", "report_path"], {}, r"lacks a 'report' column .* or a 'report_path' column"),
        (["ct_path"], {}, r"lacks a 'ct_path' column"),
        ([], {"label": "Label"}, r"add it \(rename column 'Label' to 'label'\?\)"),
    ],
)
def test_missing_column_is_reported(
    tmp_path: Path, dropped: list[str], renamed: dict[str, str], message: str
) -> None:
    path = write_cohort(tmp_path)
    pd.read_csv(path, dtype=str).drop(columns=dropped).rename(columns=renamed).to_csv(path, index=False)
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write_cohort(tmp_path)
    edit_manifest(path, 2, label="yes", age="old")
    edit_manifest(path, 5, ct_path="ct/nowhere.nii.gz")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"manifest {path} has 3 problem(s):"
    assert [line.split(":")[0] for line in lines[1:]] == [
        "row 2 (patient 'P0')",
        "row 2 (patient 'P0')",
        "row 5 (patient 'P3')",
    ]


def test_blank_line_is_reported_not_dropped(tmp_path: Path) -> None:
    path = write_cohort(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:3], "", *lines[3:]]) + "\n")
    with pytest.raises(ManifestError, match=r"has 1 problem\(s\):\nrow 4: the row is empty: delete it"):
        load_manifest(path)


def test_missing_or_empty_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.csv")
    (tmp_path / "header_only.csv").write_text("patient_id,ct_path,label,report\n")
    with pytest.raises(ManifestError, match="has no patients: add one row per patient"):
        load_manifest(tmp_path / "header_only.csv")


def test_summary_mentions_counts_balance_and_geometry(tmp_path: Path) -> None:
    path = write_cohort(tmp_path, n=4)
    hu, affine = phantom()
    lps = nib.Nifti1Image(hu, affine).as_reoriented(RAS_TO_LPS)
    nib.save(lps, tmp_path / "ct" / "p3.nii.gz")
    edit_manifest(path, 3, age="")
    summary = summarize_manifest(load_manifest(path))
    assert "patients: 4" in summary
    assert "2 good (50.0%), 2 bad (50.0%)" in summary
    assert "32×32×12 to 32×32×12" in summary  # same RAS size whatever the storage order
    assert "0.80×0.80×5.00" in summary
    assert "RAS (3), LPS (1)" in summary
    assert "age (3/4 filled)" in summary and "sex" in summary


# ---------------------------------------------------------------------------- preprocessing


def test_output_shape_and_range(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "ct.nii.gz", *phantom())
    for cfg in (CFG, PreprocessConfig(spatial_size=(8, 24, 20), hu_window=BRAIN_WINDOW)):
        ct = preprocess_transforms(cfg)({"ct": str(path)})["ct"]
        assert type(ct) is torch.Tensor and ct.dtype == torch.float32
        assert ct.shape == (1, *cfg.spatial_size)
        assert ct.min() >= 0.0 and ct.max() <= 1.0


def test_skull_stripping_removes_bone(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "ct.nii.gz", *phantom())
    with_bone = PreprocessConfig(spatial_size=(16, 64, 64), skull_strip=False, crop_to_brain=False)
    assert preprocess_transforms(with_bone)({"ct": str(path)})["ct"].max() == 1.0
    stripped = preprocess_transforms(CFG)({"ct": str(path)})["ct"]
    blob = (BLOB_HU - PAPER_WINDOW[0]) / (PAPER_WINDOW[1] - PAPER_WINDOW[0])
    assert stripped.max() == pytest.approx(blob, abs=1e-4)  # nothing brighter than the blob


def test_ras_lps_and_dicom_give_identical_tensors(tmp_path: Path) -> None:
    hu, affine = phantom()
    ras = save_nifti(tmp_path / "ras.nii.gz", hu, affine)
    lps_image = nib.Nifti1Image(hu, affine).as_reoriented(RAS_TO_LPS)
    assert nib.aff2axcodes(lps_image.affine) == ("L", "P", "S")
    lps = tmp_path / "lps.nii.gz"
    nib.save(lps_image, lps)
    write_dicom_series(hu, affine, tmp_path / "dicom")
    for cfg in (PreprocessConfig(skull_strip=False, crop_to_brain=False), CFG):
        transform = preprocess_transforms(cfg)
        a, b, c = (transform({"ct": str(p)})["ct"] for p in (ras, lps, tmp_path / "dicom"))
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    # axis convention: the blob (brightest after skull stripping) lies in the upper slices,
    # the front rows and the columns of the patient's right
    d, h, w = np.unravel_index(int(a[0].argmax()), a.shape[1:])
    assert d >= 8 and h < 32 and w < 32


def test_blood_mask_follows_the_ct_and_keeps_its_volume(tmp_path: Path) -> None:
    hu, affine = phantom()
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[hu == BLOB_HU] = 1
    labels[14:17, 14:17, 5] = 2
    ct_path = save_nifti(tmp_path / "ct.nii.gz", hu, affine)
    lps = nib.Nifti1Image(labels, affine).as_reoriented(RAS_TO_LPS)  # stored in another orientation
    nib.save(lps, tmp_path / "mask.nii.gz")
    blood = str(tmp_path / "mask.nii.gz")
    out = preprocess_transforms(CFG, with_blood=True)({"ct": str(ct_path), "blood": blood})
    assert out["blood"].shape == (2, *CFG.spatial_size) and out["blood"].dtype == torch.float32
    assert torch.equal(out["ct"], preprocess_transforms(CFG)({"ct": str(ct_path)})["ct"])
    cropped = {"ct": str(ct_path)}
    for name, step in preprocess_steps(CFG).items():
        cropped = step(cropped)
        if name == "crop_to_brain":
            break
    voxels_per_cell = np.prod(cropped["ct"].shape[1:]) / np.prod(CFG.spatial_size)
    volumes = out["blood"].sum(dim=(1, 2, 3)).numpy() * voxels_per_cell
    # this small phantom is up-sampled (nearest-like rounding); shrinking a real CT averages exactly
    np.testing.assert_allclose(volumes, [(labels == 1).sum(), (labels == 2).sum()], rtol=0.15)
    # the haematoma share is highest where the CT shows the blob
    assert out["ct"][0].flatten()[out["blood"][0].flatten().argmax()] > 0.1


def test_load_ct_returns_hu_in_ras_order(tmp_path: Path) -> None:
    hu, affine = phantom()
    write_dicom_series(hu, affine, tmp_path / "dicom")
    array, loaded_affine = load_ct(tmp_path / "dicom")
    np.testing.assert_array_equal(array, hu)
    np.testing.assert_allclose(loaded_affine, affine, atol=1e-5)


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        (np.where(np.arange(6 * 6 * 4).reshape(6, 6, 4) == 5, np.nan, 30.0), "NaN or infinite"),
        (np.zeros((6, 6, 4)), r"is empty \(every voxel is 0\)"),
        (np.full((6, 6, 1), 30.0), "has a single slice"),
    ],
)
def test_unusable_volume_raises_image_error(tmp_path: Path, volume: np.ndarray, message: str) -> None:
    path = save_nifti(tmp_path / "broken.nii.gz", volume)
    with pytest.raises(ImageError, match=rf"CT {re.escape(str(path))} .*{message}"):
        preprocess_transforms(CFG)({"ct": str(path)})


def test_image_error_passes_through_datasets(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "broken.nii.gz", np.zeros((6, 6, 4)))
    df = pd.DataFrame([{"patient_id": "X", "ct_path": str(path), "label": 0, "report": "r"}])
    with pytest.raises(ImageError, match="broken.nii.gz is empty"):
        make_dataset(df, CFG, tmp_path / "cache")[0]


# ---------------------------------------------------------------------------- datasets and folds


def test_dataset_items(tmp_path: Path) -> None:
    df = load_manifest(write_cohort(tmp_path, n=2))
    item = make_dataset(df, CFG, cache_dir=None)[1]
    assert item["ct"].shape == (1, 16, 64, 64)
    assert (item["label"], item["patient_id"], item["report"]) == (1, "P1", "Report of patient 1.")


def test_cache_is_reused_and_keyed_by_config_and_file(tmp_path: Path, monkeypatch) -> None:
    df = load_manifest(write_cohort(tmp_path, n=3))
    cache = tmp_path / "cache"
    first = [item["ct"] for item in make_dataset(df, CFG, cache)]
    folder = cache / config_hash(CFG)
    assert len(list(folder.glob("*.safetensors"))) == 3

    def no_loading(self, data):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(LoadCTd, "__call__", no_loading)
        again = [item["ct"] for item in make_dataset(df, CFG, cache)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))

    other = PreprocessConfig(spatial_size=(8, 32, 32))
    assert make_dataset(df, other, cache)[0]["ct"].shape == (1, 8, 32, 32)
    assert {p.name for p in cache.iterdir()} == {config_hash(CFG), config_hash(other)}

    changed = Path(df.loc[0, "ct_path"])
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    make_dataset(df, CFG, cache)[0]
    assert len(list(folder.glob("*.safetensors"))) == 4


def test_config_hash_is_short_and_stable() -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", config_hash(CFG))
    assert config_hash(CFG) == config_hash(PreprocessConfig(spatial_size=(16, 64, 64)))
    assert config_hash(CFG) != config_hash(PreprocessConfig(skull_strip=False))
    assert config_hash({"b": 1, "a": 2}) == config_hash({"a": 2, "b": 1})


def test_folds_are_stratified_and_seeded() -> None:
    labels = np.array([1] * 66 + [0] * 54)  # 120 patients, 55 % bad outcome
    folds = make_folds(labels, n_splits=5, seed=0)
    assert folds.shape == (120,) and set(folds) == {0, 1, 2, 3, 4}
    assert np.bincount(folds).tolist() == [24] * 5  # each patient in exactly one fold
    for fold in range(5):
        assert abs(labels[folds == fold].mean() - labels.mean()) <= 0.05
    np.testing.assert_array_equal(folds, make_folds(labels, n_splits=5, seed=0))
    assert not np.array_equal(folds, make_folds(labels, n_splits=5, seed=1))


def test_folds_need_enough_patients_per_class() -> None:
    with pytest.raises(IchproError, match="only 2 patient"):
        make_folds([0] * 10 + [1] * 2, n_splits=5)


def test_collate_items_stacks_cts_tokenises_reports_and_masks(tmp_path):
    from ichpro.batches import collate_items
    from ichpro.text import load_text_backbone

    reports = ["Age: 70\nGCS Score: 9", "Age: 55\nGCS Score: 15\nPosition: Left thalamic hemorrhage"]
    backbone = load_text_backbone("tiny", reports=reports * 3)
    items = [{"ct": torch.rand(1, 4, 8, 8), "label": i, "patient_id": f"P{i}", "report": r}
             for i, r in enumerate(reports)]
    batch = collate_items(items, backbone.tokenizer, mlm_probability=0.15,
                          generator=torch.Generator().manual_seed(0))
    assert batch["ct"].shape == (2, 1, 4, 8, 8) and batch["labels"].tolist() == [0, 1]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["mlm_labels"].shape
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # padded
    assert (batch["mlm_labels"] != -100).any(dim=1).all()
    assert "mlm_input_ids" not in collate_items(items, backbone.tokenizer)
