"""Fit one U-Net (one fold, one tuning trial or the final model) and log its epochs to MLflow.

Arrays follow the pipeline contract: (N, H, W, 1) float32 images in [0, 1] and masks 0/1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from liverseg.model.losses import get_loss
from liverseg.model.metrics import DiceCoefficient, IoU
from liverseg.model.unet import build_unet
from liverseg.params import TrainParams
from liverseg.training import distribute
from liverseg.training.pipeline import make_dataset

# Keras' names for the metrics that are logged every epoch (val_* when there is validation).
EPOCH_METRICS = ("loss", "dice", "iou")


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics and the learning rate to one MLflow run, step = epoch."""

    def __init__(self, run_id: str, client: MlflowClient | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.client = client or MlflowClient()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        now = int(time.time() * 1000)
        values = {
            k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float | np.number)
        }
        values["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        metrics = [Metric(k, v, now, epoch) for k, v in values.items() if np.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)


@dataclass
class FitResult:
    """A fitted model and its per-epoch history (epochs counted from 0)."""

    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int | None = None
    best: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def compile_unet(image_size: int, cfg: TrainParams, learning_rate: float, seed: int) -> keras.Model:
    """A freshly initialised (seeded) U-Net compiled with the configured loss and metrics."""
    keras.utils.set_random_seed(seed)
    model = build_unet(image_size, cfg.model, seed=seed)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=get_loss(cfg.loss),
        metrics=[DiceCoefficient(name="dice"), IoU(name="iou")],
    )
    return model


def fit(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    cfg: TrainParams,
    *,
    learning_rate: float,
    batch_size: int,
    epochs: int,
    seed: int,
    patience: int | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> FitResult:
    """Train a new U-Net on ``train``; with ``val``, keep the weights of the best epoch by
    validation Dice (early stopping after ``patience`` epochs without improvement)."""
    image_size = int(train[0].shape[1])
    with distribute.scope(cfg.distribute, batch_size):  # batch_size is the global batch
        model = compile_unet(image_size, cfg, learning_rate, seed)
    train_ds = make_dataset(
        *train, batch_size=batch_size, training=True, augment=cfg.augment, seed=seed
    )
    val_ds = None
    cbs = list(callbacks or [])
    if val is not None:
        val_ds = make_dataset(*val, batch_size=batch_size, training=False, augment=None, seed=seed)
        cbs.append(
            keras.callbacks.EarlyStopping(
                monitor="val_dice",
                mode="max",
                patience=patience if patience is not None else epochs,
                restore_best_weights=True,
            )
        )
    t0 = time.perf_counter()
    # The dataset shuffles itself (seeded); Keras must not try to.
    hist = model.fit(
        train_ds, validation_data=val_ds, epochs=epochs, callbacks=cbs, verbose=0, shuffle=False
    )
    seconds = time.perf_counter() - t0
    history = {k: [float(x) for x in v] for k, v in hist.history.items()}
    result = FitResult(model=model, history=history, seconds=seconds)
    if val is not None and history.get("val_dice"):
        best = int(np.argmax(history["val_dice"]))
        result.best_epoch = best
        result.best = {k: history[k][best] for k in history if k.startswith("val_")}
    return result
