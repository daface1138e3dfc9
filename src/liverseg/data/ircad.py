"""Turn every layout of the real 3D-IRCADb-01 data into the project's one internal format.

Internal format (what :func:`collect_cases` writes into ``out_dir``, flat): per case a NIfTI
pair named as :mod:`liverseg.data.layout` says (``ircad_eNN_orig.nii.gz`` CT, int16 HU +
``ircad_eNN_liver.nii.gz`` uint8 0/1 liver mask) on one grid, written with
:func:`liverseg.data.volumes.save_pair`.

Source layouts:

* ``nifti``: the notebook's archive, ``ircad_eN_orig.nii[.gz]`` / ``ircad_eN_liver.nii[.gz]``
  anywhere below a root (e.g. in ``train/`` and ``test/``), see
  :func:`~liverseg.data.layout.find_nifti_pairs`.
* ``dicom``: the official 3D-IRCADb-01 tree, ``3Dircadb1.N/PATIENT_DICOM/image_K`` (CT) and
  ``3Dircadb1.N/MASKS_DICOM/liver/image_K`` (liver mask, 0/255), see
  :func:`convert_dicom_tree`. The official download packs ``PATIENT_DICOM`` and
  ``MASKS_DICOM`` as inner zips: :func:`unpack_archive` unpacks them in place, within the one
  size budget of the whole download.

:func:`ingest_ircad` is the whole path from ``ingest.ircad`` (a URL or local archive, or an
unpacked folder) to the internal format.

Array contract of :func:`read_dicom_series`: a 3-D array indexed ``[i, j, k]`` with
``i`` = DICOM column (along the first ImageOrientationPatient cosine), ``j`` = DICOM row (along
the second cosine) and ``k`` = slice, ordered by position along the slice normal (cross product
of the two cosines), never by file name. The 4x4 affine maps ``(i, j, k, 1)`` to RAS+
millimetres (DICOM patient coordinates are LPS, so x and y change sign).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from liverseg.data.download import fetch, safe_extract_zip
from liverseg.data.layout import case_id_for, find_nifti_pairs, output_paths
from liverseg.data.volumes import load_case, same_grid, save_pair
from liverseg.errors import DataError
from liverseg.fsutil import atomic_dir

if TYPE_CHECKING:
    from liverseg.params import IrcadParams

__all__ = [
    "collect_cases",
    "convert_dicom_tree",
    "ingest_ircad",
    "read_dicom_series",
    "unpack_archive",
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

_CASE_DIR = re.compile(r"3Dircadb1\.(\d+)")
_CT_DIR = "PATIENT_DICOM"
_MASKS_DIR = "MASKS_DICOM"
_LIVER_DIR = "liver"
# The official archive zips each series again inside each patient folder
# (3Dircadb1.N/PATIENT_DICOM.zip, 3Dircadb1.N/MASKS_DICOM.zip).
_INNER_ZIPS = "*_DICOM.zip"
_REQUIRED = (
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelData",
)


# ------------------------------------------------------------------------------ DICOM series
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
class _Series:
    stored: np.ndarray  # (Columns, Rows, slices), stored values
    hu: np.ndarray  # same shape, float32, after RescaleSlope/RescaleIntercept
    affine: np.ndarray  # voxel -> RAS mm
    paths: tuple[Path, ...] = ()  # the slice files in array (k) order


def _series_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM series folder does not exist")
    # Hidden files (.DS_Store, AppleDouble ._image_0) are archive litter, never slices.
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: no files in the DICOM series folder")
    return files


def _read_dataset(path: Path) -> Dataset:
    try:
        try:
            return pydicom.dcmread(path)
        except InvalidDicomError:
            # Some exports have no 128-byte preamble + "DICM" marker: parse the bare data set.
            ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many exception types on garbage input
        raise DataError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise DataError(f"{path}: unreadable DICOM file (not DICOM, or no pixel data)")
    if "TransferSyntaxUID" not in ds.file_meta:
        # A bare data set has no file meta; pixel decoding needs the syntax it was parsed with.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
    return ds


def _read_slice(path: Path) -> _Slice:
    ds = _read_dataset(path)
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


def _read_series(folder: Path, spacing_rtol: float) -> _Series:
    return _series_from_files(_series_files(Path(folder)), Path(folder), spacing_rtol)


def _series_from_files(files: list[Path], folder: Path, spacing_rtol: float) -> _Series:
    """One series from its slice files (``folder`` names it in messages)."""
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
        if np.any(np.abs(gaps - median) > spacing_rtol * median):
            shown = ", ".join(f"{g:.3f}" for g in np.unique(np.round(gaps, 3))[:6])
            raise DataError(
                f"{folder}: slice spacing is not uniform (gaps {shown} mm, median "
                f"{median:.3f} mm; a missing or extra slice?)"
            )
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
        # Positions must lie on one line: a drifting in-plane offset (varying gantry tilt)
        # cannot be expressed by an affine.
        line = positions[0] + np.arange(len(slices))[:, None] * step
        if np.max(np.linalg.norm(positions - line, axis=1)) > spacing_rtol * median:
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
    return _Series(
        stored=stored, hu=hu, affine=_LPS_TO_RAS @ lps, paths=tuple(s.path for s in slices)
    )


def read_dicom_series(
    folder: Path, *, spacing_rtol: float = SPACING_RTOL
) -> tuple[np.ndarray, np.ndarray]:
    """Read one DICOM series folder as a (columns, rows, slices) float32 HU array + RAS affine.

    Slices are ordered by position along the normal because file names (``image_0`` ...
    ``image_10``) neither sort numerically as strings nor are guaranteed to follow anatomy.
    Raises :class:`DataError` naming the folder or file on: no files, an unreadable file, a
    missing attribute, mixed shapes/orientations/pixel spacings, duplicate slice positions,
    and slice gaps differing from their median by more than ``spacing_rtol``.
    """
    series = _read_series(Path(folder), spacing_rtol)
    return series.hu, series.affine


# --------------------------------------------------------------------------- DICOM tree
def _binary_from_series(series: _Series, folder: Path) -> np.ndarray:
    """0/1 mask from a mask series: IRCAD stores 0/255 (some writers 0/1).

    Rescaled values are what the file says the pixels mean, so they are tried first; a mask
    written with a CT-like RescaleIntercept still has 0/255 stored values, tried second.
    """
    for values in (series.hu, series.stored):
        present = set(np.unique(values).tolist())
        if present <= {0, 1} or present <= {0, 255}:
            return (values != 0).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in np.unique(series.hu)[:8])
    raise DataError(f"{folder}: liver mask is not binary: values {{{shown}}} (expected 0/255)")


def _find_case_dirs(root: Path) -> dict[int, Path]:
    if not root.is_dir():
        raise DataError(f"{root}: IRCAD DICOM root is not a folder")
    matched = sorted(
        p for p in root.rglob("3Dircadb1.*") if p.is_dir() and _CASE_DIR.fullmatch(p.name)
    )
    # An archive unpacked into a folder of its own name gives 3Dircadb1.1/3Dircadb1.1/...:
    # the outer folder is only a wrapper.
    leaves = [p for p in matched if not any(q != p and q.is_relative_to(p) for q in matched)]
    cases: dict[int, Path] = {}
    for folder in leaves:
        match = _CASE_DIR.fullmatch(folder.name)
        assert match is not None
        number = int(match.group(1))
        if number in cases:
            raise DataError(
                f"{folder}: duplicate case {case_id_for(number)}: also found as {cases[number]}"
            )
        cases[number] = folder
    if not cases:
        raise DataError(f"{root}: no 3Dircadb1.N patient folders found")
    return dict(sorted(cases.items()))


def _require_dir(path: Path) -> Path:
    if path.is_dir():
        return path
    packed = path.with_name(path.name + ".zip")
    if packed.is_file():
        raise DataError(f"{packed}: series is still zipped: unpack it to {path.name}/ first")
    raise DataError(f"{path}: expected DICOM series folder is missing")


def convert_dicom_tree(root: Path, out_dir: Path) -> list[str]:
    """Convert every ``3Dircadb1.N`` patient below ``root`` to a NIfTI pair in ``out_dir``.

    The CT and the liver mask must share one grid (shape and affine): a mask on another grid
    would silently label the wrong voxels. An empty liver mask is refused as well, since every
    IRCAD patient has a liver and an empty one means a wrong folder. Returns the case ids
    (``eNN``) sorted.
    """
    root, out_dir = Path(root), Path(out_dir)
    cases = _find_case_dirs(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    for number, folder in cases.items():
        ct_dir = _require_dir(folder / _CT_DIR)
        mask_dir = _require_dir(_require_dir(folder / _MASKS_DIR) / _LIVER_DIR)
        ct = _read_series(ct_dir, SPACING_RTOL)
        mask_series = _read_series(mask_dir, SPACING_RTOL)
        if mask_series.hu.shape != ct.hu.shape:
            raise DataError(
                f"{mask_dir}: mask series shape {mask_series.hu.shape} does not match CT "
                f"shape {ct.hu.shape} of {ct_dir}"
            )
        if not same_grid(mask_series.affine, ct.affine):
            raise DataError(
                f"{mask_dir}: mask geometry (spacing/position/orientation) differs from the "
                f"CT's ({ct_dir}); the pair is not on one grid"
            )
        mask = _binary_from_series(mask_series, mask_dir)
        if not mask.any():
            raise DataError(f"{mask_dir}: empty liver mask (no voxel is liver)")
        case_id = case_id_for(number)
        image_path, mask_path = output_paths(out_dir, case_id)
        save_pair(ct.hu, mask, ct.affine, image_path, mask_path)
        ids.append(case_id)
    return ids


# ------------------------------------------------------------------------------ dispatcher
def collect_cases(root: Path, layout: str, out_dir: Path) -> list[str]:
    """Bring the IRCAD data below ``root`` into the internal format in ``out_dir``.

    ``layout`` is ``"nifti"`` or ``"dicom"``. NIfTI pairs are loaded and validated with
    :func:`~liverseg.data.volumes.load_case` (shape/affine match, binary non-empty mask) and
    rewritten with ``save_pair`` rather than copied, so that every source ends as int16 CT +
    0/1 uint8 mask with one affine, whatever dtype, scaling or 0/255 coding it came with.
    Returns the case ids sorted.
    """
    root, out_dir = Path(root), Path(out_dir)
    if layout == "dicom":
        return convert_dicom_tree(root, out_dir)
    if layout != "nifti":
        raise ValueError(f"layout must be 'nifti' or 'dicom', not {layout!r}")
    pairs = find_nifti_pairs(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        case = load_case(pair.image, pair.mask, case_id=pair.case_id)
        image_path, mask_path = output_paths(out_dir, pair.case_id)
        save_pair(case.image.data, case.mask.data, case.image.affine, image_path, mask_path)
    return [pair.case_id for pair in pairs]


# ------------------------------------------------------------------------------ download
def unpack_archive(archive: Path, target: Path, *, max_bytes: int, inner_zips: bool) -> None:
    """Unpack ``archive`` into ``target`` with :func:`~liverseg.data.download.safe_extract_zip`,
    then, with ``inner_zips``, every ``*_DICOM.zip`` it holds in place (a zip's folder
    ``PATIENT_DICOM/`` lands beside the zip, which is removed).

    One budget for the whole archive: ``max_bytes`` bounds the bytes unpacked in total, the
    outer archive's entries (the inner zips among them) plus every inner zip's entries; the
    error names the zip whose entry crossed it, as ``<archive>: <path of the inner zip in it>``.
    ``target`` is replaced only once everything is unpacked; a refusal leaves it as it was.
    """
    with atomic_dir(target) as tree:
        used = sum(p.stat().st_size for p in safe_extract_zip(archive, tree, max_bytes=max_bytes))
        if inner_zips:
            for inner in sorted(tree.rglob(_INNER_ZIPS)):
                used += _unpack_inner(
                    inner,
                    f"{archive}: {inner.relative_to(tree).as_posix()}",
                    max_bytes=max_bytes,
                    used=used,
                )


def _unpack_inner(inner: Path, where: str, *, max_bytes: int, used: int) -> int:
    """Unpack ``inner`` beside itself and remove it; the bytes unpacked. ``where`` names it."""
    staging = inner.with_name(inner.name + ".unpacked")
    try:
        files = safe_extract_zip(inner, staging, max_bytes=max_bytes, unpacked_before=used)
    except DataError as exc:
        raise DataError(str(exc).replace(str(inner), where, 1)) from exc
    unpacked = sum(p.stat().st_size for p in files)
    for child in sorted(staging.iterdir()):
        if (inner.parent / child.name).exists():
            raise DataError(f"{where}: {child.name} is both inside this zip and beside it")
        child.rename(inner.parent / child.name)
    staging.rmdir()
    inner.unlink()
    return unpacked


def ingest_ircad(params: IrcadParams, out_dir: Path, cache: Path) -> list[str]:
    """The IRCAD data of ``params`` (``ingest.ircad``) in the internal format in ``out_dir``.

    A ``*-dir`` format is read in place; otherwise ``params.source`` (URL or local archive) is
    fetched into ``cache`` as ``ircad-source.zip``, checked against ``params.sha256`` when set,
    unpacked into a temporary folder in ``cache`` within ``params.max_unpacked_gb`` (inner
    ``*_DICOM.zip`` included, see :func:`unpack_archive`) and converted. Prints the archive's
    SHA-256, so that a first download can be pinned. Returns the case ids sorted.
    """
    layout = "dicom" if params.format.startswith("dicom") else "nifti"
    if params.format.endswith("-dir"):
        return collect_cases(Path(params.source), layout, out_dir)
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / "ircad-source.zip"
    digest = fetch(params.source, archive, params.sha256)
    print(f"ingest: {params.source}\n  SHA-256 {digest}")
    if not params.sha256:
        print("  (pin it: set ingest.ircad.sha256 in params.yaml to verify later downloads)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        unpacked = Path(tmp) / "unpacked"
        max_bytes = int(params.max_unpacked_gb * 1e9)
        unpack_archive(archive, unpacked, max_bytes=max_bytes, inner_zips=layout == "dicom")
        return collect_cases(unpacked, layout, out_dir)
