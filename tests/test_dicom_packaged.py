"""Real DICOM written by scanners and other toolkits, as shipped inside pydicom's wheel.

The other DICOM tests read files written by tests/dicomfake.py; these read files we did not
write: ``CT_small.dcm`` (a GE CT slice, uncompressed, with a FrameOfReferenceUID),
``693_J2KI.dcm`` (a CT slice, JPEG 2000, without FrameOfReferenceUID, as the official
3D-IRCADb-01 series) and ``MR_small.dcm``. They are taken from the installed package
(``download=False``: no network at test time) and copied, one series per folder, so the
package's files are never touched. A single slice is a series of one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale

from conftest import tool_env
from dicomfake import read_seg_mask
from liverseg.data.dicom import read_ct_series
from liverseg.data.dicomseg import frame_of_reference_uid, write_seg
from liverseg.data.volumes import from_canonical
from liverseg.errors import DataError
from test_dicomseg import dciodvfy
from test_predict_dicom import ensemble_dir


def packaged(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if not isinstance(found, str):
        pytest.fail(f"{name} is not in the installed pydicom's test files")
    return Path(found)


def series_of(name: str, folder: Path) -> Path:
    """A folder holding a copy of pydicom's ``name``: a one-slice series."""
    folder.mkdir(parents=True)
    shutil.copy(packaged(name), folder / name)
    return folder


def dciodvfy_errors(path: Path) -> set[str]:
    proc = subprocess.run([dciodvfy(), str(path)], capture_output=True, text=True)
    return {line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")}


def test_ct_small_reads_as_pydicom_decodes_it(tmp_path: Path) -> None:
    series = read_ct_series(series_of("CT_small.dcm", tmp_path / "ct"))
    ds = pydicom.dcmread(packaged("CT_small.dcm"))
    hu = apply_rescale(ds.pixel_array, ds)  # (rows, columns), pydicom's own decoding
    vol = series.volume
    assert vol.data.shape == (128, 128, 1)
    # Back on the source grid [column, row, slice], the voxels are pydicom's HU, transposed.
    np.testing.assert_array_equal(from_canonical(vol.data, vol)[:, :, 0], hu.T)
    spacing = [float(v) for v in ds.PixelSpacing]
    np.testing.assert_allclose(vol.spacing, (spacing[1], spacing[0], float(ds.SliceThickness)))
    # The first voxel's centre is ImagePositionPatient, in RAS (LPS with x and y negated).
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    np.testing.assert_allclose(vol.source_affine[:3, 3], (-x, -y, z), atol=1e-4)


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm"])
def test_seg_on_packaged_ct(name: str, tmp_path: Path) -> None:
    """The SEG reads back voxel for voxel, and dciodvfy finds no error in it that is not
    already in the source file (693_J2KI.dcm's Patient module lacks the de-identification
    method that its PatientIdentityRemoved=YES requires; the SEG copies that module)."""
    series = read_ct_series(series_of(name, tmp_path / "ct"))
    vol = series.volume
    mask = np.zeros(vol.data.shape, np.uint8)
    mask[20:60, 30:90, :] = 1
    mask_src = from_canonical(mask, vol)
    out = write_seg(mask_src, series.datasets, tmp_path / "liver.dcm", model="m")
    np.testing.assert_array_equal(read_seg_mask(out, series.datasets), mask_src)
    source = series.datasets[0]
    expected_frame = source.get("FrameOfReferenceUID") or frame_of_reference_uid(series.info.uid)
    assert hd.seg.segread(str(out)).FrameOfReferenceUID == expected_frame
    seg_errors = dciodvfy_errors(out)
    assert seg_errors <= dciodvfy_errors(packaged(name)), seg_errors


def test_mr_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"mr: series .* has modality MR, not CT") as err:
        read_ct_series(series_of("MR_small.dcm", tmp_path / "mr"))
    assert "\n" not in str(err.value)


def test_predict_a_packaged_ct_without_frame_of_reference(tmp_path: Path) -> None:
    """``liverseg predict`` on the JPEG 2000 slice without FrameOfReferenceUID: a SEG whose
    mask is the in-process Segmenter's, and its quality report beside it."""
    from liverseg.inference import Segmenter

    models = ensemble_dir(tmp_path / "models")
    ct = series_of("693_J2KI.dcm", tmp_path / "ct")
    out = tmp_path / "liver.dcm"
    proc = subprocess.run(
        [sys.executable, "-m", "liverseg.cli", "predict", str(ct), "-o", str(out)]
        + ["--model", str(models)],
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    series = read_ct_series(ct)
    vol = series.volume
    expected = from_canonical(Segmenter.from_dir(models).segment_ras(vol.data), vol)
    assert expected.any()  # the body is above the first member's level
    np.testing.assert_array_equal(read_seg_mask(out, series.datasets), expected)
    assert (tmp_path / "liver.quality.json").is_file()
