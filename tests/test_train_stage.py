"""The train stage's ``main`` on tiny prepared data with a private MLflow store: its model
folder, its reports and its MLflow runs (seconds, not the slow end-to-end pipeline)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from conftest import MlflowStore
from liverseg.errors import DataError
from liverseg.inference import Segmenter
from liverseg.stages import train as train_stage

TRAIN = {
    "model": {"depth": 2, "base_filters": 4},
    "epochs": 1,
    "patience": 1,
    "batch_size": 8,
    "seed": 3,
    "experiment": "stage-test",
}


def _args(tmp_path: Path, prepared: Path, tuned: Path | None) -> argparse.Namespace:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": TRAIN}))
    return argparse.Namespace(
        prepared=prepared,
        tuned=tuned,
        model_dir=tmp_path / "models",
        reports=tmp_path / "reports" / "train",
        params=params,
    )


def test_train_stage_writes_model_reports_and_finished_runs(
    tiny_prepared: Path,
    mlflow_store: MlflowStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # no dvc.lock and no git here: the data hash is the content's
    tuned = tmp_path / "best_params.json"
    tuned.write_text(json.dumps({"learning_rate": 0.003, "batch_size": 4}))
    args = _args(tmp_path, tiny_prepared, tuned)
    train_stage.main(args)

    # models/: what inference loads, with the prepare stage's preprocessing
    seg = Segmenter.from_dir(args.model_dir)
    assert seg.image_size == 32 and seg.window_hu == (-100.0, 400.0) and seg.crop == "body"
    mask = seg.segment_slices(np.full((2, 40, 40), -1000.0, dtype=np.float32))
    assert mask.shape == (2, 40, 40)

    # reports: the tuned values were used, one row per fold and epoch
    metrics = json.loads((args.reports / "metrics.json").read_text())
    assert (metrics["learning_rate"], metrics["batch_size"]) == (0.003, 4)
    assert [f["fold"] for f in metrics["folds"]] == [0, 1]
    assert 0.0 <= metrics["cv_val_dice_mean"] <= 1.0 and metrics["final"] == "ensemble"
    with open(args.reports / "curves.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["fold"], r["epoch"]) for r in rows] == [("fold-0", "1"), ("fold-1", "1")]
    assert "val_dice" in rows[0]
    run = json.loads((args.reports / "run.json").read_text())
    assert run["tracking_uri"] == mlflow_store.uri
    exp = mlflow.get_experiment_by_name("stage-test")
    assert exp is not None and run["experiment_id"] == exp.experiment_id
    # its artifacts beside this store's database, not in the repository's mlruns/
    assert exp.artifact_location == (mlflow_store.root / "artifacts").resolve().as_uri()

    # MLflow: every run FINISHED; run.json names the parent and the final run
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == ["cv", "final", "fold-0", "fold-1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert by_name["cv"].info.run_id == run["parent_run_id"]
    assert by_name["final"].info.run_id == run["final_run_id"]
    parent = by_name["cv"].data
    assert parent.params["hparams_source"] == str(tuned)
    assert parent.params["learning_rate"] == "0.003" and parent.params["batch_size"] == "4"
    assert parent.tags["seed"] == "3" and parent.tags["git_commit"] == "unknown"
    assert parent.tags["data_dvc_md5"] == "unknown" and len(parent.tags["data_sha256"]) == 64


def test_a_missing_tuning_result_stops_before_anything_is_written(
    tiny_prepared: Path, mlflow_store: MlflowStore, tmp_path: Path
) -> None:
    args = _args(tmp_path, tiny_prepared, tmp_path / "nowhere" / "best_params.json")
    with pytest.raises(DataError, match="nowhere/best_params.json: not found"):
        train_stage.main(args)
    assert not args.model_dir.exists() and not args.reports.exists()
    assert mlflow.get_experiment_by_name("stage-test") is None


def test_the_repository_store_keeps_its_artifacts_in_mlruns(
    tmp_path: Path, empty_mlflow_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stages' experiment under the CLI's default URI (a path relative to the repository):
    artifacts in ``mlruns/artifacts``, beside the database."""
    import shutil

    from liverseg.cli import DEFAULT_TRACKING_URI
    from liverseg.tracking import ensure_experiment

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").mkdir()
    shutil.copy(empty_mlflow_db, tmp_path / "mlruns" / "mlflow.db")
    mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
    try:
        exp = mlflow.get_experiment(ensure_experiment("liverseg"))
    finally:
        mlflow.set_tracking_uri(None)
    assert exp.artifact_location == (tmp_path / "mlruns" / "artifacts").resolve().as_uri()
