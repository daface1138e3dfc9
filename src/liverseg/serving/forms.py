"""The request forms of the served model, decoded and checked (docs/serving.md has the API).

Slices: ``(N, H, W)`` CT values in HU. Volumes: one base64 ``.nii``/``.nii.gz`` (column
``nifti``) or a base64 zip of a DICOM series (column ``dicom_zip``), read into RAS as
``liverseg predict`` reads them. Nothing a request makes the model allocate may exceed
``LIVERSEG_MAX_REQUEST_MB``; every refusal is a DataError naming the field and the problem.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from liverseg.data.dicom import DicomSeries, read_ct_series
from liverseg.data.volumes import (
    TooLargeError,
    Volume,
    nifti_from_bytes,
    volume_from_image,
)
from liverseg.errors import DataError

MAX_REQUEST_ENV = "LIVERSEG_MAX_REQUEST_MB"
NIFTI_COLUMN = "nifti"
DICOM_COLUMN = "dicom_zip"
_FILE_OF = {NIFTI_COLUMN: "the NIfTI file", DICOM_COLUMN: "the zip file"}
_MB = 1024 * 1024


def max_request_bytes(environ: dict[str, str] | None = None) -> int:
    """The request bound in bytes from ``LIVERSEG_MAX_REQUEST_MB`` (a positive number, 512)."""
    raw = (os.environ if environ is None else environ).get(MAX_REQUEST_ENV, "").strip() or "512"
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not (np.isfinite(mb) and mb > 0):
        raise ValueError(f"{MAX_REQUEST_ENV}={raw!r}: must be a positive number of megabytes")
    return int(mb * _MB)


def _too_large(what: str, n_bytes: int, limit: int) -> DataError:
    return DataError(
        f"request too large: {what} is {n_bytes / _MB:.1f} MB, over the server's limit of "
        f"{limit / _MB:.1f} MB ({MAX_REQUEST_ENV})"
    )


def slices_from_input(model_input: Any, limit: int) -> np.ndarray:
    """The slice form as a finite float32 ``(N, H, W)`` array, or DataError saying why not."""
    try:
        arr = np.asarray(model_input)
    except ValueError as exc:  # ragged nested lists (in-process callers)
        raise DataError(f"slices: not a rectangular (N, H, W) array ({exc})") from exc
    if arr.dtype.kind not in "iuf":
        raise DataError(
            f"slices: expected numbers (CT values in HU), got values of type {arr.dtype}"
        )
    if arr.size == 0:
        raise DataError(f"slices: empty input of shape {arr.shape}")
    if arr.ndim != 3:
        raise DataError(
            f"slices: expected shape (N, H, W), got shape {arr.shape} "
            "(send one slice as [[[...], ...]])"
        )
    if arr.size * 4 > limit:
        raise _too_large(f"the slices array {arr.shape} as float32", arr.size * 4, limit)
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
        out = arr.astype(np.float32)
    bad = out.size - int(np.count_nonzero(np.isfinite(out)))
    if bad:
        raise DataError(f"slices: {bad} values are NaN or inf (or outside the float32 range)")
    return out


def _decode(payload: Any, column: str, limit: int) -> bytes:
    """The bytes of a base64 field, bounded by ``limit`` before they are decoded."""
    if isinstance(payload, bytes):
        payload = payload.decode("ascii", errors="replace")
    if not isinstance(payload, str):
        kind = ".nii/.nii.gz" if column == NIFTI_COLUMN else ".zip"
        raise DataError(
            f"{column}: expected a base64 string of a {kind} file, got {type(payload).__name__}"
        )
    compact = "".join(payload.split())  # `base64` wraps lines at 76 characters unless -w0
    if not compact:
        raise DataError(f"{column}: empty string")
    if len(compact) * 3 // 4 > limit:
        raise _too_large(_FILE_OF[column], len(compact) * 3 // 4, limit)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"{column}: not valid base64 ({exc})") from exc


def volume_from_payload(payload: Any, limit: int) -> Volume:
    """The CT of a base64 ``.nii``/``.nii.gz``, validated and in RAS (see
    :func:`volume_from_image`); a decoded file or float32 voxel array over ``limit`` bytes is
    refused before it is read."""
    try:
        img = nifti_from_bytes(_decode(payload, NIFTI_COLUMN, limit), limit, NIFTI_COLUMN)
    except TooLargeError as exc:
        raise _too_large(exc.what, exc.n_bytes, exc.limit) from exc
    try:
        return volume_from_image(img, kind="image")
    except DataError as exc:
        raise DataError(f"{NIFTI_COLUMN}: {exc}") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{NIFTI_COLUMN}: unreadable voxel data ({exc})") from exc


def series_from_payload(payload: Any, limit: int, series_uid: str | None) -> DicomSeries:
    """The CT series of a base64 zip; the zip and what it unpacks to are bounded by ``limit``."""
    raw = _decode(payload, DICOM_COLUMN, limit)
    with tempfile.TemporaryDirectory(prefix="liverseg-dicom-") as tmp:
        archive = Path(tmp) / "series.zip"
        archive.write_bytes(raw)
        try:
            return read_ct_series(archive, series_uid, max_bytes=limit)
        except DataError as exc:  # a temporary path means nothing to the client: name the field
            message = str(exc).replace(str(archive), DICOM_COLUMN).replace(tmp, DICOM_COLUMN)
            raise DataError(message) from exc


def volume_payloads(model_input: Any) -> tuple[str, list[Any]] | None:
    """The column (``nifti`` or ``dicom_zip``) and values of a volume request, or None for
    slices."""
    if isinstance(model_input, pd.DataFrame | dict):
        for column in (NIFTI_COLUMN, DICOM_COLUMN):
            if column in model_input:  # a DataFrame's columns, a dict's keys
                return column, list(np.ravel(np.asarray(model_input[column], dtype=object)))
        raise DataError(
            f"expected a '{NIFTI_COLUMN}' column (base64 of a .nii/.nii.gz CT) or a "
            f"'{DICOM_COLUMN}' column (base64 of a zipped DICOM series), got columns "
            f'{sorted(map(str, model_input))}; send slices as {{"inputs": [[[...]]]}}'
        )
    return None


def slice_orientation(params: dict[str, Any] | None) -> tuple[str, str, str]:
    """The ``orientation`` param as nibabel axis codes of ``(H, W, N)`` (default RAS)."""
    raw = (params or {}).get("orientation") or "RAS"
    codes = tuple(str(raw).upper())
    axis_of = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    if len(codes) != 3 or sorted(axis_of.get(c, -1) for c in codes) != [0, 1, 2]:
        raise DataError(
            f"params: orientation must be three axis codes, one of L/R, A/P and S/I each "
            f"(e.g. RAS, LAS, LPS), got {raw!r}"
        )
    if codes[2] not in ("S", "I"):
        raise DataError(
            f"params: orientation {raw!r}: slices must be axial (the third code S or I); "
            "send axial slices (N, H, W)"
        )
    return codes[0], codes[1], codes[2]
