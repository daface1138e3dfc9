"""Segmenter: a CT volume in HU (any size, any orientation) -> a binary liver mask on its grid.

Steps: reorient to RAS (done by :func:`liverseg.data.volumes.load_volume`), HU window and
scale to [0, 1], resize each axial slice to the model's input size (a 2.5-D model also gets
the slice's neighbours ``context_mm`` below and above, interpolated), predict in batches of
slices (memory stays bounded by the batch, not the volume), resize the
probabilities back to the slice's own size, threshold, then (switchable) keep the largest 3-D
connected component and fill holes per slice. The mask comes back on the input's grid and
orientation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import pydantic

from liverseg import stop
from liverseg.data.slices import (
    AIR_HU,
    body_box,
    box_overlap,
    context_offsets,
    crop_xy,
    resize_xy,
    stack_channels,
    window,
)
from liverseg.errors import DataError
from liverseg.fsutil import read_stage_json
from liverseg.model.folder import (
    MODEL_FILE,
    POSTPROCESSING_FILE,
    PREPROCESSING_FILE,
    load_model_dir,
)
from liverseg.postprocess import fill_holes as fill_holes_fn
from liverseg.postprocess import postprocess

if TYPE_CHECKING:
    from liverseg.params import EvaluateParams

# The layer that averages the fold models in the ensemble (training.crossval.ensemble).
ENSEMBLE_LAYER = "mean_prob"


@dataclass(frozen=True)
class Prediction:
    """What the network says about a RAS volume ``(X, Y, Z)``, before post-processing.

    ``mask``: thresholded probabilities (bool); ``probabilities``: float32 in [0, 1] (only when
    asked for); ``members``: each ensemble member's thresholded mask, ``(M, X, Y, Z)`` bool
    (only when asked for and the model is an ensemble of M >= 2 members).
    """

    mask: np.ndarray
    probabilities: np.ndarray | None = None
    members: np.ndarray | None = None


@pydantic.dataclasses.dataclass(
    frozen=True, config=pydantic.ConfigDict(strict=True, extra="forbid")
)
class PostProcessing:
    """What happens to the probabilities after the network: the one owner of these fields (the
    evaluate params, the served model's ``postprocessing.json``, its params, request overrides).
    """

    # 0.55, not 0.5: the same Dice on synthetic scans of held-out anatomy, higher on both real
    # scans in every seed (benchmarks/README.md, "The threshold"); equal to EvaluateParams'.
    threshold: Annotated[float, pydantic.Field(gt=0, lt=1, allow_inf_nan=False)] = 0.55
    largest_component: bool = True
    fill_holes: bool = False

    @classmethod
    def from_params(cls, cfg: EvaluateParams) -> PostProcessing:
        """The post-processing of the ``evaluate`` params section (the evaluated model's)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str | Path) -> PostProcessing:
        """The inverse of :meth:`to_dict`: every field, of its type, and nothing else; anything
        else is a one-line DataError naming ``source`` (the file, or ``params`` for a request)
        and the key."""
        if not isinstance(data, dict):
            raise DataError(f"{source}: expected a JSON object, got {type(data).__name__}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
        if missing:
            raise DataError(f"{source}: missing key(s) {missing}")
        try:
            return cls(**data)
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            problem = f"{err['loc'][0]}: {err['msg']}, got {err['input']!r}"
            raise DataError(f"{source}: {problem}") from None

    def updated(self, overrides: Mapping[str, Any], source: str) -> PostProcessing:
        """This post-processing with the fields that ``overrides`` names replaced (other keys
        are ignored: a request's params hold more than these), validated as :meth:`from_dict`."""
        own = self.to_dict()
        return self.from_dict({**own, **{k: v for k, v in overrides.items() if k in own}}, source)


class Segmenter:
    """Runs a trained U-Net over whole volumes or stacks of slices."""

    def __init__(
        self,
        model: object,
        *,
        window_hu: tuple[float, float],
        image_size: int,
        post: PostProcessing | None = None,
        batch_size: int = 32,
        context_mm: float = 0.0,
        crop: str = "none",
    ) -> None:
        self.model = model
        self.window_hu = (float(window_hu[0]), float(window_hu[1]))
        self.image_size = int(image_size)
        self.context_mm = float(context_mm)
        self.crop = crop  # "body": the body's square (data.slices.body_box), as prepare cut it
        self.post = post or PostProcessing()
        self.batch_size = int(batch_size)
        self._with_members: object | None = None

    @classmethod
    def from_dir(cls, folder: Path, **kwargs: object) -> Segmenter:
        """From a model folder (:mod:`liverseg.model.folder`); a broken one is a DataError."""
        model, window_hu, image_size, context_mm, crop = load_model_dir(folder)
        kwargs = {
            "window_hu": window_hu,
            "image_size": image_size,
            "context_mm": context_mm,
            "crop": crop,
            **kwargs,
        }
        return cls(model, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def load(cls, source: str | Path, **kwargs: object) -> Segmenter:
        """From a local model folder/file, or an MLflow URI (``models:/liver-unet@champion``,
        ``runs:/<run_id>``): the artifacts are downloaded and searched for the model files."""
        s = str(source)
        if "://" in s or s.startswith(("models:/", "runs:/")):
            import mlflow
            from mlflow.exceptions import MlflowException

            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=s))
            except MlflowException as exc:  # unknown model, version, alias or run
                first = str(exc.message).strip().splitlines()[0]
                raise DataError(
                    f"{s}: does not resolve in {mlflow.get_tracking_uri()} ({first})"
                ) from exc
            found = sorted(local.rglob(PREPROCESSING_FILE))
            if not found or not (found[0].parent / MODEL_FILE).exists():
                raise DataError(f"{s}: no {MODEL_FILE} with {PREPROCESSING_FILE} inside")
            post = sorted(local.rglob(POSTPROCESSING_FILE))  # a registered model's, as evaluated
            if post and kwargs.get("post") is None:
                data = read_stage_json(post[0], "register")
                kwargs["post"] = PostProcessing.from_dict(data, post[0])
            return cls.from_dir(found[0].parent, **kwargs)
        return cls.from_dir(Path(s), **kwargs)

    def _members_model(self) -> object | None:
        """The ensemble with its members' outputs after its own (so the mean, and the mask, are
        unchanged), or None for one model."""
        if self._with_members is None:
            import keras

            self._with_members = False
            model = self.model
            if isinstance(model, keras.Model) and ENSEMBLE_LAYER in [x.name for x in model.layers]:
                outputs = [model.output, *model.get_layer(ENSEMBLE_LAYER).input]
                self._with_members = keras.Model(model.inputs, outputs)
        return self._with_members or None

    def predict_ras(
        self,
        hu_ras: np.ndarray,
        progress: Callable[[int], object] | None = None,
        *,
        probabilities: bool = False,
        members: bool = False,
        slice_mm: float | None = None,
    ) -> Prediction:
        """Network output for a volume (X, Y, Z) in HU, before any post-processing (see
        :class:`Prediction`). Works through ``batch_size`` axial slices at a time, so memory is
        bounded by the batch (and its neighbours) and the outputs asked for. ``slice_mm``: the
        z spacing, where a 2.5-D model's neighbours are (None: each slice is its own)."""
        x, y, z = hu_ras.shape
        s, t = self.image_size, self.post.threshold
        offsets = context_offsets(self.context_mm, slice_mm)
        reach = int(np.ceil(np.abs(offsets).max()))  # slices a neighbour channel reads beyond
        net: Any = self._members_model() if members else None
        out = np.zeros((x, y, z), dtype=bool)  # False outside the body's box
        prob_out = np.zeros((x, y, z), dtype=np.float32) if probabilities else None
        member_out = None if net is None else np.zeros((len(net.outputs) - 1, x, y, z), bool)
        box = body_box(hu_ras) if self.crop == "body" else (0, 0, x, y)
        (sx, sy), inner = box_overlap(box, (x, y))
        for start in range(0, z, self.batch_size):
            stop.check()  # predict's and evaluate's stop point (nothing asks one in a server)
            b = slice(start, min(z, start + self.batch_size))
            lo, hi = max(0, b.start - reach), min(z, b.stop + reach)
            crop = crop_xy(hu_ras[:, :, lo:hi], box, AIR_HU)
            small = window(resize_xy(crop, (s, s)), *self.window_hu)
            batch = stack_channels(small, np.arange(b.start, b.stop) - lo, offsets)  # (n,s,s,C)
            model: Any = self.model if net is None else net
            outputs = model.predict_on_batch(batch)
            for n, raw in enumerate([outputs] if net is None else outputs):
                p = np.asarray(raw, dtype=np.float32)[..., 0]
                prob = resize_xy(np.moveaxis(p, 0, 2), box[2:])[inner]  # (X, Y, n) in the box
                if n > 0:
                    member_out[n - 1, sx, sy, b] = prob >= t  # type: ignore[index]
                    continue
                out[sx, sy, b] = prob >= t
                if prob_out is not None:
                    prob_out[sx, sy, b] = np.clip(prob, 0.0, 1.0)
            if progress is not None:
                progress(b.stop - b.start)
        return Prediction(mask=out, probabilities=prob_out, members=member_out)

    def postprocess(self, mask: np.ndarray) -> np.ndarray:
        """The 3-D post-processing of a thresholded mask, as uint8 0/1."""
        return postprocess(
            mask, largest=self.post.largest_component, fill=self.post.fill_holes
        ).astype(np.uint8)

    def segment_slices(self, stack_hu: np.ndarray) -> np.ndarray:
        """Masks (N, H, W) uint8 for independent 2-D slices (threshold and per-slice hole
        filling; no 3-D connected component, since slices need not be neighbours)."""
        if stack_hu.ndim != 3:
            raise ValueError(f"expected slices of shape (N, H, W), got {stack_hu.shape}")
        mask = self.predict_ras(np.moveaxis(stack_hu, 0, 2)).mask
        if self.post.fill_holes:
            mask = fill_holes_fn(mask)
        return np.ascontiguousarray(np.moveaxis(mask, 2, 0).astype(np.uint8))

    def segment_ras(self, hu_ras: np.ndarray) -> np.ndarray:
        """Mask (X, Y, Z) uint8 for a RAS volume (X, Y, Z) in HU (on a Volume: its ``data``;
        :func:`~liverseg.data.volumes.from_canonical` maps it back to the file's grid)."""
        if hu_ras.ndim != 3:
            raise ValueError(f"expected a 3-D volume, got shape {hu_ras.shape}")
        return self.postprocess(self.predict_ras(hu_ras).mask)
