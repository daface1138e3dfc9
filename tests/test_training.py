"""The fold loop's MLflow records, and FAILED (never RUNNING) runs after an error."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlflow
import pytest

from conftest import MlflowStore
from liverseg.params import ModelParams, TrainParams
from liverseg.training import crossval, folds

TINY_TRAIN = TrainParams(
    model=ModelParams(depth=2, base_filters=4),
    epochs=2,
    patience=2,
    batch_size=8,
    seed=3,
    experiment="t",
)


@pytest.fixture()
def store(mlflow_store: MlflowStore) -> str:
    """The id of an experiment in a private MLflow store."""
    return mlflow_store.experiment("t")


def _runs(exp_id: str):
    return mlflow.search_runs(experiment_ids=[exp_id], output_format="pandas")


def test_cross_validation_records(tiny_prepared: Path, store: str) -> None:
    res = crossval.train(tiny_prepared, TINY_TRAIN, learning_rate=1e-3, batch_size=8)
    runs = _runs(store)
    names = sorted(runs["tags.mlflow.runName"])
    assert names == ["cv", "final", "fold-0", "fold-1"]
    assert set(runs["status"]) == {"FINISHED"}
    parent = runs[runs["tags.mlflow.runName"] == "cv"].iloc[0]
    assert parent["run_id"] == res.run["parent_run_id"]
    assert parent["params.model.depth"] == "2" and parent["tags.seed"] == "3"
    for k in ("cv_val_dice_mean", "cv_val_dice_std", "cv_val_iou_mean", "cv_val_iou_std"):
        assert 0.0 <= parent[f"metrics.{k}"] <= 1.0
        # rounded for the runs table, exact beside it
        assert parent[f"metrics.{k}"] == round(res.metrics[k], 4), k
        assert parent[f"metrics.{k}_exact"] == res.metrics[k], k
    folds = runs[runs["tags.mlflow.runName"].str.startswith("fold")]
    assert (folds["tags.mlflow.parentRunId"] == res.run["parent_run_id"]).all()
    # the fold's case ids are recorded and disjoint
    v0, v1 = (set(s.split(",")) for s in folds.sort_values("tags.mlflow.runName")["tags.val_cases"])
    assert v0 and v1 and not v0 & v1
    client = mlflow.MlflowClient()
    for run_id in folds["run_id"]:
        for key in ("loss", "dice", "iou", "val_loss", "val_dice", "val_iou", "learning_rate"):
            hist = client.get_metric_history(run_id, key)
            assert [m.step for m in hist] == [1, 2], key  # epochs counted from 1
        # the fold's best weights are logged as a Keras model
        assert mlflow.search_logged_models(
            experiment_ids=[store],
            filter_string=f"source_run_id = '{run_id}'",
            output_format="list",
        )
    assert len(res.metrics["folds"]) == 2


def test_error_ends_runs_failed(
    tiny_prepared: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fit = folds.fit
    calls = {"n": 0}

    def failing_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure in fold 1")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(folds, "fit", failing_fit)
    with pytest.raises(RuntimeError, match="injected failure"):
        crossval.train(
            tiny_prepared, replace(TINY_TRAIN, epochs=1), learning_rate=1e-3, batch_size=8
        )
    runs = _runs(store)
    status = dict(zip(runs["tags.mlflow.runName"], runs["status"], strict=True))
    assert status == {"cv": "FAILED", "fold-0": "FINISHED", "fold-1": "FAILED"}
    assert mlflow.active_run() is None


def test_fold_ensemble_is_the_mean_and_survives_saving(tmp_path: Path) -> None:
    import keras
    import numpy as np

    from liverseg.model.keras_metrics import CUSTOM_OBJECTS
    from liverseg.model.unet import build_unet

    members = [build_unet(32, ModelParams(depth=2, base_filters=4), seed=i) for i in range(3)]
    model = crossval.ensemble(members)
    x = np.random.default_rng(0).random((2, 32, 32, 1)).astype("float32")
    mean = np.mean([m.predict_on_batch(x) for m in members], axis=0)
    np.testing.assert_allclose(model.predict_on_batch(x), mean, atol=1e-6)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(
        tmp_path / "m.keras", custom_objects=CUSTOM_OBJECTS, compile=False
    )
    np.testing.assert_allclose(loaded.predict_on_batch(x), mean, atol=1e-6)
