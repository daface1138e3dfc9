"""A small client of the served model (``mlflow models serve``), standard library only.

``url`` is the server's base address (``http://127.0.0.1:5000``) or its ``/invocations``
endpoint. Shapes: ``segment_slices`` takes and returns ``(N, H, W)`` arrays (HU in, 0/1 uint8
out; ``orientation`` names the slices' axes, default RAS); ``segment_volume_file`` sends a
whole NIfTI CT and writes the mask on the CT's own grid; ``segment_dicom`` sends a DICOM series
(a folder or a zip) and writes a DICOM SEG (or a NIfTI mask), returning the quality report.
A refused request raises :class:`ServingError` with the server's message (HTTP 400 for a bad
input, e.g. ``slices: expected shape (N, H, W) ...``).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from liverseg.errors import DataError, LiversegError
from liverseg.fsutil import atomic_file

DEFAULT_TIMEOUT_S = 300.0
_MLFLOW_ERROR_PREFIX = "\nError: "
_INT_SAFE = 2.0**31  # floats below this that are whole numbers convert to int64 exactly


class ServingError(LiversegError, RuntimeError):
    """The server refused or failed a request, or could not be reached (message says which)."""


def invocations_url(url: str) -> str:
    """``url`` with ``/invocations`` appended unless it already ends with it."""
    base = url.rstrip("/")
    return base if base.endswith("/invocations") else base + "/invocations"


def post_json(url: str, body: dict[str, Any], timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """POST ``body`` as JSON to the scoring endpoint; the decoded ``predictions``."""
    target = invocations_url(url)
    data = json.dumps(body, allow_nan=False).encode()
    request = urllib.request.Request(
        target, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", errors="replace")
        try:
            message = str(json.loads(text).get("message", text))
        except (ValueError, AttributeError):
            message = text
        # The scoring server prefixes the model's message with a dump of the input data.
        message = message.rsplit(_MLFLOW_ERROR_PREFIX, 1)[-1]
        raise ServingError(f"{target}: HTTP {exc.code}: {message}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise ServingError(f"{target}: cannot reach the server ({exc})") from exc
    if not isinstance(answer, dict) or "predictions" not in answer:
        raise ServingError(f"{target}: unexpected answer without 'predictions'")
    return answer["predictions"]


def _jsonable_slices(slices: np.ndarray) -> list[Any]:
    arr = np.asarray(slices)
    if arr.ndim != 3:
        raise DataError(f"slices: expected shape (N, H, W), got {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DataError("slices: NaN or inf values cannot be sent")
        # CT values are mostly whole HU: sending those as integers is lossless and shortens
        # the JSON about threefold.
        if np.abs(arr).max() < _INT_SAFE and np.array_equal(arr, np.round(arr)):
            arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise DataError(f"slices: expected numbers (HU), got dtype {arr.dtype}")
    out: list[Any] = arr.tolist()
    return out


def segment_slices(
    url: str,
    slices: np.ndarray,
    *,
    orientation: str = "RAS",
    timeout: float = DEFAULT_TIMEOUT_S,
) -> np.ndarray:
    """Masks (N, H, W) uint8 0/1 of a stack of axial slices (N, H, W) in HU whose axes
    ``(H, W, N)`` run along ``orientation`` (nibabel axis codes, e.g. ``LAS``)."""
    body: dict[str, Any] = {"inputs": _jsonable_slices(slices)}
    if orientation.upper() != "RAS":
        body["params"] = {"orientation": orientation}
    predictions = post_json(url, body, timeout)
    masks = np.asarray(predictions, dtype=np.uint8)
    if masks.shape != np.shape(slices):
        raise ServingError(f"{url}: answer of shape {masks.shape} for slices {np.shape(slices)}")
    return masks


def segment_volume_file(
    url: str, ct_path: Path, out_path: Path, *, timeout: float = DEFAULT_TIMEOUT_S
) -> float:
    """Send a CT NIfTI file, write its liver mask to ``out_path``; the liver volume in mL.

    The mask is written gzip-compressed unless ``out_path`` ends in plain ``.nii``.
    """
    ct_path, out_path = Path(ct_path), Path(out_path)
    try:
        payload = base64.b64encode(ct_path.read_bytes()).decode("ascii")
    except FileNotFoundError as exc:
        raise DataError(f"{ct_path}: file not found") from exc
    body = {"dataframe_split": {"columns": ["nifti"], "data": [[payload]]}}
    predictions = post_json(url, body, timeout)
    try:
        record = predictions[0]
        mask_gz = base64.b64decode(record["mask_nifti"], validate=True)
        volume_ml = float(record["liver_volume_ml"])
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise ServingError(f"{url}: unexpected answer for a volume ({exc})") from exc
    data = gzip.decompress(mask_gz) if out_path.name.endswith(".nii") else mask_gz
    with atomic_file(out_path) as tmp:
        tmp.write_bytes(data)
    return volume_ml


def _zip_bytes(source: Path) -> bytes:
    """The bytes of ``source`` if it is a zip, else a zip of the files below the folder."""
    if source.is_file():
        return source.read_bytes()
    if not source.is_dir():
        raise DataError(f"{source}: not found (expected a DICOM folder or a .zip of one)")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(source).as_posix())
    return buffer.getvalue()


def segment_dicom(
    url: str,
    source: Path,
    out_path: Path,
    *,
    series: str | None = None,
    mask_format: str = "seg",
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Send a DICOM CT series (a folder, zipped here, or a .zip), write its liver mask to
    ``out_path`` (a DICOM SEG, or with ``mask_format="nifti"`` a .nii.gz on the series' grid);
    the answer without the mask: ``series``, ``liver_volume_ml``, ``quality`` (with ``review``).
    """
    source, out_path = Path(source), Path(out_path)
    params: dict[str, Any] = {"mask_format": mask_format}
    if series:
        params["series"] = series
    body = {
        "dataframe_split": {
            "columns": ["dicom_zip"],
            "data": [[base64.b64encode(_zip_bytes(source)).decode("ascii")]],
        },
        "params": params,
    }
    predictions = post_json(url, body, timeout)
    key = "mask_seg" if mask_format == "seg" else "mask_nifti"
    try:
        record = dict(predictions[0])
        data = base64.b64decode(record.pop(key), validate=True)
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise ServingError(f"{url}: unexpected answer for a DICOM series ({exc})") from exc
    with atomic_file(out_path) as tmp:
        tmp.write_bytes(data)
    return record
