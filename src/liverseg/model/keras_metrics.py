"""Binarised overlap metrics for training/validation, and the objects needed to reload a model.

Shape contract: ``y_true``/``y_pred`` are ``(N, H, W, 1)``; ``y_pred`` holds probabilities and
is binarised with ``y_pred >= threshold``, ``y_true`` with ``y_true >= 0.5``.

Both metrics accumulate global sums (intersection, foreground counts) over every batch seen
since the last ``reset_state``, so the epoch value is a *pooled* per-pixel 2-D score over all
slices seen, not the mean of per-slice scores: large liver cross-sections weigh more and
liver-free slices cannot produce 0/0. This is the cheap validation signal for early stopping;
the per-patient 3-D Dice is computed by the evaluation stage. If neither the masks nor the
predictions contain any foreground the score is 1 (perfect agreement on "no liver").
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from liverseg.model.losses import dice_bce_loss, dice_loss
from liverseg.model.optimizers import FusedAdam
from liverseg.model.unet import FusedBatchNorm

TRUE_THRESHOLD = 0.5  # masks are 0/1; this only guards against interpolated values


class _OverlapMetric(keras.metrics.Metric):
    """Accumulates intersection and foreground pixel counts of binarised masks."""

    default_name = ""

    def __init__(self, name: str | None = None, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(name=name or self.default_name, **kwargs)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"{type(self).__name__}: threshold must be in (0, 1), got {threshold}")
        self.threshold = float(threshold)
        self.intersection = self.add_variable(shape=(), initializer="zeros", name="intersection")
        self.true_sum = self.add_variable(shape=(), initializer="zeros", name="true_sum")
        self.pred_sum = self.add_variable(shape=(), initializer="zeros", name="pred_sum")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Add this batch's counts (training weighs no samples: a weight is refused)."""
        if sample_weight is not None:
            raise ValueError(f"{type(self).__name__}: sample weights are not supported")
        t = ops.cast(ops.cast(y_true, "float32") >= TRUE_THRESHOLD, self.dtype)
        p = ops.cast(ops.cast(y_pred, "float32") >= self.threshold, self.dtype)
        self.intersection.assign_add(ops.sum(t * p))
        self.true_sum.assign_add(ops.sum(t))
        self.pred_sum.assign_add(ops.sum(p))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.threshold}

    def _ratio(self, numerator: Any, denominator: Any) -> Any:
        safe = ops.where(denominator > 0, denominator, 1.0)
        return ops.where(denominator > 0, numerator / safe, 1.0)


@keras.saving.register_keras_serializable(package="liverseg")
class DiceCoefficient(_OverlapMetric):
    """Pooled binary Dice ``2|A∩B| / (|A| + |B|)`` over all pixels seen this epoch."""

    default_name = "dice"

    def result(self) -> Any:
        return self._ratio(2.0 * self.intersection, self.true_sum + self.pred_sum)


@keras.saving.register_keras_serializable(package="liverseg")
class IoU(_OverlapMetric):
    """Pooled binary IoU (Jaccard) ``|A∩B| / |A∪B|`` over all pixels seen this epoch."""

    default_name = "iou"

    def result(self) -> Any:
        return self._ratio(self.intersection, self.true_sum + self.pred_sum - self.intersection)


# Pass to keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS). Keys are the names
# the objects are registered (and so saved) under; plain names like "IoU" are avoided because
# they would shadow Keras' own classes of the same name. Importing this module registers them
# too, so loading also works without custom_objects once it has been imported.
CUSTOM_OBJECTS: dict[str, Any] = {
    keras.saving.get_registered_name(obj): obj
    for obj in (dice_loss, dice_bce_loss, DiceCoefficient, IoU, FusedBatchNorm, FusedAdam)
}
