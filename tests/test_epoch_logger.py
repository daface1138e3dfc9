"""The one per-epoch MLflow logger of fold runs and tuning trials: its float rule, what it logs."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from conftest import MlflowStore
from liverseg.training.fit import MlflowEpochLogger


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.5, 0.5),
        (3, 3.0),
        (np.float32(0.25), 0.25),
        (np.float64(2.0), 2.0),
        (np.int64(7), 7.0),
        (np.array(0.75), 0.75),  # a 0-d array
        (tf.constant(0.125), 0.125),  # a TensorFlow scalar tensor
        (keras.ops.convert_to_tensor(1.5), 1.5),
        (float("nan"), math.nan),  # kept here; the logger does not log it
        (float("inf"), math.inf),
        (-float("inf"), -math.inf),
        # not numbers
        ("0.5", None),
        (b"1", None),
        (None, None),
        (True, None),
        (np.bool_(False), None),
        (np.array([0.5, 0.6]), None),
        (tf.constant([1.0, 2.0]), None),
        (1 + 2j, None),
    ],
)
def test_the_float_rule(value: Any, expected: float | None) -> None:
    got = MlflowEpochLogger.values({"m": value, "other": 0.5})
    assert got.pop("other") == 0.5
    if expected is None:
        assert got == {}
        return
    assert type(got["m"]) is float
    if math.isnan(expected):
        assert math.isnan(got["m"])
    else:
        assert got["m"] == expected


class RecordingClient(MlflowClient):
    """A real client that also remembers the metric names of each batch, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    def log_batch(self, run_id: str, metrics: Any = (), **kwargs: Any) -> Any:
        self.batches.append([m.key for m in metrics])
        return super().log_batch(run_id, metrics=metrics, **kwargs)


def test_finite_values_are_logged_after_the_first_ones_from_step_offset_plus_one(
    mlflow_store: MlflowStore,
) -> None:
    client = RecordingClient()
    run_id = client.create_run(mlflow_store.experiment("logger")).info.run_id
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss="mse")
    seen: list[dict[str, float]] = []

    def first(values: dict[str, float]) -> dict[str, float]:
        seen.append(values)
        return {"objective": 2 * values["val_dice"]}

    logger = MlflowEpochLogger(run_id, client, step_offset=4, first=first)  # asynchronous
    logger.set_model(model)
    logs: dict[str, Any] = {
        "loss": tf.constant(0.5),
        "val_dice": np.float32(0.25),
        "val_loss": float("nan"),
        "iou": float("inf"),
    }
    logger.on_epoch_end(0, logs)
    logger.on_epoch_end(1, {"loss": 0.375, "val_dice": 0.5, "note": "text"})
    logger.flush()
    assert logger._pending == []
    # `first` sees the epoch's values (non-finite ones too); its metrics lead each batch
    assert math.isnan(seen[0]["val_loss"]) and seen[0]["loss"] == 0.5
    assert client.batches == [
        ["objective", "loss", "val_dice", "learning_rate"],
        ["objective", "loss", "val_dice", "learning_rate"],
    ]

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    assert history("loss") == [(5, 0.5), (6, 0.375)]
    assert history("objective") == [(5, 0.5), (6, 1.0)]
    assert history("learning_rate") == [(5, pytest.approx(0.01)), (6, pytest.approx(0.01))]
    assert history("val_loss") == [] and history("iou") == [] and history("note") == []
