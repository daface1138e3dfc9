"""DICOM SEG output: highdicom round trip on series written here, and dciodvfy's verdict."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.sr.codedict import codes

from dicomfake import phantom_ijk, read_seg_mask, write_series
from liverseg.data.dicom import read_ct_series
from liverseg.data.dicomseg import build_seg, frame_of_reference_uid, write_seg
from liverseg.data.volumes import from_canonical
from liverseg.errors import DataError


def dciodvfy() -> str:
    found = shutil.which("dciodvfy")
    if found is None:
        pytest.fail("dciodvfy not installed: apt-get install dicom3tools (make test does)")
    return found


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """dciodvfy's error lines on ``path``, and its whole report."""
    proc = subprocess.run([dciodvfy(), str(path)], capture_output=True, text=True)
    report = proc.stdout + proc.stderr
    assert "Segmentation" in report  # it did recognise the IOD
    return [line for line in report.splitlines() if line.startswith("Error")], report


@pytest.fixture
def series(tmp_path: Path):
    write_series(tmp_path / "ct", phantom_ijk(), spacing=(0.8, 0.7, 2.5), shuffle_seed=5)
    return read_ct_series(tmp_path / "ct")


def ras_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """An asymmetric blob on the RAS grid, absent from the first and last two slices."""
    mask = np.zeros(shape, dtype=np.uint8)
    mask[3:20, 5:14, 2:-2] = 1
    mask[3:8, 5:9, 4] = 0
    return mask


def test_seg_round_trip_voxel_for_voxel(series, tmp_path: Path) -> None:
    vol = series.volume
    mask_src = from_canonical(ras_mask(vol.data.shape), vol)
    out = write_seg(mask_src, series.datasets, tmp_path / "liver.dcm", model="liver-unet v3")
    back = read_seg_mask(out, series.datasets)
    assert back.shape == mask_src.shape
    np.testing.assert_array_equal(back, mask_src)

    seg = hd.seg.segread(str(out))
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == series.datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == series.datasets[0].FrameOfReferenceUID
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for item in s.ReferencedInstanceSequence
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in series.datasets}
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == series.info.uid
    desc = seg.SegmentSequence[0]
    assert desc.SegmentLabel == "Liver"
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Liver.value
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    algo = desc.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "liverseg"
    assert "liver-unet v3" in algo.AlgorithmParameters
    # Empty slices are omitted: one frame per slice that holds liver.
    assert int(seg.NumberOfFrames) == int(np.count_nonzero(mask_src.any(axis=(0, 1))))


def test_seg_passes_dciodvfy(series, tmp_path: Path) -> None:
    vol = series.volume
    out = write_seg(
        from_canonical(ras_mask(vol.data.shape), vol),
        series.datasets,
        tmp_path / "l.dcm",
        model="m",
    )
    errors, report = dciodvfy_errors(out)
    assert errors == [], report


def test_seg_of_a_series_without_frame_of_reference(tmp_path: Path) -> None:
    """As the official 3D-IRCADb-01 series: the SEG gets the series' derived UID, the files and
    the headers read stay as they were, and every source instance is still referenced."""
    files = write_series(tmp_path / "ct", phantom_ijk(), frame_uid=None, shuffle_seed=2)
    before = [f.read_bytes() for f in files]
    series = read_ct_series(tmp_path / "ct")
    assert not any("FrameOfReferenceUID" in ds for ds in series.datasets)
    vol = series.volume
    mask_src = from_canonical(ras_mask(vol.data.shape), vol)
    out = write_seg(mask_src, series.datasets, tmp_path / "liver.dcm", model="m")
    np.testing.assert_array_equal(read_seg_mask(out, series.datasets), mask_src)

    seg = hd.seg.segread(str(out))
    assert seg.FrameOfReferenceUID == frame_of_reference_uid(series.info.uid)
    again = build_seg(mask_src, series.datasets, model="m")  # the same series, the same frame
    assert again.FrameOfReferenceUID == seg.FrameOfReferenceUID
    assert frame_of_reference_uid("1.2.3.4") != seg.FrameOfReferenceUID
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for item in s.ReferencedInstanceSequence
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in series.datasets}
    # Each frame sits where its CT slice is: same position and orientation as the source.
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series.datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(pos, by_uid[str(src_uid)].ImagePositionPatient)

    errors, report = dciodvfy_errors(out)
    assert errors == [], report
    assert [f.read_bytes() for f in files] == before
    assert not any("FrameOfReferenceUID" in ds for ds in series.datasets)


def test_seg_of_a_wrong_shape_is_refused(series) -> None:
    with pytest.raises(DataError, match="does not match a series of 12 slices"):
        build_seg(np.zeros((40, 32, 11), np.uint8), series.datasets, model="m")
    with pytest.raises(DataError, match="does not match slices of 32 rows x 40 columns"):
        build_seg(np.zeros((32, 40, 12), np.uint8), series.datasets, model="m")
