"""What the ``train`` stage does, as one function with typed arguments: :func:`train` sets up
Keras and the MLflow experiment, cross-validates (:mod:`liverseg.training.crossval`) and
returns what the stage writes (the model folder, ``metrics.json``, ``curves.csv`` and
``run.json``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from liverseg.fsutil import read_stage_json
from liverseg.params import TrainParams


@dataclass
class TrainOutputs:
    """The final model with the preprocessing it expects, and the stage's reports."""

    model: keras.Model
    window: list[float]  # the prepare stage's HU window, [low, high]
    image_size: int
    metrics: dict[str, Any]  # metrics.json: CV summary, learning rate, batch size, folds
    curves: dict[str, dict[str, list[float]]]  # the folds' per-epoch histories (curves.csv)
    run: dict[str, str]  # run.json: the MLflow runs that evaluate and register link to


def train(
    prepared: Path,
    cfg: TrainParams,
    *,
    learning_rate: float,
    batch_size: int,
    hparams_source: str = "params.yaml",
) -> TrainOutputs:
    """Cross-validate ``cfg``'s model on the prepared data ``prepared`` with the given learning
    rate and batch size (``hparams_source`` says where they came from, logged as a param) and
    build the final model, in experiment ``cfg.experiment`` of the current tracking URI."""
    import mlflow

    from liverseg.training.crossval import cross_validate
    from liverseg.training.setup import keras_session
    from liverseg.training.tracking import (
        content_hash,
        dvc_experiment,
        dvc_out_hash,
        ensure_experiment,
        git_commit,
    )

    keras_session(cfg.precision, cfg.seed)
    exp_id = ensure_experiment(cfg.experiment)
    tags = {
        "git_commit": git_commit(),
        "data_dvc_md5": dvc_out_hash(prepared),
        "data_sha256": content_hash(prepared),
        "seed": str(cfg.seed),
        "dvc_exp": dvc_experiment(),
    }
    digest = tags["data_dvc_md5"] if tags["data_dvc_md5"] != "unknown" else tags["data_sha256"]
    result = cross_validate(
        prepared,
        cfg,
        learning_rate=learning_rate,
        batch_size=batch_size,
        experiment_id=exp_id,
        tags=tags,
        extra_params={"hparams_source": hparams_source},
        data_digest=digest,
        dvc_exp=tags["dvc_exp"],
    )
    meta = read_stage_json(prepared / "meta.json", "prepare")["params"]
    metrics: dict[str, Any] = {k: v for k, v in result.summary.items() if k not in ("folds",)}
    metrics.update(
        {"learning_rate": learning_rate, "batch_size": batch_size, "folds": result.summary["folds"]}
    )
    return TrainOutputs(
        model=result.final_model,
        window=meta["window"],
        image_size=meta["image_size"],
        metrics=metrics,
        curves={k: v for k, v in result.histories.items() if k.startswith("fold")},
        run={
            "experiment_id": exp_id,
            "parent_run_id": result.parent_run_id,
            "final_run_id": result.final_run_id,
            "tracking_uri": mlflow.get_tracking_uri(),
        },
    )
