"""NIfTI I/O: the one place where volumes are read, validated, reoriented and written.

Sources: files (:func:`load_volume`, :func:`load_case`) and untrusted bytes such as a request's
upload (:func:`nifti_from_bytes`, bounded before a voxel is read).

Axis contract: every array this module returns is in the canonical RAS orientation that
``nibabel.as_closest_canonical`` gives, axes (x, y, z) = (towards Right, towards Anterior,
towards Superior), so ``data[:, :, k]`` is one axial slice and slices of every source look
alike whatever orientation the file was stored in. The file's own affine and header are kept
so that a mask computed on the RAS array goes back onto the input's grid with
:func:`from_canonical` / :func:`save_mask_like`.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from liverseg.errors import DataError
from liverseg.fsutil import atomic_file

RAS = axcodes2ornt(("R", "A", "S"))

# The largest volume read, in voxels, checked against the header before any voxel is read (a
# 1 KB .nii.gz may claim 2000^3 voxels). The default fits real CT (1024 x 1024 x 2000 slices);
# LIVERSEG_MAX_VOXELS changes it for the CLI, the stages and the model server alike.
MAX_VOXELS_ENV = "LIVERSEG_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 1024 * 1024 * 2000


def check_voxel_count(shape: tuple[int, ...], where: str) -> None:
    """DataError naming ``where`` and the claimed shape when it exceeds the voxel limit
    (``LIVERSEG_MAX_VOXELS``, a positive integer, or the default)."""
    raw = os.environ.get(MAX_VOXELS_ENV, "").strip() or str(DEFAULT_MAX_VOXELS)
    if not raw.isdigit() or int(raw) < 1:
        raise DataError(f"{MAX_VOXELS_ENV}={raw!r}: must be a positive integer (voxels)")
    n, limit = int(np.prod([int(s) for s in shape], dtype=np.int64)), int(raw)
    if n > limit:
        raise DataError(
            f"{where}: header claims shape {tuple(int(s) for s in shape)} = {n:,} voxels, over "
            f"the limit of {limit:,} ({MAX_VOXELS_ENV}); refused before reading any voxel"
        )


# Two volumes are on one grid when their affines agree to this: a thousandth of a mm plus the
# float32 rounding of a NIfTI header's translation (rtol). The one rule for every reader.
GRID_ATOL_MM = 1e-3
GRID_RTOL = 1e-4


@dataclass(frozen=True)
class Volume:
    """A 3-D volume in canonical RAS orientation, remembering the file it came from.

    ``data`` is float32 (CT in HU) or uint8 (mask, 0/1); ``affine`` maps RAS voxel indices to
    scanner millimetres; ``source_affine``/``header`` are the file's own, for writing back.
    """

    data: np.ndarray
    affine: np.ndarray
    source_affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the RAS array axes."""
        sx, sy, sz = nib.affines.voxel_sizes(self.affine)
        return (float(sx), float(sy), float(sz))

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def volume_from_image(
    img: nib.Nifti1Image, *, kind: Literal["image", "mask", "labels"], path: Path | None = None
) -> Volume:
    """Validate an in-memory NIfTI image and reorient it to RAS.

    ``kind`` is "image" (CT in HU, float32), "mask" (values {0, 1} or {0, 255}, uint8 0/1) or
    "labels" (integers, kept as stored).
    """
    where = str(path) if path is not None else "<in-memory NIfTI>"
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = nib.funcs.squeeze_image(img)
        shape = img.shape
    if len(shape) != 3:
        raise DataError(f"{where}: expected a 3-D volume, got {len(shape)}-D shape {tuple(shape)}")
    if min(shape) < 1:
        raise DataError(f"{where}: empty volume of shape {tuple(shape)}")
    source_affine = img.affine.copy()
    if not np.all(np.isfinite(source_affine)):
        raise DataError(f"{where}: affine has NaN or inf entries")
    canon = nib.as_closest_canonical(img)
    raw = np.asanyarray(canon.dataobj)
    if kind == "image":
        data = np.asarray(canon.get_fdata(dtype=np.float32))
        if not np.all(np.isfinite(data)):
            n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
            raise DataError(f"{where}: {n_bad} NaN or inf voxels in the CT")
    elif kind == "mask":
        data = binary_mask(np.asarray(raw), where)
    else:  # labels: integer labels or packed bits (liverseg.data.labelmaps), as stored
        data = np.asarray(raw)
        if data.dtype.kind not in "ui":
            raise DataError(f"{where}: label volume of type {data.dtype}, expected integers")
    return Volume(
        data=data,
        affine=canon.affine.copy(),
        source_affine=source_affine,
        header=img.header.copy(),
        path=path,
    )


def binary_mask(raw: np.ndarray, where: str) -> np.ndarray:
    """``raw`` as a uint8 0/1 mask; 0/255 (as some exports store masks) is accepted too."""
    if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
        raise DataError(f"{where}: NaN or inf values in the mask")
    values = np.unique(raw)
    if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
        return (raw != 0).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if values.size > 8 else "")
    raise DataError(f"{where}: mask is not binary: values {{{shown}}} (expected 0/1 or 0/255)")


# NIfTI header facts used to refuse non-NIfTI bytes before nibabel guesses at them.
_NIFTI1_HEADER_SIZE = 348
_NIFTI2_HEADER_SIZE = 540
_NIFTI1_MAGIC = slice(344, 348)  # "n+1\0" single file, "ni1\0" .hdr of a pair
_GZIP_MAGIC = b"\x1f\x8b"
_FLOAT32_BYTES = 4
_MB = 1024 * 1024


class TooLargeError(DataError):
    """Bytes (``what``, ``n_bytes`` of them) over a caller's ``limit``: the caller says whose."""

    def __init__(self, source: str, what: str, n_bytes: int, limit: int) -> None:
        super().__init__(
            f"{source}: {what} is {n_bytes / _MB:.1f} MB, over the limit of {limit / _MB:.1f} MB"
        )
        self.what, self.n_bytes, self.limit = what, n_bytes, limit


def nifti_from_bytes(data: bytes, limit: int, source: str) -> nib.Nifti1Image | nib.Nifti2Image:
    """The NIfTI image in ``data``: a single-file ``.nii`` or ``.nii.gz``, NIfTI-1 or -2.

    Untrusted bytes (a request body): a decompressed file or a float32 voxel array over
    ``limit`` bytes is a :class:`TooLargeError`, and a shape over the voxel limit a
    DataError, both before a voxel is read; every other problem (corrupt or truncated gzip,
    not NIfTI, a ``.hdr`` of a pair, a header that promises more voxels than the bytes hold)
    is a DataError starting with ``source``.
    """
    if data[:2] == _GZIP_MAGIC:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            data = inflater.decompress(data, limit + 1)
        except zlib.error as exc:
            raise DataError(f"{source}: corrupt gzip data ({exc})") from exc
        if len(data) > limit or inflater.unconsumed_tail:
            raise TooLargeError(
                source, "the NIfTI file after gunzip", max(len(data), limit + 1), limit
            )
        if not inflater.eof:
            raise DataError(f"{source}: truncated gzip data (the stream ends early)")
    cls = _nifti_kind(data, source)
    try:
        img = cls.from_bytes(data)
        header = img.header
        shape = tuple(int(s) for s in img.shape)
        itemsize = header.get_data_dtype().itemsize
        offset = int(header.get_data_offset())
    except Exception as exc:  # nibabel raises many types for a malformed header
        raise DataError(f"{source}: unreadable NIfTI header ({exc})") from exc
    # nibabel reports offset 0 for an in-memory single file; voxels start after the header.
    offset = max(offset, len(header.binaryblock) + 4)
    check_voxel_count(shape, source)
    n_vox = int(np.prod(shape, dtype=np.int64))
    if n_vox * _FLOAT32_BYTES > limit:
        raise TooLargeError(source, f"the volume {shape} as float32", n_vox * _FLOAT32_BYTES, limit)
    if offset + n_vox * itemsize > len(data):
        raise DataError(
            f"{source}: truncated NIfTI: the header declares shape {shape} "
            f"({n_vox * itemsize} bytes of voxels), the file has {max(len(data) - offset, 0)}"
        )
    return img


def _nifti_kind(raw: bytes, source: str) -> type[nib.Nifti1Image] | type[nib.Nifti2Image]:
    if len(raw) < _NIFTI1_HEADER_SIZE:
        raise DataError(
            f"{source}: not a NIfTI file ({len(raw)} bytes, shorter than a NIfTI header)"
        )
    sizes = {struct.unpack("<i", raw[:4])[0], struct.unpack(">i", raw[:4])[0]}
    if _NIFTI1_HEADER_SIZE in sizes:
        magic = raw[_NIFTI1_MAGIC]
        if magic == b"ni1\x00":
            raise DataError(
                f"{source}: a NIfTI .hdr/.img pair header; send a single-file .nii or .nii.gz"
            )
        if magic != b"n+1\x00":
            raise DataError(f"{source}: not a NIfTI-1 file (bad magic {magic!r})")
        return nib.Nifti1Image
    if _NIFTI2_HEADER_SIZE in sizes and len(raw) >= _NIFTI2_HEADER_SIZE:
        return nib.Nifti2Image
    raise DataError(
        f"{source}: not a NIfTI file (header size field {sorted(sizes)[0]}, "
        f"expected {_NIFTI1_HEADER_SIZE} or {_NIFTI2_HEADER_SIZE})"
    )


def load_volume(path: Path, *, kind: Literal["image", "mask", "labels"] = "image") -> Volume:
    """Load, validate and reorient a NIfTI file (see :func:`volume_from_image`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        img: Any = nib.load(str(path))
        check_voxel_count(tuple(img.shape), str(path))
        # nibabel reads lazily: force the read here, so a corrupt gzip fails now, naming the file.
        np.asanyarray(img.dataobj)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt NIfTI ({exc})") from exc
    except nib.filebasedimages.ImageFileError as exc:
        raise DataError(f"{path}: not a NIfTI image ({exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise DataError(f"{path}: not a NIfTI image (got {type(img).__name__})")
    return volume_from_image(img, kind=kind, path=path)


@dataclass(frozen=True)
class Case:
    """A CT volume and its liver mask on the same grid, both in RAS."""

    case_id: str
    image: Volume
    mask: Volume


def load_case(image_path: Path, mask_path: Path, *, case_id: str) -> Case:
    """Load a CT/mask pair and check that they belong together: a DataError names the file on
    a shape or affine mismatch and on a mask without any liver voxel."""
    image = load_volume(image_path, kind="image")
    mask = load_volume(mask_path, kind="mask")
    check_pair(image.data, image.affine, mask.data, mask.affine, image_path, mask_path)
    if not mask.data.any():
        raise DataError(f"{mask_path}: empty liver mask (no voxel is 1) in a training case")
    return Case(case_id=case_id, image=image, mask=mask)


def check_pair(
    image: np.ndarray,
    image_affine: np.ndarray,
    mask: np.ndarray,
    mask_affine: np.ndarray,
    image_path: Path,
    mask_path: Path,
) -> None:
    """DataError naming ``mask_path`` unless the CT and its mask share one grid."""
    if image.shape != mask.shape:
        raise DataError(
            f"{mask_path}: mask shape {mask.shape} does not match CT shape {image.shape} of "
            f"{image_path}"
        )
    if not np.allclose(image_affine, mask_affine, atol=GRID_ATOL_MM, rtol=GRID_RTOL):
        raise DataError(
            f"{mask_path}: mask affine differs from the CT's ({image_path}); "
            f"the pair is not on one grid"
        )


def from_canonical(data_ras: np.ndarray, ref: Volume) -> np.ndarray:
    """Map an array on ``ref``'s RAS grid back onto the grid of the file ``ref`` came from."""
    back = ornt_transform(RAS, io_orientation(ref.source_affine))
    return apply_orientation(data_ras, back)


def save_mask_like(mask_ras: np.ndarray, ref: Volume, path: Path) -> Path:
    """Write a 0/1 mask (on ``ref``'s RAS grid) as uint8 NIfTI on the input's own grid.

    The output carries the input's affine and header (sform/qform codes, pixdim), with the
    data type set to uint8 and no intensity scaling. Written atomically.
    """
    return _save_like(mask_ras, ref, path, np.uint8, "mask")


def _save_like(data_ras: np.ndarray, ref: Volume, path: Path, dtype: Any, what: str) -> Path:
    """``data_ras`` (on ``ref``'s RAS grid) as ``dtype`` on ``ref``'s own grid and header."""
    if data_ras.shape != ref.data.shape:
        raise ValueError(f"{what} shape {data_ras.shape} != reference shape {ref.data.shape}")
    data = np.ascontiguousarray(from_canonical(data_ras.astype(dtype), ref))
    header = ref.header.copy()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(data, ref.source_affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    return save_nifti(img, Path(path))


def save_pair(
    image_hu: np.ndarray, mask: np.ndarray, affine: np.ndarray, image_path: Path, mask_path: Path
) -> None:
    """Write a CT (int16 HU) and its mask (uint8 0/1) as NIfTI files with one affine."""
    ct = np.clip(np.rint(image_hu), -32768, 32767).astype(np.int16)
    save_nifti(nifti_image(ct, affine), Path(image_path))
    save_nifti(nifti_image((mask != 0).astype(np.uint8), affine), Path(mask_path))


def nifti_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """``data`` on ``affine`` (mm), with sform and qform both set to it as scanner coordinates."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return img


def save_nifti(img: nib.Nifti1Image, path: Path) -> Path:
    """Write ``img`` to ``path`` atomically (compressed when the name ends in .nii.gz)."""
    # The temporary name must keep the .nii.gz suffix: nibabel picks compression from it.
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    with atomic_file(path) as tmp:
        real_tmp = tmp.with_name(tmp.name + suffix)
        try:
            nib.save(img, str(real_tmp))
            real_tmp.replace(tmp)
        finally:
            real_tmp.unlink(missing_ok=True)
    return path


def save_probabilities_like(prob_ras: np.ndarray, ref: Volume, path: Path) -> Path:
    """Write a float32 map in [0, 1] (on ``ref``'s RAS grid) on the input's own grid, as
    :func:`save_mask_like` writes masks. Written atomically."""
    return _save_like(prob_ras, ref, path, np.float32, "map")
