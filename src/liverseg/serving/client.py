"""A small HTTP client of the served model (``mlflow models serve``), standard library only.

``url`` is the server's base address (``http://127.0.0.1:5000``) or its ``/invocations``
endpoint; the forms and answers are docs/serving.md's. A refused request raises
:class:`ServingError` with the server's one line.
"""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from liverseg.errors import DataError, LiversegError
from liverseg.fsutil import atomic_file

DEFAULT_TIMEOUT_S = 300.0
_MLFLOW_ERROR_PREFIX = "\nError: "


class ServingError(LiversegError, RuntimeError):
    """The server refused or failed a request, or could not be reached (message says which)."""


def invocations_url(url: str) -> str:
    """``url``, ending in ``/invocations``."""
    base = url.rstrip("/")
    return base if base.endswith("/invocations") else base + "/invocations"


def post_json(url: str, body: dict[str, Any], timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """POST ``body`` as JSON to the scoring endpoint; the decoded ``predictions``."""
    target = invocations_url(url)
    request = urllib.request.Request(
        target, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
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


def segment_slices(
    url: str,
    slices: np.ndarray,
    *,
    orientation: str = "RAS",
    timeout: float = DEFAULT_TIMEOUT_S,
) -> np.ndarray:
    """Masks (N, H, W) uint8 0/1 of a stack of axial slices (N, H, W) in HU whose axes
    ``(H, W, N)`` run along ``orientation`` (nibabel axis codes, e.g. ``LAS``)."""
    arr = np.asarray(slices)
    # CT values are mostly whole HU: as integers the JSON is about three times shorter. What
    # the server refuses (NaN, a wrong shape or type), it refuses with its own line.
    if arr.dtype.kind == "f" and np.all(np.abs(arr) < 2**31) and np.array_equal(arr, np.round(arr)):
        arr = arr.astype(np.int64)
    body: dict[str, Any] = {"inputs": arr.tolist()}
    if orientation.upper() != "RAS":
        body["params"] = {"orientation": orientation}
    predictions = post_json(url, body, timeout)
    masks = np.asarray(predictions, dtype=np.uint8)
    if masks.shape != np.shape(slices):
        raise ServingError(f"{url}: answer of shape {masks.shape} for slices {np.shape(slices)}")
    return masks


def _send_volume(
    url: str, column: str, data: bytes, params: dict[str, Any], timeout: float
) -> tuple[dict[str, Any], bytes]:
    """POST one volume in the ``column`` form; the answer's record and its decoded mask."""
    body: dict[str, Any] = {
        "dataframe_split": {"columns": [column], "data": [[base64.b64encode(data).decode()]]}
    }
    if params:
        body["params"] = params
    predictions = post_json(url, body, timeout)
    key = "mask_seg" if params.get("mask_format", "nifti") == "seg" else "mask_nifti"
    try:
        record = dict(predictions[0])
        return record, base64.b64decode(record.pop(key), validate=True)
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise ServingError(f"{url}: unexpected answer for a volume ({exc})") from exc


def segment_volume_file(
    url: str, ct_path: Path, out_path: Path, *, timeout: float = DEFAULT_TIMEOUT_S
) -> float:
    """Send a CT NIfTI file, write its liver mask to ``out_path`` (gzip-compressed unless it
    ends in plain ``.nii``); the liver volume in mL."""
    ct_path, out_path = Path(ct_path), Path(out_path)
    try:
        record, mask_gz = _send_volume(url, "nifti", ct_path.read_bytes(), {}, timeout)
    except FileNotFoundError as exc:
        raise DataError(f"{ct_path}: file not found") from exc
    with atomic_file(out_path) as tmp:
        tmp.write_bytes(gzip.decompress(mask_gz) if out_path.name.endswith(".nii") else mask_gz)
    return float(record["liver_volume_ml"])


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
    source = Path(source)
    if source.is_dir():  # zipped here
        with tempfile.TemporaryDirectory(prefix="liverseg-zip-") as tmp:
            body = Path(shutil.make_archive(f"{tmp}/series", "zip", source)).read_bytes()
    elif source.is_file():
        body = source.read_bytes()
    else:
        raise DataError(f"{source}: not found (expected a DICOM folder or a .zip of one)")
    params = {"mask_format": mask_format, **({"series": series} if series else {})}
    record, data = _send_volume(url, "dicom_zip", body, params, timeout)
    with atomic_file(Path(out_path)) as tmp:
        tmp.write_bytes(data)
    return record
