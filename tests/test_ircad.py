"""Tests of liverseg.data.ircad on tiny DICOM series and NIfTI pairs written by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from liverseg.data.dicom import read_series_folder
from liverseg.data.ircad import collect_cases, convert_dicom_tree
from liverseg.data.volumes import load_case
from liverseg.errors import DataError
from test_layout import nifti_pair

COLS, ROWS, N_SLICES = 12, 10, 6
PIXEL_SPACING = (0.8, 0.6)  # DICOM order: between rows (mm), between columns (mm)
SLICE_GAP = 2.5
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# File image_m holds slice FILE_ORDER[m]: neither file-name order nor string order is anatomy.
FILE_ORDER = (3, 0, 5, 1, 4, 2)


def pattern(offset: int = 1000) -> np.ndarray:
    """Stored values [i, j, k] = offset + 200 k + 12 j + i: unique, so any mix-up shows."""
    i, j, k = np.meshgrid(np.arange(COLS), np.arange(ROWS), np.arange(N_SLICES), indexing="ij")
    return offset + 200 * k + 12 * j + i


def axial_positions(z0: float = 20.0, gap: float = SLICE_GAP) -> list[tuple[float, float, float]]:
    return [(-100.0, -50.0, z0 + gap * k) for k in range(N_SLICES)]


def write_slice(
    path: Path,
    stored_ij: np.ndarray,
    *,
    position: tuple[float, float, float],
    orientation: tuple[float, ...] = AXIAL,
    pixel_spacing: tuple[float, float] = PIXEL_SPACING,
    slope: float = 1.0,
    intercept: float = -1024.0,
    pixel_representation: int = 0,
    explicit: bool = False,
) -> None:
    """Write one CT slice; ``stored_ij`` is [column, row], as the loader's contract."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored_ij.shape[1], stored_ij.shape[0]
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.ImagePositionPatient = [f"{v:g}" for v in position]
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.SliceThickness = f"{SLICE_GAP:g}"
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = pixel_representation
    dtype = "<i2" if pixel_representation else "<u2"
    ds.PixelData = np.ascontiguousarray(stored_ij.T).astype(dtype).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(
    folder: Path,
    stored: np.ndarray,
    positions: list[tuple[float, float, float]],
    **kwargs: Any,
) -> None:
    """Write stored[:, :, k] at positions[k] into files image_m, shuffled by FILE_ORDER."""
    folder.mkdir(parents=True, exist_ok=True)
    for m, k in enumerate(FILE_ORDER[: stored.shape[2]]):
        write_slice(folder / f"image_{m}", stored[:, :, k], position=positions[k], **kwargs)


# ---------------------------------------------------------------------------- DICOM reading
@pytest.mark.parametrize(
    ("pixel_representation", "offset", "slope", "intercept", "explicit"),
    [
        (0, 1000, 1.0, -1024.0, False),  # unsigned storage, the usual CT rescale
        (1, -1500, 2.0, -10.0, True),  # signed storage with negative values, slope 2
        (0, 0, 0.5, -1000.0, False),  # fractional HU
    ],
)
def test_series_order_and_hu(
    tmp_path: Path,
    pixel_representation: int,
    offset: int,
    slope: float,
    intercept: float,
    explicit: bool,
) -> None:
    stored = pattern(offset)
    write_series(
        tmp_path / "s",
        stored,
        axial_positions(),
        slope=slope,
        intercept=intercept,
        pixel_representation=pixel_representation,
        explicit=explicit,
    )
    hu = read_series_folder(tmp_path / "s").hu
    assert hu.shape == (COLS, ROWS, N_SLICES)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, (slope * stored + intercept).astype(np.float32))


@pytest.mark.parametrize(
    ("i", "j", "k", "expected_hu"),
    [
        (0, 0, 0, -24.0),  # 1000 - 1024
        (2, 3, 4, 814.0),  # 1000 + 800 + 36 + 2 - 1024
        (11, 9, 5, 1095.0),  # 1000 + 1000 + 108 + 11 - 1024
        (11, 0, 0, -13.0),  # column index moves along i
        (0, 9, 0, 84.0),  # row index moves along j
    ],
)
def test_series_voxel_values(tmp_path: Path, i: int, j: int, k: int, expected_hu: float) -> None:
    write_series(tmp_path / "s", pattern(1000), axial_positions())
    hu = read_series_folder(tmp_path / "s").hu
    assert hu[i, j, k] == expected_hu


# RAS affines worked out by hand: column spacing 0.6 along the first cosine, row spacing 0.8
# along the second, the slice step along the normal, and x, y negated (LPS -> RAS).
AXIAL_RAS = [
    [-0.6, 0.0, 0.0, 100.0],
    [0.0, -0.8, 0.0, 50.0],
    [0.0, 0.0, 2.5, 20.0],
    [0.0, 0.0, 0.0, 1.0],
]
# Second cosine (0, -1, 0): normal (0, 0, -1), so slices run towards decreasing z.
FLIPPED_RAS = [
    [-0.6, 0.0, 0.0, 100.0],
    [0.0, 0.8, 0.0, 50.0],
    [0.0, 0.0, -2.5, 20.0],
    [0.0, 0.0, 0.0, 1.0],
]
# Coronal: cosines (1, 0, 0), (0, 0, -1); normal (0, 1, 0); origin LPS (-100, 10, 50).
CORONAL_RAS = [
    [-0.6, 0.0, 0.0, 100.0],
    [0.0, 0.0, -3.0, -10.0],
    [0.0, -0.8, 0.0, 50.0],
    [0.0, 0.0, 0.0, 1.0],
]


@pytest.mark.parametrize(
    ("orientation", "positions", "expected"),
    [
        (AXIAL, axial_positions(), AXIAL_RAS),
        (
            (1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
            [(-100.0, -50.0, 20.0 - 2.5 * k) for k in range(N_SLICES)],
            FLIPPED_RAS,
        ),
        (
            (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
            [(-100.0, 10.0 + 3.0 * k, 50.0) for k in range(N_SLICES)],
            CORONAL_RAS,
        ),
    ],
)
def test_series_affine(
    tmp_path: Path,
    orientation: tuple[float, ...],
    positions: list[tuple[float, float, float]],
    expected: list[list[float]],
) -> None:
    stored = pattern()
    write_series(tmp_path / "s", stored, positions, orientation=orientation)
    series = read_series_folder(tmp_path / "s")
    hu, affine = series.hu, series.affine
    np.testing.assert_allclose(affine, np.array(expected), atol=1e-9)
    # Slices follow the normal, not the files: slice k is still pattern slice k.
    np.testing.assert_array_equal(hu, stored - 1024.0)


def test_series_ignores_hidden_files(tmp_path: Path) -> None:
    write_series(tmp_path / "s", pattern(), axial_positions())
    (tmp_path / "s" / ".DS_Store").write_bytes(b"\0\1junk")
    hu = read_series_folder(tmp_path / "s").hu
    assert hu.shape == (COLS, ROWS, N_SLICES)


def test_series_without_preamble(tmp_path: Path) -> None:
    # Bare data sets (no 128-byte preamble, no "DICM", no file meta) are still read.
    write_series(tmp_path / "s", pattern(), axial_positions())
    path = tmp_path / "s" / "image_0"
    ds = pydicom.dcmread(path)
    ds.preamble = None
    del ds.file_meta
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    hu = read_series_folder(tmp_path / "s").hu
    np.testing.assert_array_equal(hu, pattern() - 1024.0)


def test_series_single_slice_uses_thickness(tmp_path: Path) -> None:
    stored = pattern()[:, :, :1]
    (tmp_path / "s").mkdir()
    write_slice(tmp_path / "s" / "image_0", stored[:, :, 0], position=axial_positions()[0])
    series = read_series_folder(tmp_path / "s")
    hu, affine = series.hu, series.affine
    assert hu.shape == (COLS, ROWS, 1)
    np.testing.assert_allclose(affine, np.array(AXIAL_RAS), atol=1e-9)


# ------------------------------------------------------------------------ DICOM bad inputs
def test_series_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.*does not exist"):
        read_series_folder(tmp_path / "nope")


def test_series_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no files"):
        read_series_folder(tmp_path / "empty")


def test_series_unreadable_file(tmp_path: Path) -> None:
    write_series(tmp_path / "s", pattern(), axial_positions())
    (tmp_path / "s" / "image_3").write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(DataError, match="image_3"):
        read_series_folder(tmp_path / "s")


def test_series_missing_attribute(tmp_path: Path) -> None:
    write_series(tmp_path / "s", pattern(), axial_positions())
    write_slice(tmp_path / "s" / "image_2", pattern()[:, :, 0], position=(0.0, 0.0, 0.0))
    ds = pydicom.dcmread(tmp_path / "s" / "image_2")
    del ds.ImagePositionPatient
    ds.save_as(tmp_path / "s" / "image_2")
    with pytest.raises(DataError, match="image_2.*ImagePositionPatient is missing"):
        read_series_folder(tmp_path / "s")


def test_series_mixed_shapes(tmp_path: Path) -> None:
    write_series(tmp_path / "s", pattern(), axial_positions())
    small = np.zeros((COLS, ROWS - 2), dtype=np.int64)
    write_slice(tmp_path / "s" / "image_4", small, position=axial_positions()[FILE_ORDER[4]])
    with pytest.raises(DataError, match="mixed slice shapes.*image_4"):
        read_series_folder(tmp_path / "s")


def test_series_duplicate_position(tmp_path: Path) -> None:
    positions = axial_positions()
    positions[FILE_ORDER[5]] = positions[FILE_ORDER[1]]  # image_5 lands on image_1's slice
    write_series(tmp_path / "s", pattern(), positions)
    with pytest.raises(DataError, match=r"duplicate slice position.*image_[15].*image_[15]"):
        read_series_folder(tmp_path / "s")


@pytest.mark.parametrize(
    "z",
    [
        (0.0, 2.5, 5.0, 7.5, 12.5, 15.0),  # one slice missing: a 5 mm gap
        (0.0, 2.5, 5.0, 7.6, 10.0, 12.5),  # 0.1 mm off: 4 % of the gap
    ],
)
def test_series_non_uniform_spacing(tmp_path: Path, z: tuple[float, ...]) -> None:
    write_series(tmp_path / "s", pattern(), [(-100.0, -50.0, zk) for zk in z])
    with pytest.raises(DataError, match="s: slice spacing is not uniform"):
        read_series_folder(tmp_path / "s")


def test_series_within_spacing_tolerance(tmp_path: Path) -> None:
    # DS rounding (1e-3 mm) is far inside the 1 % tolerance: accepted, mean step used.
    z = (0.0, 2.501, 5.0, 7.499, 10.0, 12.5)
    write_series(tmp_path / "s", pattern(), [(-100.0, -50.0, zk) for zk in z])
    affine = read_series_folder(tmp_path / "s").affine
    assert affine[2, 2] == pytest.approx(2.5)


# --------------------------------------------------------------------------- DICOM tree
def liver_mask() -> np.ndarray:
    """0/255 mask with a 4 x 3 x 2 box of liver (24 voxels)."""
    mask = np.zeros((COLS, ROWS, N_SLICES), dtype=np.int64)
    mask[2:6, 3:6, 1:3] = 255
    return mask


def write_patient(case_dir: Path, *, mask_gap: float = SLICE_GAP) -> None:
    write_series(case_dir / "PATIENT_DICOM", pattern(), axial_positions())
    write_series(
        case_dir / "MASKS_DICOM" / "liver",
        liver_mask(),
        axial_positions(gap=mask_gap),
        intercept=0.0,
    )


def test_convert_dicom_tree(tmp_path: Path) -> None:
    root = tmp_path / "unpacked" / "3Dircadb1"
    write_patient(root / "3Dircadb1.10")
    write_patient(root / "3Dircadb1.2")
    out = tmp_path / "out"
    assert convert_dicom_tree(tmp_path / "unpacked", out) == ["e02", "e10"]
    assert sorted(p.name for p in out.iterdir()) == [
        "ircad_e02_liver.nii.gz",
        "ircad_e02_orig.nii.gz",
        "ircad_e10_liver.nii.gz",
        "ircad_e10_orig.nii.gz",
    ]
    case = load_case(out / "ircad_e02_orig.nii.gz", out / "ircad_e02_liver.nii.gz", case_id="e02")
    assert case.case_id == "e02"
    assert case.image.spacing == pytest.approx((0.6, 0.8, 2.5))
    # RAS canonical order flips the column and row axes of the LPS-stored DICOM grid.
    np.testing.assert_array_equal(case.image.data, (pattern() - 1024.0)[::-1, ::-1, :])
    np.testing.assert_array_equal(case.mask.data, (liver_mask() // 255)[::-1, ::-1, :])
    raw_mask = np.asarray(nib.load(out / "ircad_e02_liver.nii.gz").dataobj)
    assert raw_mask.dtype == np.uint8
    assert set(np.unique(raw_mask).tolist()) == {0, 1}
    assert int(raw_mask.sum()) == 24
    np.testing.assert_allclose(nib.load(out / "ircad_e02_orig.nii.gz").affine, AXIAL_RAS)


def test_convert_nested_wrapper_folder(tmp_path: Path) -> None:
    write_patient(tmp_path / "3Dircadb1.1" / "3Dircadb1.1")
    assert convert_dicom_tree(tmp_path, tmp_path / "out") == ["e01"]


def test_convert_no_patients(tmp_path: Path) -> None:
    (tmp_path / "src" / "something").mkdir(parents=True)
    with pytest.raises(DataError, match="src: no 3Dircadb1.N patient folders"):
        convert_dicom_tree(tmp_path / "src", tmp_path / "out")


def test_convert_mask_geometry_mismatch(tmp_path: Path) -> None:
    write_patient(tmp_path / "3Dircadb1.3", mask_gap=2.0)
    with pytest.raises(DataError, match="liver: mask affine differs .* not on one grid"):
        convert_dicom_tree(tmp_path, tmp_path / "out")


def test_convert_missing_mask_folder(tmp_path: Path) -> None:
    write_series(tmp_path / "3Dircadb1.4" / "PATIENT_DICOM", pattern(), axial_positions())
    with pytest.raises(DataError, match="3Dircadb1.4/MASKS_DICOM: expected DICOM series folder"):
        convert_dicom_tree(tmp_path, tmp_path / "out")


def test_convert_still_zipped(tmp_path: Path) -> None:
    (tmp_path / "3Dircadb1.5").mkdir()
    (tmp_path / "3Dircadb1.5" / "PATIENT_DICOM.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match="PATIENT_DICOM.zip: series is still zipped"):
        convert_dicom_tree(tmp_path, tmp_path / "out")


def test_convert_duplicate_patient(tmp_path: Path) -> None:
    write_patient(tmp_path / "a" / "3Dircadb1.6")
    write_patient(tmp_path / "b" / "3Dircadb1.6")
    with pytest.raises(DataError, match=r"duplicate case e06.*a/3Dircadb1\.6"):
        convert_dicom_tree(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("mask_values", "match"),
    [
        (np.full((COLS, ROWS, N_SLICES), 7), "liver: mask is not binary"),
        (np.zeros((COLS, ROWS, N_SLICES), dtype=np.int64), "liver: empty liver mask"),
    ],
)
def test_convert_bad_mask(tmp_path: Path, mask_values: np.ndarray, match: str) -> None:
    case_dir = tmp_path / "3Dircadb1.7"
    write_series(case_dir / "PATIENT_DICOM", pattern(), axial_positions())
    write_series(case_dir / "MASKS_DICOM" / "liver", mask_values, axial_positions(), intercept=0)
    with pytest.raises(DataError, match=match):
        convert_dicom_tree(tmp_path, tmp_path / "out")


def test_convert_mask_with_ct_rescale(tmp_path: Path) -> None:
    # A mask written with the CT's intercept: stored values are still 0/255, accepted.
    case_dir = tmp_path / "3Dircadb1.8"
    write_series(case_dir / "PATIENT_DICOM", pattern(), axial_positions())
    write_series(case_dir / "MASKS_DICOM" / "liver", liver_mask(), axial_positions())
    assert convert_dicom_tree(tmp_path, tmp_path / "out") == ["e08"]
    raw = np.asarray(nib.load(tmp_path / "out" / "ircad_e08_liver.nii.gz").dataobj)
    assert int(raw.sum()) == 24


# ---------------------------------------------------------------------------- collect_cases
def test_collect_nifti(tmp_path: Path) -> None:
    nifti_pair(tmp_path / "src" / "train", "10", liver=255)
    nifti_pair(tmp_path / "src" / "test", "2", suffix=".nii")
    out = tmp_path / "out"
    assert collect_cases(tmp_path / "src", "nifti", out) == ["e02", "e10"]
    for case_id in ("e02", "e10"):
        image = out / f"ircad_{case_id}_orig.nii.gz"
        mask = out / f"ircad_{case_id}_liver.nii.gz"
        case = load_case(image, mask, case_id=case_id)
        assert case.image.spacing == pytest.approx((0.7, 0.7, 3.0))
        assert case.image.data[0, 0, 0] == -20.0
        assert case.image.data[3, 3, 2] == 27.0
        assert np.asarray(nib.load(image).dataobj).dtype == np.int16
        raw = np.asarray(nib.load(mask).dataobj)
        assert raw.dtype == np.uint8
        assert int(raw.sum()) == 4  # 0/255 became 0/1


def test_collect_dicom(tmp_path: Path) -> None:
    write_patient(tmp_path / "src" / "3Dircadb1.9")
    assert collect_cases(tmp_path / "src", "dicom", tmp_path / "out") == ["e09"]
    assert (tmp_path / "out" / "ircad_e09_orig.nii.gz").is_file()


def test_collect_nifti_invalid_pair(tmp_path: Path) -> None:
    nifti_pair(tmp_path / "src", "1")
    nib.save(
        nib.Nifti1Image(np.full((4, 4, 3), 3, dtype=np.uint8), np.eye(4)),
        tmp_path / "src" / "ircad_e1_liver.nii.gz",
    )
    with pytest.raises(DataError, match="ircad_e1_liver.nii.gz: mask is not binary"):
        collect_cases(tmp_path / "src", "nifti", tmp_path / "out")


def test_collect_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout must be 'nifti' or 'dicom', not 'zip'"):
        collect_cases(tmp_path, "zip", tmp_path / "out")
