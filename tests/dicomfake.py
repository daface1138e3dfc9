"""Write small CT series as DICOM files with pydicom, for the tests (no data files needed).

``write_series`` takes a volume indexed ``[i, j, k]`` = (column, row, slice) and writes one
file per slice: geometry from ``row_dir``/``col_dir`` (the ImageOrientationPatient cosines,
LPS), ``origin`` (the first slice's ImagePositionPatient) and ``step`` (the position change
per slice, LPS mm; by default along the normal by ``spacing[2]``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))  # rows run to the patient's left, columns posterior


def write_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    row_dir: Sequence[float] = AXIAL[0],
    col_dir: Sequence[float] = AXIAL[1],
    origin: Sequence[float] = (-100.0, -80.0, 40.0),
    step: Sequence[float] | None = None,
    modality: str = "CT",
    series_uid: str | None = None,
    study_uid: str = "1.2.826.0.1.3680043.8.498.1",
    frame_uid: str | None = "1.2.826.0.1.3680043.8.498.2",
    description: str = "abdomen",
    shuffle_seed: int | None = 0,
    prefix: str = "slice",
    bits: int = 16,
) -> list[Path]:
    """Write ``hu`` (columns, rows, slices) as a CT series in ``folder``; the files written.

    Stored values are ``hu + 1024`` as uint16 with RescaleIntercept -1024; with ``bits=8``,
    ``hu`` itself as uint8 with RescaleIntercept 0 (how 3D-IRCADb-01 stores its 0/255 masks).
    With ``shuffle_seed`` the file names are a random permutation of the slice order (so
    sorting names is wrong).
    """
    intercept = -1024 if bits == 16 else 0
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    row = np.asarray(row_dir, dtype=float)
    col = np.asarray(col_dir, dtype=float)
    normal = np.cross(row, col)
    delta = np.asarray(step, dtype=float) if step is not None else normal * spacing[2]
    n = hu.shape[2]
    names = list(range(n))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(names)
    written = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientName = "Test^Liver"
        ds.PatientID = "LIVERSEG-TEST"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        if frame_uid is not None:  # None: as the official 3D-IRCADb-01 series, which have none
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = "A1"
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "pydicom test"
        ds.SeriesNumber = 2
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(origin) + k * delta]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # between rows, columns
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = str(intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.KVP = "120"
        stored = np.clip(np.rint(hu[:, :, k].T - intercept), 0, 2**bits - 1)
        stored = stored.astype(np.uint8 if bits == 8 else np.uint16)
        ds.PixelData = stored.tobytes()
        path = folder / f"{prefix}_{names[k]:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def read_seg_mask(path: Path, source: Sequence[Dataset]) -> np.ndarray:
    """A SEG's liver mask as uint8 ``(columns, rows, slices)`` on the ``source`` slices (the
    layout ``liverseg.data.dicomseg.write_seg`` takes)."""
    seg = hd.seg.segread(str(path))
    uids = [str(ds.SOPInstanceUID) for ds in source]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )  # (k, rows, columns, 1)
    return np.ascontiguousarray(np.transpose(pixels[..., 0], (2, 1, 0))).astype(np.uint8)


def phantom_ijk(shape: tuple[int, int, int] = (40, 32, 12), seed: int = 0) -> np.ndarray:
    """A small CT-like volume (columns, rows, slices) in HU: body, a bright block, noise."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0)
    ci, cj = shape[0] // 2, shape[1] // 2
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = ((ii - ci) / (0.45 * shape[0])) ** 2 + ((jj - cj) / (0.45 * shape[1])) ** 2 <= 1
    hu[body] = 40.0
    hu[: ci - 2, cj - 4 : cj + 4, 2:-2] = 120.0  # asymmetric, so a flip shows
    hu += np.rint(rng.normal(0, 5, shape))
    hu[:, :, :] += np.arange(shape[2])[None, None, :]  # slice k is told apart by its values
    return np.rint(hu)
