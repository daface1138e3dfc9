"""A CT series from a DICOM folder or zip, as a :class:`~liverseg.data.volumes.Volume`.

What ``liverseg predict`` and the served model read when the CT is DICOM
(:func:`read_ct_series`), and the IRCAD importer's series reader (:func:`read_series_folder`).

Array contract of :class:`SeriesArrays`: 3-D arrays indexed ``[i, j, k]`` with
``i`` = DICOM column (along the first ImageOrientationPatient cosine), ``j`` = DICOM row (along
the second cosine) and ``k`` = slice, ordered by position along the slice normal (cross product
of the two cosines), never by file name. The 4x4 affine maps ``(i, j, k, 1)`` to RAS+
millimetres (DICOM patient coordinates are LPS, so x and y change sign).

:attr:`DicomSeries.volume` is the series in canonical RAS as every other volume of the
project; its *source* grid (``Volume.source_affine``, what
:func:`~liverseg.data.volumes.from_canonical` maps back to) is that ``[i, j, k]``, with ``k``
in :attr:`DicomSeries.datasets` order. So frame ``k`` of a mask on the source grid is
``mask[:, :, k].T`` (rows x columns) and belongs to ``datasets[k]``.
"""

from __future__ import annotations

import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from liverseg.data.download import safe_extract_zip
from liverseg.data.volumes import Volume, nifti_image, volume_from_image
from liverseg.errors import DataError

__all__ = [
    "DicomSeries",
    "SeriesArrays",
    "SeriesInfo",
    "find_series",
    "is_dicom_source",
    "read_ct_series",
    "read_series_folder",
]

# Consecutive slice gaps may differ from the median gap by this fraction: positions are
# decimal strings (DS, at most 16 characters), so exact equality cannot be required, while a
# missing slice (a gap twice the others) must still be caught.
SPACING_RTOL = 0.01
# Two slices closer than this along the normal are the same slice position (DS rounding is
# orders of magnitude finer; real slice spacings are tenths of a millimetre at the least).
DUPLICATE_POSITION_MM = 1e-3
# Direction cosines of one series must agree to this; they must be unit and orthogonal to
# ORTHONORMAL_ATOL (DICOM writers round them to a few decimals).
ORIENTATION_ATOL = 1e-4
ORTHONORMAL_ATOL = 1e-3

# DICOM (LPS) to NIfTI/RAS: x and y change sign.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_REQUIRED = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")


# Largest angle (radians) between the slice step and the slice normal still taken as no tilt:
# positions are decimal strings of at most 16 characters and direction cosines are rounded by
# writers to about 6 decimals, both orders of magnitude finer; a real gantry tilt is degrees.
MAX_TILT_RAD = 1e-3
# An unpacked zip (CLI) may hold this much: a whole-body CT is well under 2 GB.
DEFAULT_MAX_UNZIPPED_BYTES = 4 * 1024**3


# ------------------------------------------------------------------- one series from its files
@dataclass(frozen=True)
class _Slice:
    path: Path
    stored: np.ndarray  # (Columns, Rows): pixel values as stored, [i, j]
    slope: float
    intercept: float
    position: np.ndarray  # ImagePositionPatient, LPS mm
    cosines: np.ndarray  # (2, 3): row direction (i), column direction (j)
    pixel_spacing: np.ndarray  # (row spacing, column spacing) as in the file
    thickness: float | None


@dataclass(frozen=True)
class SeriesArrays:
    """One series' voxels, as stored and in HU, with its affine (see the module's contract)."""

    stored: np.ndarray  # (Columns, Rows, slices), stored values
    hu: np.ndarray  # same shape, float32, after RescaleSlope/RescaleIntercept
    affine: np.ndarray  # voxel -> RAS mm
    paths: tuple[Path, ...] = ()  # the slice files in array (k) order


def _dcmread(path: Path, **kwargs: Any) -> Dataset:
    """Read ``path`` also without the 128-byte preamble + "DICM" marker (some exports omit it)."""
    with warnings.catch_warnings():  # force-parsing a text file warns about its "VR"
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True, **kwargs)


def _read_slice(path: Path) -> _Slice:
    try:
        ds = _dcmread(path)
    except Exception as exc:  # pydicom raises many exception types on garbage input
        raise DataError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise DataError(f"{path}: unreadable DICOM file (not DICOM, or no pixel data)")
    if "TransferSyntaxUID" not in ds.file_meta:
        # A bare data set has no file meta; pixel decoding needs the syntax it was parsed with.
        implicit, little = ds.original_encoding
        explicit = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else explicit
    for keyword in _REQUIRED:
        if keyword not in ds:
            raise DataError(f"{path}: DICOM attribute {keyword} is missing")
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoder errors come in many types
        raise DataError(f"{path}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim != 2:
        raise DataError(
            f"{path}: expected one single-channel 2-D slice, got pixel array of shape "
            f"{pixels.shape}"
        )
    try:
        position = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        cosines = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        spacing = np.array([float(v) for v in ds.PixelSpacing], dtype=np.float64)
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
        thickness_raw = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
        thickness = float(thickness_raw) if thickness_raw else None
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed geometry or rescale attribute ({exc})") from exc
    if position.shape != (3,) or cosines.shape != (6,) or spacing.shape != (2,):
        raise DataError(
            f"{path}: ImagePositionPatient/ImageOrientationPatient/PixelSpacing need 3/6/2 "
            f"values, got {position.size}/{cosines.size}/{spacing.size}"
        )
    if not (np.all(np.isfinite(position)) and np.all(np.isfinite(cosines))):
        raise DataError(f"{path}: non-finite ImagePositionPatient or ImageOrientationPatient")
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise DataError(f"{path}: PixelSpacing {spacing.tolist()} must be two positive numbers")
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0):
        raise DataError(f"{path}: invalid RescaleSlope {slope} / RescaleIntercept {intercept}")
    return _Slice(
        path=path,
        stored=pixels.T,  # pixel_array is [row, column]; the contract is [column, row]
        slope=slope,
        intercept=intercept,
        position=position,
        cosines=cosines.reshape(2, 3),
        pixel_spacing=spacing,
        thickness=thickness,
    )


def read_series_folder(folder: Path, files: list[Path] | None = None) -> SeriesArrays:
    """The series of the files directly in ``folder`` (one series, as IRCAD stores them), or of
    ``files`` (``folder`` then only names the series in messages).

    Raises :class:`DataError` naming the folder or file on: no files, an unreadable file, a
    missing attribute, mixed shapes/orientations/pixel spacings, duplicate slice positions,
    and slice gaps differing from their median by more than ``SPACING_RTOL``.
    """
    folder = Path(folder)
    if files is None:
        if not folder.is_dir():
            raise DataError(f"{folder}: DICOM series folder does not exist")
        # Hidden files (.DS_Store, AppleDouble ._image_0) are archive litter, never slices.
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{folder}: no files in the DICOM series folder")
    slices = [_read_slice(p) for p in files]
    first = slices[0]
    for s in slices[1:]:
        if s.stored.shape != first.stored.shape:
            raise DataError(
                f"{folder}: mixed slice shapes: {s.path.name} is {s.stored.shape[1]}x"
                f"{s.stored.shape[0]} (rows x columns) but {first.path.name} is "
                f"{first.stored.shape[1]}x{first.stored.shape[0]}"
            )
        if not np.allclose(s.cosines, first.cosines, atol=ORIENTATION_ATOL, rtol=0):
            raise DataError(
                f"{folder}: mixed ImageOrientationPatient: {s.path.name} differs from "
                f"{first.path.name}"
            )
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, atol=ORIENTATION_ATOL, rtol=0):
            raise DataError(
                f"{folder}: mixed PixelSpacing: {s.path.name} has {s.pixel_spacing.tolist()}, "
                f"{first.path.name} has {first.pixel_spacing.tolist()}"
            )
    row_dir, col_dir = first.cosines  # along i (columns) and along j (rows)
    gram = first.cosines @ first.cosines.T
    if not np.allclose(gram, np.eye(2), atol=ORTHONORMAL_ATOL, rtol=0):
        raise DataError(
            f"{first.path}: ImageOrientationPatient {first.cosines.ravel().tolist()} is not "
            "two orthogonal unit vectors"
        )
    normal = np.cross(row_dir, col_dir)

    positions = np.stack([s.position for s in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[n] for n in order]
    positions, along = positions[order], along[order]
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps < DUPLICATE_POSITION_MM)
    if dup.size:
        a, b = slices[dup[0]], slices[dup[0] + 1]
        raise DataError(
            f"{folder}: duplicate slice position {along[dup[0]]:.3f} mm along the normal: "
            f"{a.path} and {b.path}"
        )
    if len(slices) > 1:
        median = float(np.median(gaps))
        if np.any(np.abs(gaps - median) > SPACING_RTOL * median):
            shown = ", ".join(f"{g:.3f}" for g in np.unique(np.round(gaps, 3))[:6])
            raise DataError(
                f"{folder}: slice spacing is not uniform (gaps {shown} mm, median "
                f"{median:.3f} mm; a missing or extra slice?)"
            )
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
        # Positions must lie on one line: a drifting in-plane offset (varying gantry tilt)
        # cannot be expressed by an affine.
        line = positions[0] + np.arange(len(slices))[:, None] * step
        if np.max(np.linalg.norm(positions - line, axis=1)) > SPACING_RTOL * median:
            raise DataError(f"{folder}: slice positions do not lie on one straight line")
    elif first.thickness is not None and first.thickness > 0:
        step = normal * first.thickness
    else:
        raise DataError(
            f"{first.path}: single-slice series without SliceThickness: slice spacing unknown"
        )

    row_spacing, col_spacing = first.pixel_spacing  # DICOM order: between rows, between columns
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]

    stored = np.stack([s.stored for s in slices], axis=-1)
    slope = np.array([s.slope for s in slices], dtype=np.float64)
    intercept = np.array([s.intercept for s in slices], dtype=np.float64)
    hu = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    return SeriesArrays(
        stored=stored, hu=hu, affine=_LPS_TO_RAS @ lps, paths=tuple(s.path for s in slices)
    )


# ------------------------------------------------------------------------- series in a folder
@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder: what the several-series error lists, and its files with
    their headers (no pixels), read once."""

    uid: str
    modality: str
    description: str
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...] = field(default=(), repr=False)


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


def find_series(folder: Path) -> list[SeriesInfo]:
    """Every series below ``folder`` (recursively), sorted by UID."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM folder does not exist")
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            ds = _dcmread(path, stop_before_pixels=True)
        except Exception:  # pydicom raises many types on non-DICOM input: such files are skipped
            continue
        if "SeriesInstanceUID" in ds and "SOPInstanceUID" in ds:  # not DICOMDIR, a README, ...
            groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    if not groups:
        raise DataError(f"{folder}: no DICOM files found")
    return [
        SeriesInfo(
            uid=uid,
            modality=str(group[0][1].get("Modality", "")),
            description=str(group[0][1].get("SeriesDescription", "")),
            files=tuple(p for p, _ in group),
            headers=tuple(ds for _, ds in group),
        )
        for uid, group in sorted(groups.items())
    ]


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
    with tempfile.TemporaryDirectory(prefix="liverseg-dicom-") as tmp:
        folder = source
        if not source.is_dir():
            if not zipfile.is_zipfile(source):
                raise DataError(
                    f"{source}: not a zip archive (expected a DICOM folder or a .zip of one)"
                )
            folder = Path(tmp) / "series"
            safe_extract_zip(source, folder, max_bytes=max_bytes)
        found = find_series(folder)
        listed = "; ".join(
            f"{i.uid}  {i.modality or '?'}  {i.description or '(no description)'!r}  "
            f"{len(i.files)} files"
            for i in found
        )
        chosen = [i for i in found if series_uid in (None, i.uid)]
        if not chosen:
            raise DataError(f"{source}: no series {series_uid} here; found: {listed}")
        if len(chosen) > 1:
            raise DataError(
                f"{source}: {len(found)} series found, choose one with --series UID: {listed}"
            )
        info = chosen[0]
        if info.modality != "CT":
            raise DataError(
                f"{source}: series {info.uid} has modality {info.modality or '(none)'}, not CT"
            )
        try:  # the size from one header; missing Rows/Columns: the reader names file and key
            n_bytes = int(info.headers[0].Rows) * int(info.headers[0].Columns) * len(info.files) * 4
        except (AttributeError, TypeError, ValueError):
            n_bytes = 0
        if n_bytes > max_bytes:
            raise DataError(
                f"{source}: series {info.uid} is {n_bytes / 2**20:.1f} MB as float32 voxels, "
                f"over the limit of {max_bytes / 2**20:.1f} MB"
            )
        try:
            series = read_series_folder(source, list(info.files))
        except DataError as exc:
            # Decoder messages span lines (one per plugin tried): the error stays one line.
            raise DataError(" ".join(str(exc).split())) from exc
    cols = series.affine[:3, :3]
    normal = np.cross(cols[:, 0], cols[:, 1])
    cos = abs(normal @ cols[:, 2]) / (np.linalg.norm(normal) * np.linalg.norm(cols[:, 2]))
    angle = float(np.arccos(np.clip(cos, 0.0, 1.0)))
    if angle > MAX_TILT_RAD:
        raise DataError(
            f"{source}: gantry tilt of {np.degrees(angle):.2f} degrees (slices step obliquely "
            "to their plane); resample the series to an orthogonal grid first"
        )
    volume = volume_from_image(nifti_image(series.hu, series.affine), kind="image", path=source)
    header_of = dict(zip(info.files, info.headers, strict=True))
    headers = tuple(header_of[p] for p in series.paths)
    frames = {
        str(ds.FrameOfReferenceUID): p
        for ds, p in zip(headers, series.paths, strict=True)
        if "FrameOfReferenceUID" in ds
    }
    if len(frames) > 1:
        a, b = list(frames.values())[:2]
        raise DataError(
            f"{source}: slices in different frames of reference: {a.name} and {b.name} have "
            "different FrameOfReferenceUIDs"
        )
    return DicomSeries(volume=volume, datasets=headers, info=info)
