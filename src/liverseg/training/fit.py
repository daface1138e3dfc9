"""Fit one U-Net (one fold, one tuning trial or the final model) and log its epochs to MLflow.

Arrays follow the pipeline contract: (N, H, W, 1) float32 images in [0, 1] and masks 0/1.

Speed (measured in benchmarks/bench_train.py, figures in benchmarks/README.md): the default
model is narrow, so a training step costs little and Keras' per-step work (a Python call,
callbacks, the tf.data hand-over) was a large share of an epoch. One execution therefore runs
a whole epoch's steps (``steps_per_execution``), and the per-epoch MLflow logging does not
wait for the database (asynchronous, flushed when training ends).

Progress: :class:`EpochProgress` writes one line per epoch to the ``liverseg`` logger, which
the ``liverseg`` command sends to stderr (so DVC shows it); library callers (tests) stay quiet
unless they configure that logger.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from liverseg import stop
from liverseg.model.keras_metrics import DiceCoefficient, IoU
from liverseg.model.losses import get_loss
from liverseg.model.optimizers import FusedAdam
from liverseg.model.unet import build_unet
from liverseg.params import ModelSpec
from liverseg.training import distribute as distributed
from liverseg.training.dataset import make_dataset

# Validation runs the model forward only, in batches of at least this many slices: fewer, larger
# calls cost less than the training batch size's many small ones (measured: validation was most
# of the loop's overhead), and the epoch's pooled Dice does not depend on the batching.
VALIDATION_BATCH_SIZE = 32

# steps_per_execution for one execution per epoch: an upper bound on any epoch's step count.
ONE_EXECUTION_PER_EPOCH = 1 << 20

# Progress lines go to this logger (the CLI sends it to stderr).
log = logging.getLogger("liverseg.progress")


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics and the learning rate to one MLflow run, step = epoch
    counted from 1 (as the CLI's progress lines and the curves' CSV count epochs) plus
    ``step_offset`` (a tuning trial's later folds go on from its earlier folds' steps).

    Values follow one rule, :meth:`values`; NaN and infinite ones are not logged. ``first``,
    given the epoch's values, returns metrics logged first in the epoch's batch (a tuning
    trial's objective so far: MLflow's compare view plots the runs' first shared metric).

    ``synchronous=False`` (the default) queues each epoch's batch and waits for all of them
    when training ends, so training does not wait for the tracking store between epochs.
    """

    def __init__(
        self,
        run_id: str,
        client: MlflowClient | None = None,
        *,
        synchronous: bool = False,
        step_offset: int = 0,
        first: Callable[[dict[str, float]], dict[str, float]] | None = None,
    ) -> None:
        super().__init__()
        self.run_id = run_id
        self.client = client or MlflowClient()
        self.synchronous = synchronous
        self.step_offset = step_offset
        self.first = first
        self._pending: list[Any] = []

    @staticmethod
    def values(logs: dict[str, Any] | None) -> dict[str, float]:
        """Keras' epoch logs as floats: every real scalar (Python, NumPy or a TensorFlow
        tensor), NaN and infinity included; anything else (text, booleans, arrays) left out."""
        values = {}
        for key, value in (logs or {}).items():
            array = np.asarray(value)
            if array.shape == () and array.dtype.kind in "iuf":
                values[key] = float(array)
        return values

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        now = int(time.time() * 1000)
        values = self.values(logs)
        values["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        if self.first is not None:
            values = {**self.first(values), **values}
        step = self.step_offset + epoch + 1
        metrics = [Metric(k, v, now, step) for k, v in values.items() if math.isfinite(v)]
        op = self.client.log_batch(self.run_id, metrics=metrics, synchronous=self.synchronous)
        if op is not None:
            self._pending.append(op)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.flush()

    def flush(self) -> None:
        """Wait until every queued epoch is in the store (raises if one failed)."""
        pending, self._pending = self._pending, []
        for op in pending:
            op.wait()


class EpochProgress(keras.callbacks.Callback):
    """One progress line per epoch: ``<label> epoch e/E loss .. val_dice .. (s)``."""

    def __init__(self, label: str, epochs: int) -> None:
        super().__init__()
        self.label = label
        self.epochs = epochs
        self._t0 = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        logs = logs or {}
        parts = [f"{self.label} epoch {epoch + 1}/{self.epochs}"]
        for key in ("loss", "val_loss", "val_dice"):
            if key in logs:
                parts.append(f"{key} {float(logs[key]):.4f}")
        parts.append(f"{time.perf_counter() - self._t0:.1f} s")
        log.info("  ".join(parts))


class CheckStop(keras.callbacks.Callback):
    """Training's stop point (:func:`liverseg.stop.check`): before each batch, or each
    execution of ``steps_per_execution`` batches (a whole epoch by default), of training and
    validation, and after each epoch's callbacks (those before it have logged the epoch).
    Batch-begin hooks leave Keras' asynchronous dispatch of batch-end callbacks on."""

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        stop.check()

    def on_test_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        stop.check()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        stop.check()


def keras_session(precision: str, seed: int) -> None:
    """Set Keras' global dtype policy to ``precision`` (``train.precision``) and seed Python,
    NumPy and TensorFlow with ``seed``: what the train and tune stages (and their workers) set
    up before they train."""
    if precision != "float32":
        keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(seed)


@dataclass
class FitResult:
    """A fitted model and its per-epoch history (epochs counted from 0)."""

    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int | None = None
    best: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _seeded_unet(image_size: int, spec: ModelSpec, seed: int) -> keras.Model:
    """A freshly initialised U-Net of ``spec`` (seeded), its layers in ``spec.precision``;
    Keras' global dtype policy is restored afterwards."""
    keras.utils.set_random_seed(seed)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(spec.precision)
    try:
        return build_unet(image_size, spec.model, seed=seed)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def compile_unet(
    image_size: int,
    spec: ModelSpec,
    learning_rate: float,
    seed: int,
    *,
    steps_per_execution: int = 1,
    jit_compile: bool = False,
) -> keras.Model:
    """A freshly initialised (seeded) U-Net of ``spec`` compiled with its loss and metrics.

    The model's layers (and the optimizer compile wraps them in) take ``spec.precision`` as
    their dtype policy; Keras' global policy is restored afterwards.
    ``steps_per_execution``: training steps per call into TensorFlow (callbacks then see
    batches in groups of that size; epoch-level callbacks are unaffected).
    """
    model = _seeded_unet(image_size, spec, seed)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(spec.precision)
    try:
        model.compile(
            optimizer=FusedAdam(learning_rate=learning_rate),
            loss=get_loss(spec.loss),
            metrics=[DiceCoefficient(name="dice"), IoU(name="iou")],
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
        )
        # The optimizer's slots now, not on the first step: a step that creates variables is
        # traced twice by tf.function (once more without creating them), 2.2 CPU s on the
        # default U-Net (benchmarks/README.md).
        model.optimizer.build(model.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return model


# Compiled U-Nets of this process, one per (image size, architecture, loss, precision, steps per
# execution, jit), for reuse by later fits (see _compiled_unet).
_COMPILED: dict[tuple[Any, ...], keras.Model] = {}


def forget_compiled_models() -> None:
    """Drop the compiled U-Nets kept for reuse: the next fit compiles (and traces) anew."""
    _COMPILED.clear()


def _compiled_unet(
    image_size: int,
    spec: ModelSpec,
    learning_rate: float,
    seed: int,
    *,
    steps_per_execution: int,
    jit_compile: bool,
) -> keras.Model:
    """A compiled U-Net in exactly the state :func:`compile_unet` gives, reused if possible.

    Keras traces a model's training and validation steps on its first epoch: on the default
    U-Net that costs about 10 CPU s, more than two epochs (benchmarks/README.md), once per new
    model, i.e. per fold and per tuning trial. A model compiled earlier in this process with
    the same architecture, loss, precision and execution settings is reused instead, its
    traced steps with it: every variable (weights, BatchNorm statistics, dropout seed states)
    is set to those of a newly built seeded model, and the optimizer's state to a new
    optimizer's (zero moments and step count, this fit's learning rate). Training is then the
    same as on a new model (tests/test_fit.py checks the histories are equal).
    """
    # The augmentation acts on the data, not the model: not part of the key.
    key = (image_size, spec.model, spec.loss, spec.precision, steps_per_execution, jit_compile)
    model = _COMPILED.get(key)
    if model is None:
        model = compile_unet(
            image_size,
            spec,
            learning_rate,
            seed,
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
        )
        _COMPILED[key] = model
        return model
    _copy_variables(_seeded_unet(image_size, spec, seed), model)
    for var in model.optimizer.variables:
        var.assign(keras.ops.zeros(var.shape, var.dtype))
    model.optimizer.learning_rate = learning_rate
    return model


def _copy_variables(src: keras.Model, dst: keras.Model) -> None:
    """Every variable of ``src`` (weights, BatchNorm statistics, seed states) into ``dst``."""
    for target, value in zip(dst.variables, src.variables, strict=True):
        target.assign(value)


def detached_copy(model: keras.Model, image_size: int, spec: ModelSpec) -> keras.Model:
    """A new, uncompiled U-Net with ``model``'s variables (``model`` may be reused later)."""
    copy = _seeded_unet(image_size, spec, 0)
    _copy_variables(model, copy)
    return copy


def fit(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    spec: ModelSpec,
    *,
    learning_rate: float,
    batch_size: int,
    epochs: int,
    seed: int,
    patience: int | None = None,
    distribute: str = "none",
    callbacks: list[keras.callbacks.Callback] | None = None,
    progress: str | None = None,
    steps_per_execution: int | None = None,
    jit_compile: bool = False,
    val_stride: int = 1,
) -> FitResult:
    """Train a new U-Net of ``spec`` on ``train``; with ``val``, keep the weights of the best
    epoch by validation Dice (early stopping after ``patience`` epochs without improvement).

    ``val_stride``: each epoch validates on every ``val_stride``-th slice of ``val`` (what
    early stopping, the best epoch and the history's ``val_*`` see); ``best`` is then the best
    epoch's model evaluated on all of ``val``. Neighbouring slices of a scan are nearly alike,
    so a stride of 2 halves validation's cost and chose the same epochs on the default data
    (benchmarks/README.md, "Validation on every second slice").

    Everything else is an argument: the optimiser's ``learning_rate``, the global
    ``batch_size``, ``epochs``, the ``seed`` of weights and batches, and ``distribute``
    (``train.distribute``: how, not what, is trained).

    ``progress``: a label such as ``train: fold-0``; one line per epoch goes to the
    ``liverseg.progress`` logger. ``steps_per_execution``: default, one execution per epoch.
    Validation batches hold ``max(batch_size, VALIDATION_BATCH_SIZE)`` slices.
    """
    if val_stride < 1:
        raise ValueError(f"fit: val_stride must be >= 1, got {val_stride}")
    image_size = int(train[0].shape[1])
    steps = math.ceil(int(train[0].shape[0]) / batch_size)
    if distribute == "none":
        # One execution per epoch: Keras' loop over the steps of an execution ends when the
        # epoch's batches do, so one bound serves every data size (and lets folds and trials
        # of different sizes reuse one compiled model).
        model = _compiled_unet(
            image_size,
            spec,
            learning_rate,
            seed,
            steps_per_execution=steps_per_execution or ONE_EXECUTION_PER_EPOCH,
            jit_compile=jit_compile,
        )
    else:
        with distributed.scope(distribute, batch_size):  # batch_size is the global batch
            model = compile_unet(
                image_size,
                spec,
                learning_rate,
                seed,
                steps_per_execution=distributed.steps_per_execution(
                    distribute, steps_per_execution or steps
                ),
                jit_compile=jit_compile,
            )
    train_ds = make_dataset(
        *train, batch_size=batch_size, training=True, augment=spec.augment, seed=seed
    )
    val_ds = None
    cbs = list(callbacks or [])
    if progress is not None:
        cbs.append(EpochProgress(progress, epochs))

    def validation_dataset(images: np.ndarray, masks: np.ndarray) -> Any:
        return make_dataset(
            images,
            masks,
            batch_size=max(batch_size, VALIDATION_BATCH_SIZE),
            training=False,
            augment=None,
            seed=seed,
        )

    if val is not None:
        val_ds = validation_dataset(val[0][::val_stride], val[1][::val_stride])
        cbs.append(
            keras.callbacks.EarlyStopping(
                monitor="val_dice",
                mode="max",
                patience=patience if patience is not None else epochs,
                restore_best_weights=True,
            )
        )
    cbs.append(CheckStop())
    t0 = time.perf_counter()
    try:
        # The dataset shuffles itself (seeded); Keras must not try to.
        hist = model.fit(
            train_ds, validation_data=val_ds, epochs=epochs, callbacks=cbs, verbose=0, shuffle=False
        )
    finally:
        # Queued MLflow writes land even when training stops with an error.
        for cb in cbs:
            if isinstance(cb, MlflowEpochLogger):
                cb.flush()
    all_val: dict[str, float] | None = None
    if val is not None and val_stride > 1 and hist.history.get("val_dice"):
        # the best epoch's weights (EarlyStopping restored them) on every validation slice
        logs = model.evaluate(validation_dataset(*val), verbose=0, return_dict=True)
        all_val = {f"val_{k}": float(v) for k, v in logs.items()}
    seconds = time.perf_counter() - t0
    history = {k: [float(x) for x in v] for k, v in hist.history.items()}
    if distribute == "none":
        model = detached_copy(model, image_size, spec)
    result = FitResult(model=model, history=history, seconds=seconds)
    if val is not None and history.get("val_dice"):
        best = int(np.argmax(history["val_dice"]))
        result.best_epoch = best
        result.best = all_val or {k: history[k][best] for k in history if k.startswith("val_")}
    return result
