"""One cross-validation fold as an MLflow run, trained in this process or in worker processes.

:func:`train_fold` trains fold ``k`` and records it as the child run ``fold-k`` of the ``cv``
run (per-epoch metrics, ``fold.json``, the model). :func:`run_folds` trains the folds still to
do: one after the other in this process (``train.processes: 1``, TensorFlow's own thread
count), or at once in worker processes (:mod:`liverseg.workers`: why processes, and what
happens on faults), each with ``max(1, cores // processes)`` CPU threads (``auto``: one
process per fold without a GPU, one process on a GPU). The stage's process then loads the
fold models from their runs.

What a fold computes depends on its thread count (the order of floating-point sums), not on
which process trains it or when, so a configuration gives the same models on every run; the
finished fold runs of an interrupted ``train`` are reused as before
(:mod:`liverseg.training.resume`). A worker's error fails the ``train`` naming the fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from liverseg import stop
from liverseg.data.prepared import load_splits
from liverseg.data.splits import fold_cases
from liverseg.errors import LiversegError
from liverseg.params import TrainParams
from liverseg.training import resume
from liverseg.training.fit import MlflowEpochLogger, fit
from liverseg.workers import Pool, threads_per_process


class FoldError(LiversegError):
    """A fold's worker process failed (the message names the fold and the cause)."""


@dataclass(frozen=True)
class FoldJob:
    """Everything a fold's training needs, picklable for a worker process."""

    prepared: Path
    cfg: TrainParams
    learning_rate: float
    batch_size: int
    experiment_id: str
    parent_run_id: str  # the ``cv`` run
    tags: dict[str, str]
    params: dict[str, Any]  # the ``cv`` run's flat params: part of every fold's resume key
    data_digest: str
    what: str  # the model in words, for the run description
    k: int


@dataclass
class FoldOutcome:
    run_id: str
    row: dict[str, Any]
    history: dict[str, list[float]]
    model: Any  # keras.Model, or None when the final model does not need it


def log_keras_model(model: Any) -> None:
    """Log ``model`` as the active run's MLflow Keras model ``model`` with its signature."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from liverseg.tracking import tensorflow_distribution

    # Slices of any size: (N, H, W, 1) windowed CT in [0, 1] -> (N, H, W, 1) probabilities.
    spec = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, 1))])
    mlflow.keras.log_model(
        model,
        name="model",
        signature=ModelSignature(inputs=spec, outputs=spec),
        pip_requirements=[
            f"{tensorflow_distribution()}=={tf.__version__}",
            f"keras=={keras.__version__}",
        ],
    )


def train_fold(job: FoldJob, fold: int) -> FoldOutcome:
    """Train fold ``fold`` as the child run ``fold-<fold>`` of ``job.parent_run_id``."""
    import mlflow

    from liverseg.data.prepared import load_prepared
    from liverseg.tracking import log_dataset

    cfg = job.cfg
    train_ids, val_ids = fold_cases(load_splits(job.prepared), fold)
    key = resume.fold_key(job.tags.get("data_sha256", ""), job.params, fold, train_ids, val_ids)
    train = load_prepared(job.prepared, train_ids)
    val = load_prepared(job.prepared, val_ids)
    with mlflow.start_run(
        experiment_id=job.experiment_id,
        # an experiment's folds named after it, as its cv run is: charts that compare the
        # baseline with an experiment then tell their curves apart by run name
        run_name=f"fold-{fold}-{job.tags['dvc_exp']}"
        if job.tags.get("dvc_exp")
        else f"fold-{fold}",
        parent_run_id=job.parent_run_id,
        nested=True,
        tags=job.tags,
        description=f"Fold {fold} of {job.k}: validated on {', '.join(val_ids)}",
    ) as run:
        log_dataset(job.prepared, job.data_digest, context="training")
        mlflow.log_params(
            {"fold": fold, "learning_rate": job.learning_rate, "batch_size": job.batch_size}
        )
        mlflow.set_tags(
            {
                "val_cases": ",".join(val_ids),
                "train_cases": ",".join(train_ids),
                "kind": "fold",
                resume.FOLD_KEY_TAG: key,
            }
        )
        res = fit(
            train,
            val,
            cfg.spec,
            learning_rate=job.learning_rate,
            batch_size=job.batch_size,
            epochs=cfg.epochs,
            seed=cfg.seed + fold,
            patience=cfg.patience,
            distribute=cfg.distribute,
            callbacks=[MlflowEpochLogger(run.info.run_id)],
            val_stride=cfg.val_stride,
            progress=f"train: fold-{fold}",
        )
        assert res.best_epoch is not None
        row: dict[str, Any] = {
            "fold": fold,
            "val_cases": val_ids,
            "best_epoch": res.best_epoch + 1,
            "best_val_dice": res.best["val_dice"],
            "best_val_iou": res.best["val_iou"],
            "n_train_slices": int(train[0].shape[0]),
            "n_val_slices": int(val[0].shape[0]),
            "seconds": round(res.seconds, 1),
        }
        mlflow.log_metrics(
            {
                "best_val_dice": row["best_val_dice"],
                "best_val_iou": row["best_val_iou"],
                "best_epoch": row["best_epoch"],
                "train_seconds": res.seconds,
            }
        )
        log_keras_model(res.model)
        resume.save_fold(row, res.history)
    print(
        f"train: fold {fold}: best val Dice {row['best_val_dice']:.4f} at epoch "
        f"{row['best_epoch']} ({res.seconds:.0f} s, val {','.join(val_ids)})",
        flush=True,
    )
    return FoldOutcome(run.info.run_id, row, res.history, res.model)


# ------------------------------------------------------------------------------ worker processes
def _fold_in_worker(job: FoldJob, fold: int) -> tuple[str, dict[str, Any], dict[str, list[float]]]:
    """A worker's fold: the run id, summary row and history (the stage loads the model)."""
    from liverseg.training.fit import keras_session

    keras_session(job.cfg.precision, job.cfg.seed)
    out = train_fold(job, fold)
    return out.run_id, out.row, out.history


def run_folds(job: FoldJob, folds: list[int], processes: int) -> dict[int, FoldOutcome]:
    """Train ``folds``: in this process when ``processes`` is 1 (a stop is checked between
    folds and in their training), else in ``min(processes,
    len(folds))`` worker processes (:class:`liverseg.workers.Pool`)."""
    load_model = job.cfg.final == "ensemble"
    if processes <= 1 or not folds:
        outcomes = {}
        for fold in folds:
            stop.check()
            out = train_fold(job, fold)
            if not load_model:
                import keras

                out.model = None
                keras.backend.clear_session(free_memory=True)
            outcomes[fold] = out
        return outcomes

    n, threads = min(processes, len(folds)), threads_per_process(processes)
    print(
        f"train: folds {', '.join(map(str, folds))} in {n} processes of {threads} CPU "
        f"thread(s) each (train.processes: {job.cfg.processes})",
        flush=True,
    )
    with Pool(_fold_in_worker, job, processes, threads, len(folds)) as pool:
        results, errors = pool.run(folds)
    if errors:
        raise FoldError("; ".join(f"fold {fold}: {text}" for fold, text in sorted(errors.items())))
    return {
        fold: FoldOutcome(
            run_id, row, history, resume.load_fold_model(run_id) if load_model else None
        )
        for fold, (run_id, row, history) in sorted(results.items())
    }
