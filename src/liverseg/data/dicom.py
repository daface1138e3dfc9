"""A CT series from a DICOM folder or zip, as a :class:`~liverseg.data.volumes.Volume`.

What ``liverseg predict`` and the served model read when the CT is DICOM. Files are grouped by
SeriesInstanceUID (found recursively; files that are not DICOM, and DICOMDIR indexes, are
skipped); a folder holding several series is an error that lists them, unless one is chosen by
its UID. The chosen series goes through the importer of :mod:`liverseg.data.ircad` (slices
ordered by ImagePositionPatient along the slice normal, HU from RescaleSlope/Intercept, the
affine from the headers, uniform spacing required) and is then checked for what a 2-D axial
model cannot take: a modality other than CT, and a gantry tilt (slices stepping obliquely to
their own plane, which no orthogonal grid can hold).

Array contract: :attr:`DicomSeries.volume` is the series in canonical RAS as every other
volume of the project; its *source* grid (``Volume.source_affine``, what
:func:`~liverseg.data.volumes.from_canonical` maps back to) is ``[i, j, k]`` = (DICOM column,
DICOM row, slice in :attr:`DicomSeries.datasets` order). So frame ``k`` of a mask on the source
grid is ``mask[:, :, k].T`` (rows x columns) and belongs to ``datasets[k]``.
"""

from __future__ import annotations

import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from liverseg.data.download import safe_extract_zip
from liverseg.data.ircad import SPACING_RTOL, _series_from_files
from liverseg.data.volumes import Volume, volume_from_image
from liverseg.errors import DataError

__all__ = ["DicomSeries", "SeriesInfo", "find_series", "is_dicom_source", "read_ct_series"]

# Largest angle (radians) between the slice step and the slice normal still taken as no tilt:
# positions are decimal strings of at most 16 characters and direction cosines are rounded by
# writers to about 6 decimals, both orders of magnitude finer; a real gantry tilt is degrees.
MAX_TILT_RAD = 1e-3
# An unpacked zip (CLI) may hold this much: a whole-body CT is well under 2 GB.
DEFAULT_MAX_UNZIPPED_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder: what the several-series error lists."""

    uid: str
    modality: str
    description: str
    files: tuple[Path, ...]

    def line(self) -> str:
        desc = self.description or "(no description)"
        return f"{self.uid}  {self.modality or '?'}  {desc!r}  {len(self.files)} files"


@dataclass(frozen=True)
class DicomSeries:
    """A CT series: the RAS volume, and the headers (no pixels) of its slices in ``k`` order."""

    volume: Volume
    datasets: tuple[Dataset, ...]
    info: SeriesInfo


def is_dicom_source(path: Path) -> bool:
    """True for a folder or a ``.zip`` (what :func:`read_ct_series` takes), False for NIfTI."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() == ".zip"


def _header(path: Path) -> Dataset | None:
    """The header of a DICOM file, or None for a file that is not a DICOM image."""
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            with warnings.catch_warnings():  # force-parsing a text file warns about its "VR"
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # pydicom raises many types on non-DICOM input: such files are skipped
        return None
    if "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds:
        return None  # DICOMDIR, a README parsed by force, ...
    return ds


def find_series(folder: Path) -> list[SeriesInfo]:
    """Every series below ``folder`` (recursively), sorted by UID."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM folder does not exist")
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        ds = _header(path)
        if ds is not None:
            groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    if not groups:
        raise DataError(f"{folder}: no DICOM files found")
    out = []
    for uid in sorted(groups):
        first = groups[uid][0][1]
        out.append(
            SeriesInfo(
                uid=uid,
                modality=str(first.get("Modality", "")),
                description=str(first.get("SeriesDescription", "")),
                files=tuple(p for p, _ in groups[uid]),
            )
        )
    return out


def _choose(folder: Path, found: list[SeriesInfo], series_uid: str | None) -> SeriesInfo:
    if series_uid is not None:
        for info in found:
            if info.uid == series_uid:
                return info
        listed = "; ".join(i.line() for i in found)
        raise DataError(f"{folder}: no series {series_uid} here; found: {listed}")
    if len(found) > 1:
        listed = "; ".join(i.line() for i in found)
        raise DataError(
            f"{folder}: {len(found)} series found, choose one with --series UID: {listed}"
        )
    return found[0]


def _check_tilt(affine: np.ndarray, where: Path) -> None:
    cols = affine[:3, :3]
    normal = np.cross(cols[:, 0], cols[:, 1])
    step = cols[:, 2]
    cos = abs(float(normal @ step)) / float(np.linalg.norm(normal) * np.linalg.norm(step))
    angle = float(np.arccos(np.clip(cos, 0.0, 1.0)))
    if angle > MAX_TILT_RAD:
        raise DataError(
            f"{where}: gantry tilt of {np.degrees(angle):.2f} degrees (slices step obliquely to "
            "their plane); resample the series to an orthogonal grid first"
        )


def _check_size(info: SeriesInfo, where: Path, max_bytes: int) -> None:
    """Refuse a series whose float32 volume would exceed ``max_bytes``, from one header."""
    first = pydicom.dcmread(info.files[0], stop_before_pixels=True, force=True)
    try:
        n_bytes = int(first.Rows) * int(first.Columns) * len(info.files) * 4
    except (AttributeError, TypeError, ValueError):
        return  # missing Rows/Columns: the importer names the file and the attribute
    if n_bytes > max_bytes:
        raise DataError(
            f"{where}: series {info.uid} is {n_bytes / 2**20:.1f} MB as float32 voxels, over "
            f"the limit of {max_bytes / 2**20:.1f} MB"
        )


def _read_folder(folder: Path, series_uid: str | None, where: Path, max_bytes: int) -> DicomSeries:
    info = _choose(where, find_series(folder), series_uid)
    if info.modality != "CT":
        raise DataError(
            f"{where}: series {info.uid} has modality {info.modality or '(none)'}, not CT"
        )
    _check_size(info, where, max_bytes)
    try:
        series = _series_from_files(list(info.files), where, SPACING_RTOL)
    except DataError as exc:
        # Decoder messages span lines (one per plugin tried): the error stays one line.
        raise DataError(" ".join(str(exc).split())) from exc
    _check_tilt(series.affine, where)
    img = nib.Nifti1Image(series.hu, series.affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(series.affine, code=1)
    img.set_qform(series.affine, code=1)
    volume = volume_from_image(img, kind="image", path=where)
    headers = tuple(pydicom.dcmread(p, stop_before_pixels=True, force=True) for p in series.paths)
    frames = {
        str(ds.FrameOfReferenceUID): p
        for ds, p in zip(headers, series.paths, strict=True)
        if "FrameOfReferenceUID" in ds
    }
    if len(frames) > 1:
        a, b = list(frames.values())[:2]
        raise DataError(
            f"{where}: slices in different frames of reference: {a.name} and {b.name} have "
            "different FrameOfReferenceUIDs"
        )
    return DicomSeries(volume=volume, datasets=headers, info=info)


@contextmanager
def _unpacked(path: Path, max_bytes: int) -> Iterator[Path]:
    if path.is_dir():
        yield path
        return
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a zip archive (expected a DICOM folder or a .zip of one)")
    with tempfile.TemporaryDirectory(prefix="liverseg-dicom-") as tmp:
        target = Path(tmp) / "series"
        safe_extract_zip(path, target, max_bytes=max_bytes)
        yield target


def read_ct_series(
    source: Path,
    series_uid: str | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_UNZIPPED_BYTES,
) -> DicomSeries:
    """Read the CT series in a DICOM folder or zip (``series_uid`` picks one of several).

    Raises :class:`DataError` naming ``source`` on: no DICOM file, several series and no
    choice, a modality other than CT, missing geometry attributes, pixel data that cannot be
    decoded (e.g. a compressed transfer syntax without its decoder), mixed or non-uniform
    slice spacing, a gantry tilt, and a volume over ``max_bytes`` as float32 (checked from the
    headers before any pixel is read). A zip is unpacked to a temporary folder with the same
    refusals as the ingest stage's downloads (path traversal, symlinks, bombs over
    ``max_bytes``).
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: file not found")
    with _unpacked(source, max_bytes) as folder:
        return _read_folder(folder, series_uid, source, max_bytes)
