"""DICOM series input: series written here with pydicom, read back as RAS volumes."""

from __future__ import annotations

import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from dicomfake import phantom_ijk, write_series
from liverseg.data.dicom import find_series, read_ct_series
from liverseg.data.volumes import from_canonical
from liverseg.errors import DataError

SPACING = (0.8, 0.7, 2.5)


@pytest.fixture
def hu() -> np.ndarray:
    return phantom_ijk()


def test_shuffled_lps_series_reads_in_position_order(tmp_path: Path, hu: np.ndarray) -> None:
    files = write_series(tmp_path / "ct", hu, spacing=SPACING, shuffle_seed=3)
    # The names do not follow the slices: sorting them would scramble the volume.
    assert [f.name for f in sorted(files)] != [f.name for f in files]
    series = read_ct_series(tmp_path / "ct")
    vol = series.volume
    # Source grid [column, row, slice] = L, P, S; RAS flips the first two axes.
    assert nib.aff2axcodes(vol.source_affine) == ("L", "P", "S")
    np.testing.assert_array_equal(from_canonical(vol.data, vol), hu.astype(np.float32))
    np.testing.assert_array_equal(vol.data, hu[::-1, ::-1, :].astype(np.float32))
    assert vol.spacing == pytest.approx(SPACING)
    # The first voxel of the file grid sits at ImagePositionPatient (-100, -80, 40) LPS.
    assert vol.source_affine[:3, 3] == pytest.approx([100.0, 80.0, 40.0])
    # Headers come in slice order (positions increasing along the normal, S).
    z = [float(ds.ImagePositionPatient[2]) for ds in series.datasets]
    assert z == pytest.approx([40.0 + 2.5 * k for k in range(hu.shape[2])])


def test_other_orientation_gives_the_same_ras_volume(tmp_path: Path, hu: np.ndarray) -> None:
    # The same anatomy stored with rows running to the patient's right and slices from head to
    # feet (R, P, I): the RAS volume and its affine must not change.
    lps = read_ct_series(write_series(tmp_path / "a", hu, spacing=SPACING)[0].parent).volume
    n_i, _, n_k = hu.shape
    origin = (-100.0 + (n_i - 1) * SPACING[0], -80.0, 40.0 + (n_k - 1) * SPACING[2])
    flipped = hu[::-1, :, ::-1]
    rpi_dir = tmp_path / "b"
    write_series(
        rpi_dir,
        flipped,
        spacing=SPACING,
        row_dir=(-1.0, 0.0, 0.0),
        col_dir=(0.0, 1.0, 0.0),
        origin=origin,
        step=(0.0, 0.0, -SPACING[2]),
    )
    rpi = read_ct_series(rpi_dir).volume
    assert nib.aff2axcodes(rpi.source_affine) == ("R", "P", "I")
    np.testing.assert_array_equal(rpi.data, lps.data)
    np.testing.assert_allclose(rpi.affine, lps.affine, atol=1e-4)


def test_zip_of_a_series(tmp_path: Path, hu: np.ndarray) -> None:
    files = write_series(tmp_path / "ct", hu, spacing=SPACING)
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in files:
            zf.write(f, f"export/CT/{f.name}")
    from_zip = read_ct_series(archive).volume
    np.testing.assert_array_equal(from_zip.data, read_ct_series(tmp_path / "ct").volume.data)


def test_two_series_in_one_folder_are_listed_and_chosen(tmp_path: Path, hu: np.ndarray) -> None:
    folder = tmp_path / "study"
    write_series(folder, hu, series_uid="1.2.3.4", description="venous", prefix="a")
    write_series(folder, hu[:, :, :5] + 7, series_uid="1.2.3.5", description="arterial", prefix="b")
    (folder / "README.txt").write_text("not DICOM")
    assert [(s.uid, len(s.files)) for s in find_series(folder)] == [("1.2.3.4", 12), ("1.2.3.5", 5)]
    with pytest.raises(DataError, match="2 series found, choose one with --series") as err:
        read_ct_series(folder)
    message = str(err.value)
    assert "\n" not in message
    for part in ("1.2.3.4", "'venous'", "12 files", "1.2.3.5", "'arterial'", "5 files"):
        assert part in message
    chosen = read_ct_series(folder, "1.2.3.5").volume
    assert chosen.data.shape == (40, 32, 5)
    assert chosen.data.max() == hu[:, :, :5].max() + 7
    with pytest.raises(DataError, match="no series 9.9.9 here"):
        read_ct_series(folder, "9.9.9")


def test_gantry_tilt_is_refused(tmp_path: Path, hu: np.ndarray) -> None:
    # Axial slices whose positions drift posteriorly as they rise: a 15 degree gantry tilt.
    tilt = np.radians(15.0)
    write_series(tmp_path / "ct", hu, step=(0.0, 2.5 * np.tan(tilt), 2.5))
    with pytest.raises(DataError, match=r"ct: gantry tilt of 15\.00 degrees"):
        read_ct_series(tmp_path / "ct")


def test_not_ct_is_refused(tmp_path: Path, hu: np.ndarray) -> None:
    write_series(tmp_path / "mr", hu, modality="MR")
    with pytest.raises(DataError, match="mr: series .* has modality MR, not CT"):
        read_ct_series(tmp_path / "mr")


def test_missing_geometry_is_refused(tmp_path: Path, hu: np.ndarray) -> None:
    files = write_series(tmp_path / "ct", hu)
    ds = pydicom.dcmread(files[4])
    del ds.ImagePositionPatient
    ds.save_as(files[4])
    with pytest.raises(DataError, match=f"{files[4].name}: DICOM attribute ImagePositionPatient"):
        read_ct_series(tmp_path / "ct")


def test_slices_in_two_frames_of_reference_are_refused(tmp_path: Path, hu: np.ndarray) -> None:
    files = write_series(tmp_path / "ct", hu)
    ds = pydicom.dcmread(files[3])
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.99"
    ds.save_as(files[3])
    with pytest.raises(DataError, match="ct: slices in different frames of reference: .*slice_"):
        read_ct_series(tmp_path / "ct")


def test_missing_slice_is_refused(tmp_path: Path, hu: np.ndarray) -> None:
    files = write_series(tmp_path / "ct", hu, shuffle_seed=None)
    files[5].unlink()
    with pytest.raises(DataError, match="ct: slice spacing is not uniform"):
        read_ct_series(tmp_path / "ct")


def test_undecodable_compressed_pixels_are_refused(tmp_path: Path, hu: np.ndarray) -> None:
    files = write_series(tmp_path / "ct", hu)
    ds = pydicom.dcmread(files[0])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])  # a JPEG 2000 stub
    ds["PixelData"].VR = "OB"
    ds.save_as(files[0], enforce_file_format=True)
    with pytest.raises(DataError, match=f"{files[0].name}: cannot decode pixel data") as err:
        read_ct_series(tmp_path / "ct")
    assert "\n" not in str(err.value)


def test_series_over_the_size_limit_is_refused(tmp_path: Path, hu: np.ndarray) -> None:
    write_series(tmp_path / "ct", hu)  # 40 x 32 x 12 voxels: 61,440 bytes as float32
    assert read_ct_series(tmp_path / "ct", max_bytes=61_440).volume.data.size == 15_360
    with pytest.raises(DataError, match=r"ct: series .* is 0\.1 MB as float32 voxels, over the"):
        read_ct_series(tmp_path / "ct", max_bytes=61_439)


def test_no_dicom_at_all(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="d: no DICOM files found"):
        read_ct_series(tmp_path / "d")
    with pytest.raises(DataError, match="nope: file not found"):
        read_ct_series(tmp_path / "nope")
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="x.zip: not a zip archive"):
        read_ct_series(tmp_path / "x.zip")
