"""Segmentation losses for the U-Net.

Shape contract: ``y_true`` and ``y_pred`` are ``(N, H, W, 1)`` (any float dtype; ``y_true``
0/1, ``y_pred`` sigmoid probabilities). Every loss returns float32 ``(N,)``, one value per
image: Keras averages them over the batch and, under a distribution strategy
(:func:`liverseg.training.fit.distribute_scope`), divides each replica's mean by the number of
replicas so that the summed gradients are those of the global batch (a loss that returned the
batch mean itself would skip that division and train N times too hard). Inputs are cast to
float32 first so sums over a slice stay exact under ``mixed_bfloat16`` (bfloat16 has an 8-bit
mantissa: a 96x96 sum of ones would already round).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

LossFn = Callable[..., Any]


@keras.saving.register_keras_serializable(package="liverseg")
def dice_loss(y_true: Any, y_pred: Any, smooth: float = 1.0) -> Any:
    """``1 - soft Dice`` per image: per image rather than pooled over the batch so that small
    livers (top/bottom of the organ) weigh as much as large ones. ``smooth`` keeps it defined
    on liver-free slices (both sums 0: loss 0) and softens the gradient on tiny livers."""
    y_true, y_pred = ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")
    axes = tuple(range(1, len(y_pred.shape)))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


@keras.saving.register_keras_serializable(package="liverseg")
def dice_bce_loss(y_true: Any, y_pred: Any, smooth: float = 1.0) -> Any:
    """Pixel-mean binary cross-entropy plus :func:`dice_loss`, per image: BCE gives
    well-behaved per-pixel gradients early in training when Dice is flat; Dice counters the
    class imbalance (liver is a small fraction of the slice)."""
    y_true, y_pred = ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")
    bce = ops.binary_crossentropy(y_true, y_pred, from_logits=False)
    return ops.mean(bce, axis=tuple(range(1, len(bce.shape)))) + dice_loss(y_true, y_pred, smooth)


LOSSES: dict[str, LossFn] = {"dice": dice_loss, "dice_bce": dice_bce_loss}


def get_loss(name: str) -> LossFn:
    """Return the loss function for a ``train.loss`` name."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}: expected one of {sorted(LOSSES)}") from None
