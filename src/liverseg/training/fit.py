"""Fit one U-Net (one fold, one tuning trial or the final model) and log its epochs to MLflow.

Arrays follow the pipeline contract: (N, H, W, 1) float32 images in [0, 1] and masks 0/1.
The default model is narrow, so Keras' per-step work was a large share of an epoch
(benchmarks/README.md): one execution runs a whole epoch's steps, a compiled model is reused
by later fits in the process, and the per-epoch MLflow logging does not wait for the store.

``train.distribute``: ``none``, TensorFlow's default device; ``mirrored``,
``tf.distribute.MirroredStrategy`` over every visible GPU, or the logical CPU devices without
one (how the tests run it). The batch size is the **global** batch: Keras splits it over the N
replicas (so N must divide it) and one step is the same step as on one device, with the
learning rate unchanged; for an N-times larger batch, raise the learning rate N-fold too (Goyal
et al., 2017). Batch normalisation computes its statistics per replica (Keras' default).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from liverseg import stop
from liverseg.errors import ParamsError
from liverseg.model.keras_metrics import DiceCoefficient, IoU
from liverseg.model.losses import get_loss
from liverseg.model.optimizers import FusedAdam
from liverseg.model.unet import build_unet
from liverseg.params import ModelSpec
from liverseg.training.dataset import make_dataset

# Validation batches of at least this many slices: fewer, larger calls cost less (validation
# was most of the loop's overhead), and the pooled Dice does not depend on the batching.
VALIDATION_BATCH_SIZE = 32
ONE_EXECUTION_PER_EPOCH = 1 << 20  # steps_per_execution: more than any epoch's steps
log = logging.getLogger("liverseg.progress")


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs every epoch's finite metrics (:meth:`values`) and the learning rate to one MLflow
    run at step ``step_offset`` + the epoch counted from 1. ``first``, given the epoch's
    values, returns metrics logged first in the batch. Not ``synchronous``: each epoch's batch
    is queued, and all are waited for when training ends."""

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
        """Keras' epoch logs as floats: every real scalar (NaN and infinity included); text,
        booleans and arrays left out."""
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
    """Training's stop point (:func:`liverseg.stop.check`): before each execution of training
    and validation, and after the epoch's other callbacks have logged it. (Batch-begin hooks
    leave Keras' asynchronous dispatch of batch-end callbacks on.)"""

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        stop.check()

    def on_test_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        stop.check()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        stop.check()


def keras_session(precision: str, seed: int) -> None:
    """Keras' global dtype policy ``precision``; Python, NumPy and TensorFlow seeded."""
    if precision != "float32":
        keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(seed)


@functools.cache
def _mirrored() -> Any:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)


def replicas(kind: str) -> int:
    """How many replicas ``train.distribute`` ``kind`` trains on here."""
    return int(_mirrored().num_replicas_in_sync) if kind == "mirrored" else 1


def distribute_scope(kind: str, batch_size: int) -> contextlib.AbstractContextManager[Any]:
    """The context to build and compile a model that trains with ``kind`` in."""
    if kind not in ("none", "mirrored"):
        raise ParamsError(f"params: train.distribute: {kind!r} is not one of none, mirrored")
    if kind == "none":
        return contextlib.nullcontext()
    n = replicas(kind)
    if batch_size % n:
        raise ParamsError(
            f"params: train.distribute: mirrored over {n} replicas needs a batch size divisible "
            f"by {n}, got {batch_size} (train.batch_size or the tuned one)"
        )
    return _mirrored().scope()


@dataclass
class FitResult:
    """A fitted model and its per-epoch history (epochs counted from 0)."""

    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int | None = None
    best: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@contextlib.contextmanager
def _policy(precision: str) -> Iterator[None]:
    """Keras' global dtype policy ``precision`` inside, restored after."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _seeded_unet(image_size: int, spec: ModelSpec, seed: int, channels: int = 1) -> keras.Model:
    """A freshly initialised U-Net of ``spec`` (seeded), its layers in ``spec.precision``."""
    keras.utils.set_random_seed(seed)
    with _policy(spec.precision):
        return build_unet(image_size, spec.model, seed=seed, channels=channels)


def compile_unet(
    image_size: int,
    spec: ModelSpec,
    learning_rate: float,
    seed: int,
    *,
    steps_per_execution: int = 1,
    jit_compile: bool = False,
    channels: int = 1,
) -> keras.Model:
    """A freshly initialised (seeded) U-Net of ``spec`` compiled with its loss and metrics, its
    layers and optimizer in ``spec.precision``."""
    model = _seeded_unet(image_size, spec, seed, channels)
    with _policy(spec.precision):
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
    return model


# Compiled U-Nets of this process for reuse by later fits (see _compiled_unet).
_COMPILED: dict[tuple[Any, ...], keras.Model] = {}


def forget_compiled_models() -> None:
    """Drop the compiled U-Nets kept for reuse: the next fit compiles (and traces) anew."""
    _COMPILED.clear()


def _compiled_unet(
    image_size: int,
    spec: ModelSpec,
    learning_rate: float,
    seed: int,
    steps: int,
    jit: bool,
    channels: int,
) -> keras.Model:
    """A compiled U-Net in exactly the state :func:`compile_unet` gives, reused if possible.

    Keras traces a new model's steps on its first epoch: about 10 CPU s on the default U-Net,
    more than two epochs (benchmarks/README.md). A model compiled earlier with the same key is
    reused instead, its variables set to a newly built seeded model's and its optimizer's to a
    new optimizer's: training is then the same (tests/test_fit.py).
    """
    # The augmentation acts on the data, not the model: not part of the key.
    key = (image_size, channels, spec.model, spec.loss, spec.precision, steps, jit)
    model = _COMPILED.get(key)
    if model is None:
        _COMPILED[key] = compile_unet(
            image_size,
            spec,
            learning_rate,
            seed,
            steps_per_execution=steps,
            jit_compile=jit,
            channels=channels,
        )
        return _COMPILED[key]
    _copy_variables(_seeded_unet(image_size, spec, seed, channels), model)
    for var in model.optimizer.variables:  # zero moments and step count
        var.assign(keras.ops.zeros(var.shape, var.dtype))
    model.optimizer.learning_rate = learning_rate
    return model


def _copy_variables(src: keras.Model, dst: keras.Model) -> None:
    """Every variable of ``src`` (weights, BatchNorm statistics, seed states) into ``dst``."""
    for target, value in zip(dst.variables, src.variables, strict=True):
        target.assign(value)


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

    ``val_stride``: each epoch validates on every ``val_stride``-th slice of ``val``
    (neighbouring slices are nearly alike: benchmarks/README.md); ``best`` is then the best
    epoch's model evaluated on all of ``val``. ``batch_size`` is the global batch.
    ``progress``: a label such as ``train: fold-0`` for one log line per epoch.
    """
    if val_stride < 1:
        raise ValueError(f"fit: val_stride must be >= 1, got {val_stride}")
    image_size, channels = int(train[0].shape[1]), int(train[0].shape[-1])
    if distribute == "none":
        # One bound serves every data size: an execution ends with the epoch's batches.
        steps_now = steps_per_execution or ONE_EXECUTION_PER_EPOCH
        model = _compiled_unet(
            image_size, spec, learning_rate, seed, steps_now, jit_compile, channels
        )
    else:
        # One step per execution: over a distributed dataset TensorFlow 2.21 fails on a last,
        # shorter execution ("You must feed a value for placeholder tensor").
        with distribute_scope(distribute, batch_size):  # batch_size is the global batch
            model = compile_unet(
                image_size, spec, learning_rate, seed, jit_compile=jit_compile, channels=channels
            )
    train_ds = make_dataset(
        *train, batch_size=batch_size, training=True, augment=spec.augment, seed=seed
    )
    val_ds = None
    cbs = list(callbacks or [])
    if progress is not None:
        cbs.append(EpochProgress(progress, epochs))

    val_batch = max(batch_size, VALIDATION_BATCH_SIZE)
    validation_dataset = functools.partial(
        make_dataset, batch_size=val_batch, training=False, augment=None, seed=seed
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
    if distribute == "none":  # an uncompiled copy: the compiled model may be reused later
        copy = _seeded_unet(image_size, spec, 0, channels)
        _copy_variables(model, copy)
        model = copy
    if val is None or not history.get("val_dice"):
        return FitResult(model=model, history=history, seconds=seconds)
    best = int(np.argmax(history["val_dice"]))
    best_val = all_val or {k: history[k][best] for k in history if k.startswith("val_")}
    return FitResult(model, history, best, best_val, seconds)
