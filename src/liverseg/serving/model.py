"""The MLflow pyfunc around :class:`~liverseg.inference.Segmenter`, for ``mlflow models serve``.

The request forms, answers and errors are docs/serving.md's (decoding: :mod:`.forms`). No
input schema is logged, on purpose: MLflow 3.17 enforces one before ``predict`` runs, and none
admits both slices (a tensor) and volumes (a string column). ``predict`` checks every request
itself, refusing a bad one as ``MlflowException(INVALID_PARAMETER_VALUE)``: HTTP 400 with the
project's one line.
"""

from __future__ import annotations

import base64
import copy
import importlib.metadata
import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ParamSchema, ParamSpec

from liverseg.errors import DataError
from liverseg.fsutil import read_stage_json
from liverseg.inference import PostProcessing, Segmenter
from liverseg.model.folder import POSTPROCESSING_FILE, check_model_dir
from liverseg.segment import segment_volume
from liverseg.serving.forms import (
    DICOM_COLUMN,
    max_request_bytes,
    series_from_payload,
    slice_orientation,
    slices_from_input,
    volume_from_payload,
    volume_payloads,
)
from liverseg.tracking import tensorflow_distribution

MASK_FORMATS = ("seg", "nifti")


def _segment_oriented_slices(
    seg: Segmenter, stack: np.ndarray, codes: tuple[str, str, str]
) -> np.ndarray:
    """Masks of slices whose axes ``(H, W, N)`` run along ``codes``: reoriented to RAS for the
    network (as volumes are) and back, so the masks line up with the slices as sent."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    here, ras = axcodes2ornt(codes), axcodes2ornt(("R", "A", "S"))
    vol = apply_orientation(np.moveaxis(stack, 0, 2), ornt_transform(here, ras))
    masks = seg.segment_slices(np.ascontiguousarray(np.moveaxis(vol, 2, 0)))
    back = apply_orientation(np.moveaxis(masks, 0, 2), ornt_transform(ras, here))
    return np.ascontiguousarray(np.moveaxis(back, 2, 0))


class LiverSegModel(PythonModel):
    """The pyfunc: artifacts ``model`` (model.keras), ``preprocessing`` and ``postprocessing``
    (JSON), loaded once per server process; or, in process, around a given ``segmenter``."""

    segmenter: Segmenter

    def __init__(self, segmenter: Segmenter | None = None, max_bytes: int | None = None) -> None:
        if segmenter is not None:
            self.segmenter = segmenter
        # From LIVERSEG_MAX_REQUEST_MB: a bad value stops the server as it loads the model.
        self.max_bytes = max_request_bytes() if max_bytes is None else max_bytes
        # The scoring server runs each request in a thread; one network call at a time keeps
        # peak memory at one request's worth (TensorFlow already uses every core per call).
        self._lock = threading.Lock()

    def load_context(self, context: Any) -> None:
        """Load the network and its logged post-processing."""
        post_file = Path(context.artifacts["postprocessing"])
        post = PostProcessing.from_dict(read_stage_json(post_file, "register"), post_file)
        self.segmenter = Segmenter.from_dir(Path(context.artifacts["model"]), post=post)
        quiet_client_disconnects()

    # No type hint on the input or the result, on purpose (MLflow warns once at import): MLflow
    # 3 would derive an input schema from it and then pass only the raw ``inputs`` field,
    # refusing the ``dataframe_split`` (volume) form.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None):
        """Masks for slices (ndarray) or volumes (DataFrame); bad input -> HTTP 400."""
        try:
            seg = self.segmenter
            post = seg.post.updated(params or {}, "params")
            if post != seg.post:
                seg = copy.copy(seg)  # the same network, another post-processing
                seg.post = post
            found = volume_payloads(model_input)
            if found is None:
                codes = slice_orientation(params)
                stack = slices_from_input(model_input, self.max_bytes)
                with self._lock:
                    return _segment_oriented_slices(seg, stack, codes)
            column, payloads = found
            if len(payloads) != 1:  # the size bound and the server's timeout are per request
                raise DataError(f"send one volume per request, got {len(payloads)}")
            return pd.DataFrame([self._one_volume(column, payloads[0], seg, params or {})])
        except DataError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc

    def _one_volume(
        self, column: str, payload: Any, seg: Segmenter, params: dict[str, Any]
    ) -> dict[str, Any]:
        series, uid, fmt = None, None, "nifti"
        if column == DICOM_COLUMN:
            fmt = str(params.get("mask_format") or "seg")
            if fmt not in MASK_FORMATS:
                raise DataError(f"params: mask_format must be one of {MASK_FORMATS}, got {fmt!r}")
            series = series_from_payload(payload, self.max_bytes, params.get("series") or None)
            volume, uid = series.volume, series.info.uid
        else:
            volume = volume_from_payload(payload, self.max_bytes)
        with tempfile.TemporaryDirectory(prefix="liverseg-mask-") as tmp, self._lock:
            path = Path(tmp) / ("mask.dcm" if fmt == "seg" else "mask.nii.gz")
            series = series if fmt == "seg" else None
            done = segment_volume(seg, volume, path, series=series, model_name="mlflow pyfunc")
            mask = {f"mask_{fmt}": base64.b64encode(path.read_bytes()).decode("ascii")}
        return {**mask, **({"series": uid} if uid else {}), **done}


# ------------------------------------------------------------------------ the server's log
def _is_disconnect(exc: BaseException | None, depth: int = 0) -> bool:
    """A client that hung up: Starlette's ``ClientDisconnect`` or a reset/broken connection,
    also inside exception groups and chains (the scoring server's middleware wraps it)."""
    if exc is None or depth > 10:
        return False
    if type(exc).__name__ == "ClientDisconnect" or isinstance(exc, ConnectionError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e, depth + 1) for e in exc.exceptions)
    return _is_disconnect(exc.__cause__ or exc.__context__, depth + 1)


def _quiet_disconnect(record: logging.LogRecord) -> bool:
    """A log filter: uvicorn's traceback for a client that hung up becomes one line."""
    if record.exc_info and _is_disconnect(record.exc_info[1]):
        record.msg = "client disconnected before the response was sent; request dropped"
        record.args = ()
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
    return True


def quiet_client_disconnects(logger: str = "uvicorn.error") -> None:
    """Install :func:`_quiet_disconnect` on the server's error logger (idempotent)."""
    log = logging.getLogger(logger)
    if _quiet_disconnect not in log.filters:
        log.addFilter(_quiet_disconnect)


# ------------------------------------------------------------------------------- logging it
_MODEL_CODE = (
    "# Written by liverseg.serving.model.log_pyfunc (MLflow models-from-code).\n"
    "from mlflow.models import set_model\n\n"
    "from liverseg.serving.model import LiverSegModel\n\n"
    "set_model(LiverSegModel())\n"
)


def log_pyfunc(
    model_dir: Path,
    post: PostProcessing,
    registered_model_name: str | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log ``model_dir`` (``model.keras`` + ``preprocessing.json``) as a pyfunc in the active run.

    The liverseg package travels with it (``code_paths``, first on ``sys.path`` where it is
    served), so a version keeps the code it was evaluated with and needs no liverseg install;
    the model is logged from code (a generated two-line script), not pickled.
    """
    import liverseg

    model_file, prep_file = check_model_dir(Path(model_dir))
    # Params: post-processing overrides, defaulting to ``post``; no input schema (see predict).
    kinds = {float: "double", bool: "boolean"}
    specs = [ParamSpec(k, kinds[type(v)], v) for k, v in post.to_dict().items()]
    strings = {"orientation": "RAS", "series": "", "mask_format": "seg"}
    specs += [ParamSpec(k, "string", v) for k, v in strings.items()]
    # The installed versions (liverseg pins them) of what the served model imports
    # ("tensorflow": the cpu or the gpu extra's).
    dists = ["mlflow", tensorflow_distribution(), "keras", "numpy", "scipy", "nibabel"]
    dists += ["pydicom", "highdicom"]
    with tempfile.TemporaryDirectory(prefix="liverseg-pyfunc-") as tmp:
        post_file = Path(tmp) / POSTPROCESSING_FILE
        post_file.write_text(json.dumps(post.to_dict()))
        code_file = Path(tmp) / "liverseg_pyfunc.py"
        code_file.write_text(_MODEL_CODE)
        example = np.linspace(-200.0, 300.0, 16 * 16, dtype=np.float32).reshape(1, 16, 16)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code_file),
            artifacts={
                "model": str(model_file),
                "preprocessing": str(prep_file),
                "postprocessing": str(post_file),
            },
            code_paths=[str(Path(liverseg.__file__).parent)],
            signature=ModelSignature(params=ParamSchema(specs)),
            input_example=example,
            pip_requirements=[f"{d}=={importlib.metadata.version(d)}" for d in dists],
            registered_model_name=registered_model_name,
        )
