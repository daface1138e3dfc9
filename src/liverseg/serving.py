"""MLflow pyfunc around :class:`~liverseg.inference.Segmenter`, for ``mlflow models serve``.

Two request forms reach :meth:`LiverSegModel.predict` (JSON bodies of ``POST /invocations``):

1. Slices: ``{"inputs": [[[hu, ...], ...], ...]}``, an array ``(N, H, W)`` of CT values in HU,
   any ``N, H, W >= 1`` (each slice is resized to the network's size and the mask back to
   ``H x W``). Answer: ``{"predictions": <(N, H, W) array of 0/1>}``, the same masks as
   :meth:`Segmenter.segment_slices` (threshold and per-slice hole filling; no 3-D component,
   since the slices need not be neighbours).
2. A whole volume: ``{"dataframe_split": {"columns": ["nifti"], "data": [["<base64>"]]}}``, the
   base64 of a single-file ``.nii`` or ``.nii.gz`` CT in HU, any orientation, one volume per
   request. Answer: ``{"predictions": [{"mask_nifti": "<base64 .nii.gz>", "liver_volume_ml":
   float, "liver_voxels": int}]}``; the mask is uint8 0/1 on the input's own grid, affine and header
   (what ``liverseg predict`` writes), after the full 3-D post-processing.

3. A DICOM series: ``{"dataframe_split": {"columns": ["dicom_zip"], "data": [["<base64>"]]}}``,
   the base64 of a zip of one CT series (or of a folder of several, with ``"params":
   {"series": "<SeriesInstanceUID>"}``), read as ``liverseg predict`` reads it
   (:mod:`liverseg.data.dicom`). Answer: ``{"predictions": [{"mask_seg": "<base64 DICOM SEG>",
   ...}]}`` (or ``mask_nifti`` on the series' grid with ``"params": {"mask_format": "nifti"}``).

Volume answers (forms 2 and 3) also carry ``quality``: the report of
:mod:`liverseg.evaluation.quality` (``review`` true/false and its ``reasons``).

Optional request ``"params"`` override the logged post-processing: ``threshold`` (0..1),
``largest_component`` and ``fill_holes`` (booleans); ``orientation`` (slice form, default
``RAS``) names the axes of the slices as nibabel axis codes of ``(H, W, N)``: slices cut from
a volume stored L,A,S are ``"LAS"``, and are reoriented to RAS for the network and back.

Signature. The logged signature declares these params only and no input schema, on purpose:
MLflow 3.17 parses and enforces the body against the input schema before ``predict`` runs, and
no schema admits both forms (tried): a ``TensorSpec(float32, (-1, -1, -1))`` rejects the
``nifti`` string column while parsing; a ``ColSpec(string, "nifti")`` turns every tensor value
into a Python string inside a DataFrame (about 1 s more per 512x512 slice); ``ColSpec(Any)``
turns slices into DataFrame rows. The two forms, with their variable ``-1`` dimensions, are
recorded in the MLmodel ``metadata`` instead, and :meth:`LiverSegModel.predict` validates every
request itself, answering HTTP 400 with a message that says what is wrong.

Request size. ``LIVERSEG_MAX_REQUEST_MB`` (default 512, read when the model loads) bounds what
a request may make the model allocate: the slices as float32 for form 1; for form 2 the NIfTI
file after base64 and gzip decoding, and its voxels as float32 (checked from the header before
any voxel is read, so a small gzip bomb is refused too). The scoring server itself reads and
JSON-parses the whole body before ``predict`` runs and has no body-size option, so a hard limit
on bytes on the wire belongs in a reverse proxy in front (e.g. nginx ``client_max_body_size``).

Array contract: slices ``(N, H, W)`` as sent; volumes as stored in the file, reoriented to RAS
for the network and back (see :mod:`liverseg.data.volumes`).
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, TensorSpec

from liverseg import server_log
from liverseg.data.dicom import DicomSeries, read_ct_series
from liverseg.data.volumes import (
    TooLargeError,
    Volume,
    from_canonical,
    nifti_from_bytes,
    save_mask_like,
    volume_from_image,
)
from liverseg.errors import DataError
from liverseg.evaluation.quality import quality_report
from liverseg.fsutil import read_stage_json
from liverseg.inference import PostProcessing, Segmenter
from liverseg.model_dir import PREPROCESSING_FILE, check_model_dir
from liverseg.tracking import tensorflow_distribution

MAX_REQUEST_ENV = "LIVERSEG_MAX_REQUEST_MB"
DEFAULT_MAX_REQUEST_MB = 512.0
POSTPROCESSING_FILE = "postprocessing.json"
NIFTI_COLUMN = "nifti"
DICOM_COLUMN = "dicom_zip"
MASK_FORMATS = ("seg", "nifti")
# The distributions the served model imports; pinned to the versions liverseg declares.
SERVING_DISTRIBUTIONS = (
    "mlflow",
    "tensorflow",
    "keras",
    "numpy",
    "scipy",
    "nibabel",
    "pydicom",
    "highdicom",
)
# "tensorflow" stands for the TensorFlow distribution installed (the cpu or the gpu extra).

_FLOAT32_BYTES = 4
_MB = 1024 * 1024


# ------------------------------------------------------------------------------ request decoding
def max_request_bytes(environ: dict[str, str] | None = None) -> int:
    """The request bound in bytes from ``LIVERSEG_MAX_REQUEST_MB`` (a positive number)."""
    env = os.environ if environ is None else environ
    raw = env.get(MAX_REQUEST_ENV, "")
    if not raw.strip():
        return int(DEFAULT_MAX_REQUEST_MB * _MB)
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
    """The tensor form as a finite float32 ``(N, H, W)`` array, or DataError saying why not."""
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
    n_bytes = arr.size * _FLOAT32_BYTES
    if n_bytes > limit:
        raise _too_large(f"the slices array {arr.shape} as float32", n_bytes, limit)
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
        out = arr.astype(np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        raise DataError(
            f"slices: {out.size - int(np.count_nonzero(finite))} values are NaN or inf "
            "(or outside the float32 range)"
        )
    return out


def _b64decode(text: str, limit: int, column: str = NIFTI_COLUMN) -> bytes:
    # base64 wraps lines at 76 characters unless told not to (-w0): whitespace is allowed.
    compact = "".join(text.split())
    n_bytes = len(compact) * 3 // 4
    if n_bytes > limit:
        what = "the NIfTI file" if column == NIFTI_COLUMN else "the zip file"
        raise _too_large(what, n_bytes, limit)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"{column}: not valid base64 ({exc})") from exc


def nifti_from_payload(payload: Any, limit: int) -> nib.Nifti1Image | nib.Nifti2Image:
    """Decode base64 (of a ``.nii`` or ``.nii.gz``) into a NIfTI image, refusing anything whose
    decoded file or float32 voxel array would exceed ``limit`` bytes, before it is read."""
    if isinstance(payload, bytes):
        payload = payload.decode("ascii", errors="replace")
    if not isinstance(payload, str):
        raise DataError(
            f"{NIFTI_COLUMN}: expected a base64 string of a .nii/.nii.gz file, "
            f"got {type(payload).__name__}"
        )
    if not payload.strip():
        raise DataError(f"{NIFTI_COLUMN}: empty string")
    raw = _b64decode(payload, limit)
    try:
        return nifti_from_bytes(raw, limit, NIFTI_COLUMN)
    except TooLargeError as exc:
        raise _too_large(exc.what, exc.n_bytes, exc.limit) from exc


def volume_from_payload(payload: Any, limit: int) -> Volume:
    """The CT of a base64 NIfTI payload, validated and in RAS (see :func:`volume_from_image`)."""
    img = nifti_from_payload(payload, limit)
    try:
        return volume_from_image(img, kind="image")
    except DataError as exc:
        raise DataError(f"{NIFTI_COLUMN}: {exc}") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{NIFTI_COLUMN}: unreadable voxel data ({exc})") from exc


def series_from_payload(payload: Any, limit: int, series_uid: str | None) -> DicomSeries:
    """The CT series of a base64 zip (see :func:`liverseg.data.dicom.read_ct_series`): the zip
    and what it unpacks to are bounded by ``limit`` bytes, as a NIfTI file is."""
    if isinstance(payload, bytes):
        payload = payload.decode("ascii", errors="replace")
    if not isinstance(payload, str) or not payload.strip():
        raise DataError(f"{DICOM_COLUMN}: expected a non-empty base64 string of a .zip file")
    raw = _b64decode(payload, limit, DICOM_COLUMN)
    with tempfile.TemporaryDirectory(prefix="liverseg-dicom-") as tmp:
        archive = Path(tmp) / "series.zip"
        archive.write_bytes(raw)
        try:
            return read_ct_series(archive, series_uid, max_bytes=limit)
        except DataError as exc:
            # The temporary paths mean nothing to the client: name the request field instead.
            message = str(exc).replace(str(archive), DICOM_COLUMN).replace(tmp, DICOM_COLUMN)
            raise DataError(message) from exc


def mask_to_base64(mask_ras: np.ndarray, volume: Volume) -> str:
    """Base64 of the ``.nii.gz`` that ``liverseg predict`` would write for this mask."""
    with tempfile.TemporaryDirectory(prefix="liverseg-mask-") as tmp:
        path = save_mask_like(mask_ras, volume, Path(tmp) / "mask.nii.gz")
        return base64.b64encode(path.read_bytes()).decode("ascii")


def _payloads(model_input: Any) -> tuple[str, list[Any]] | None:
    """The column (``nifti`` or ``dicom_zip``) and values of a volume-form input, or None for
    the tensor form."""
    if isinstance(model_input, pd.DataFrame):
        for column in (NIFTI_COLUMN, DICOM_COLUMN):
            if column in model_input.columns:
                return column, list(model_input[column])
        raise DataError(
            f"expected a '{NIFTI_COLUMN}' column (base64 of a .nii/.nii.gz CT) or a "
            f"'{DICOM_COLUMN}' column (base64 of a zipped DICOM series), got columns "
            f'{[str(c) for c in model_input.columns]}; send slices as {{"inputs": '
            "[[[...]]]}"
        )
    if isinstance(model_input, dict):
        for column in (NIFTI_COLUMN, DICOM_COLUMN):
            if column in model_input:
                value = np.asarray(model_input[column], dtype=object)
                return column, [value.item()] if value.ndim == 0 else list(value.ravel())
        raise DataError(
            f"expected the key '{NIFTI_COLUMN}' or '{DICOM_COLUMN}', got keys {sorted(model_input)}"
        )
    return None


def slice_orientation(params: dict[str, Any] | None) -> tuple[str, str, str]:
    """The ``orientation`` param as three axis codes of an axial stack (default RAS)."""
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


def _segment_oriented_slices(
    seg: Segmenter, stack: np.ndarray, codes: tuple[str, str, str]
) -> np.ndarray:
    """Masks of slices whose axes ``(H, W, N)`` run along ``codes``: reoriented to RAS for the
    network (as volumes are) and back, so the masks line up with the slices as sent."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    if codes == ("R", "A", "S"):
        return seg.segment_slices(stack)
    here, ras = axcodes2ornt(codes), axcodes2ornt(("R", "A", "S"))
    vol = apply_orientation(np.moveaxis(stack, 0, 2), ornt_transform(here, ras))
    masks = seg.segment_slices(np.ascontiguousarray(np.moveaxis(vol, 2, 0)))
    back = apply_orientation(np.moveaxis(masks, 0, 2), ornt_transform(ras, here))
    return np.ascontiguousarray(np.moveaxis(back, 2, 0))


# ------------------------------------------------------------------------------------- the model
class LiverSegModel(PythonModel):
    """The pyfunc: artifacts ``model`` (model.keras), ``preprocessing`` and ``postprocessing``
    (JSON), loaded once per server process; see the module docstring for the request forms."""

    def load_context(self, context: Any) -> None:
        """Load the network; read the request bound (a bad value stops the server at start)."""
        model_file = Path(context.artifacts["model"])
        prep_file = Path(context.artifacts["preprocessing"])
        if prep_file.parent != model_file.parent:
            raise FileNotFoundError(
                f"{model_file}: {PREPROCESSING_FILE} must sit beside it, found {prep_file}"
            )
        post_file = Path(context.artifacts["postprocessing"])
        self.post = PostProcessing.from_dict(read_stage_json(post_file, "register"), post_file)
        self.segmenter = Segmenter.from_dir(model_file, post=self.post)
        self.max_bytes = max_request_bytes()
        # The scoring server runs each request in a thread; one network call at a time keeps
        # peak memory at one request's worth (TensorFlow already uses every core per call).
        self._lock = threading.Lock()
        server_log.quiet_client_disconnects()  # no traceback in the log for a client that hung up

    def _segmenter_for(self, params: dict[str, Any] | None) -> Segmenter:
        if not params:
            return self.segmenter
        post = self.post.updated(params, "params")
        if post == self.post:
            return self.segmenter
        base = self.segmenter
        return Segmenter(
            base.model,
            window_hu=base.window_hu,
            image_size=base.image_size,
            post=post,
            batch_size=base.batch_size,
        )

    # No type hint on the input or the result, on purpose (MLflow warns once at import): MLflow
    # 3 would derive an input schema from it and then pass only the raw ``inputs`` field,
    # refusing the ``dataframe_split`` (volume) form.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None):
        """Masks for slices (ndarray) or volumes (DataFrame); bad input -> HTTP 400."""
        try:
            seg = self._segmenter_for(params)
            found = _payloads(model_input)
            if found is None:
                codes = slice_orientation(params)
                stack = slices_from_input(model_input, self.max_bytes)
                with self._lock:
                    return _segment_oriented_slices(seg, stack, codes)
            column, payloads = found
            if len(payloads) != 1:
                # One at a time keeps the size bound per request and the time under the
                # server's request timeout.
                raise DataError(f"send one volume per request, got {len(payloads)}")
            if column == DICOM_COLUMN:
                return pd.DataFrame([self._one_series(payloads[0], seg, params or {})])
            return pd.DataFrame([self._one_volume(payloads[0], seg)])
        except DataError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc

    def _mask_and_quality(self, volume: Volume, seg: Segmenter) -> tuple[np.ndarray, dict]:
        with self._lock:
            net = seg.predict_ras(volume.data, members=True)
        mask = seg.postprocess(net.mask)
        report = quality_report(mask, volume.data, volume.spacing, member_masks=net.members)
        return mask, report

    def _one_volume(self, payload: Any, seg: Segmenter) -> dict[str, Any]:
        volume = volume_from_payload(payload, self.max_bytes)
        mask, report = self._mask_and_quality(volume, seg)
        voxels = int(np.count_nonzero(mask))
        return {
            "mask_nifti": mask_to_base64(mask, volume),
            "liver_volume_ml": voxels * volume.voxel_volume_ml,
            "liver_voxels": voxels,
            "quality": report,
        }

    def _one_series(self, payload: Any, seg: Segmenter, params: dict[str, Any]) -> dict[str, Any]:
        fmt = str(params.get("mask_format") or "seg")
        if fmt not in MASK_FORMATS:
            raise DataError(f"params: mask_format must be one of {MASK_FORMATS}, got {fmt!r}")
        series = series_from_payload(payload, self.max_bytes, params.get("series") or None)
        volume = series.volume
        mask, report = self._mask_and_quality(volume, seg)
        voxels = int(np.count_nonzero(mask))
        out: dict[str, Any] = {}
        if fmt == "seg":
            from liverseg.data.dicomseg import build_seg

            dataset = build_seg(
                from_canonical(mask, volume), series.datasets, model="mlflow pyfunc"
            )
            buffer = io.BytesIO()
            dataset.save_as(buffer)
            out["mask_seg"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        else:
            out["mask_nifti"] = mask_to_base64(mask, volume)
        out.update(
            {
                "series": series.info.uid,
                "liver_volume_ml": voxels * volume.voxel_volume_ml,
                "liver_voxels": voxels,
                "quality": report,
            }
        )
        return out


# ------------------------------------------------------------------------------------- logging
def serving_requirements() -> list[str]:
    """pip requirements of the served model, pinned as liverseg's own metadata pins them."""
    pins: dict[str, str] = {}
    try:
        for req in importlib.metadata.requires("liverseg") or []:
            name, sep, version = req.partition("==")
            if sep and ";" not in req:
                pins[name.strip().lower()] = version.strip()
    except importlib.metadata.PackageNotFoundError:
        pass
    out = []
    for dist in SERVING_DISTRIBUTIONS:
        if dist == "tensorflow":
            dist = tensorflow_distribution()
        version = pins.get(dist) or importlib.metadata.version(dist)
        out.append(f"{dist}=={version}")
    return out


def model_signature(post: PostProcessing) -> ModelSignature:
    """Params (post-processing overrides, defaulting to ``post``); no input schema (see above)."""
    kinds = {float: "double", bool: "boolean"}
    return ModelSignature(
        params=ParamSchema(
            [
                *(ParamSpec(k, kinds[type(v)], v) for k, v in post.to_dict().items()),
                ParamSpec("orientation", "string", "RAS"),
                ParamSpec("series", "string", ""),
                ParamSpec("mask_format", "string", "seg"),
            ]
        )
    )


def input_forms() -> dict[str, Any]:
    """The two request forms as MLflow schema dicts, for the MLmodel metadata."""
    slices = TensorSpec(np.dtype(np.float32), (-1, -1, -1), "slices").to_dict()
    masks = TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "masks").to_dict()
    forms = {
        "slices": {"request_key": "inputs", "input": slices, "output": masks},
        "volume": {
            "request_key": "dataframe_split",
            "input": ColSpec("string", NIFTI_COLUMN).to_dict(),
            "output": [
                ColSpec("string", "mask_nifti").to_dict(),
                ColSpec("double", "liver_volume_ml").to_dict(),
                ColSpec("long", "liver_voxels").to_dict(),
            ],
        },
        "dicom": {
            "request_key": "dataframe_split",
            "input": ColSpec("string", DICOM_COLUMN).to_dict(),
            "output": [
                ColSpec("string", "mask_seg").to_dict(),
                ColSpec("string", "series").to_dict(),
                ColSpec("double", "liver_volume_ml").to_dict(),
                ColSpec("long", "liver_voxels").to_dict(),
            ],
        },
        "max_request_env": MAX_REQUEST_ENV,
    }
    # A JSON round trip gives plain, unshared lists (no YAML anchors in the MLmodel file).
    out: dict[str, Any] = json.loads(json.dumps(forms))
    return out


_MODEL_CODE = (
    "# Written by liverseg.serving.log_pyfunc (MLflow models-from-code).\n"
    "from mlflow.models import set_model\n\n"
    "from liverseg.serving import LiverSegModel\n\n"
    "set_model(LiverSegModel())\n"
)


def log_pyfunc(
    model_dir: Path,
    post: PostProcessing,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log ``model_dir`` (``model.keras`` + ``preprocessing.json``) as a pyfunc in the active run.

    The liverseg package is logged with the model (``code_paths``); MLflow puts it first on
    ``sys.path`` when it loads the model in a fresh process (as ``mlflow models serve`` does), so
    a registered version keeps the pre- and post-processing code it was evaluated with, even
    after the working tree moves on, and needs no liverseg installation where it is served
    (liverseg is not on PyPI, so ``requirements.txt`` cannot name it). In a process that has
    already imported liverseg, that import wins. The model is logged "from code" (a generated
    two-line script), not pickled.
    """
    import liverseg

    model_file, prep_file = check_model_dir(Path(model_dir))
    with tempfile.TemporaryDirectory(prefix="liverseg-pyfunc-") as tmp:
        post_file = Path(tmp) / POSTPROCESSING_FILE
        post_file.write_text(json.dumps(post.to_dict()))
        code_file = Path(tmp) / "liverseg_pyfunc.py"
        code_file.write_text(_MODEL_CODE)
        example = np.linspace(-200.0, 300.0, 16 * 16, dtype=np.float32).reshape(1, 16, 16)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_file),
            artifacts={
                "model": str(model_file),
                "preprocessing": str(prep_file),
                "postprocessing": str(post_file),
            },
            code_paths=[str(Path(liverseg.__file__).parent)],
            signature=model_signature(post),
            input_example=example,
            pip_requirements=serving_requirements(),
            metadata={"liverseg": input_forms()},
            registered_model_name=registered_model_name,
        )
