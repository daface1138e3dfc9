"""One cross-validation fold as an MLflow run (``fold-k``, a child of the ``cv`` run), trained
in this process (``train.processes: 1``) or in worker processes (:mod:`liverseg.workers`);
what a fold computes depends on its thread count, not on which process trains it.

The finished folds of an interrupted ``train`` are reused, with MLflow as the cache: every
fold run is tagged ``fold_key`` (a hash of the data's content hash, every training param, the
fold and its cases, the source of ``liverseg.training`` and ``liverseg.model``, the Keras
version) and holds ``fold.json`` (summary row and history). A FINISHED fold run with the key
whose ``cv`` parent ended KILLED or FAILED is moved under the new ``cv`` run (tag
``resumed_from_parent``). Not one DVC stage per fold (``foreach``): that would split one
MLflow ``cv`` run over several processes, while the fold runs already hold every model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from liverseg import stop
from liverseg.data.prepared import load_splits
from liverseg.data.splits import fold_cases
from liverseg.errors import LiversegError
from liverseg.params import TrainParams
from liverseg.training.fit import MlflowEpochLogger, fit, keras_session
from liverseg.workers import Pool, threads_per_process

FOLD_KEY_TAG = "fold_key"
RESUMED_TAG = "resumed_from_parent"
FOLD_FILE = "fold.json"
CODE_DIRS = ("training", "model")  # the code that defines a fold's model: a change retrains

log = logging.getLogger(__name__)


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
    k: int


@dataclass
class FoldOutcome:
    run_id: str
    row: dict[str, Any]
    history: dict[str, list[float]]
    model: Any  # keras.Model, or None when the final model does not need it


def fold_key(data_sha256: str, params: dict[str, Any], fold: int, train: list, val: list) -> str:
    """Hash of what defines fold ``fold``'s model (the module docstring says what)."""
    import keras

    root = Path(__file__).resolve().parents[1]
    code = hashlib.sha256()
    for d in CODE_DIRS:
        for f in sorted((root / d).rglob("*.py")):
            code.update(f.relative_to(root).as_posix().encode())
            code.update(f.read_bytes())
    payload = {
        "data": data_sha256,
        "params": params,
        "fold": fold,
        "train": list(train),
        "val": list(val),
        "code": code.hexdigest(),
        "keras": keras.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def load_fold_model(run_id: str) -> Any:
    """The Keras model of fold run ``run_id`` (uncompiled)."""
    from liverseg.model.keras_metrics import CUSTOM_OBJECTS

    return mlflow.keras.load_model(
        f"runs:/{run_id}/model", custom_objects=CUSTOM_OBJECTS, load_model_kwargs={"compile": False}
    )


def reuse_fold(
    experiment_id: str, key: str, new_parent: str, *, load_model: bool
) -> FoldOutcome | None:
    """The finished fold run with ``key`` of an interrupted ``cv``, moved under ``new_parent``
    (None if there is none)."""
    client = MlflowClient()
    runs = client.search_runs(
        [experiment_id],
        f"tags.{FOLD_KEY_TAG} = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID, "")
        if not parent or client.get_run(parent).info.status not in ("KILLED", "FAILED"):
            continue
        run_id = run.info.run_id
        saved = mlflow.artifacts.load_dict(f"runs:/{run_id}/{FOLD_FILE}")
        model = load_fold_model(run_id) if load_model else None
        client.set_tag(run_id, RESUMED_TAG, parent)
        client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, new_parent)
        return FoldOutcome(run_id, saved["row"], saved["history"], model)
    return None


def log_keras_model(model: Any) -> None:
    """Log ``model`` as the active run's MLflow Keras model ``model`` with its signature."""
    import keras
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
    from liverseg.data.prepared import load_prepared
    from liverseg.tracking import log_dataset

    cfg = job.cfg
    train_ids, val_ids = fold_cases(load_splits(job.prepared), fold)
    key = fold_key(job.tags.get("data_sha256", ""), job.params, fold, train_ids, val_ids)
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
                FOLD_KEY_TAG: key,
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
        best = {k: row[k] for k in ("best_val_dice", "best_val_iou", "best_epoch")}
        mlflow.log_metrics({**best, "train_seconds": res.seconds})
        log_keras_model(res.model)
        mlflow.log_dict({"row": row, "history": res.history}, FOLD_FILE)
    log.info(
        f"train: fold {fold}: best val Dice {row['best_val_dice']:.4f} at epoch "
        f"{row['best_epoch']} ({res.seconds:.0f} s, val {','.join(val_ids)})"
    )
    return FoldOutcome(run.info.run_id, row, res.history, res.model)


def _fold_in_worker(job: FoldJob, fold: int) -> FoldOutcome:
    """A worker's fold, without its model (the stage loads it from the run)."""
    keras_session(job.cfg.precision, job.cfg.seed)
    out = train_fold(job, fold)
    out.model = None
    return out


def run_folds(job: FoldJob, folds: list[int], processes: int) -> dict[int, FoldOutcome]:
    """Train ``folds``: in this process when ``processes`` is 1, else in ``min(processes,
    len(folds))`` worker processes."""
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
    log.info(
        f"train: folds {', '.join(map(str, folds))} in {n} processes of {threads} CPU "
        f"thread(s) each (train.processes: {job.cfg.processes})"
    )
    with Pool(_fold_in_worker, job, processes, threads, len(folds)) as pool:
        results, errors = pool.run(folds)
    if errors:
        raise LiversegError("; ".join(f"fold {f}: {e}" for f, e in sorted(errors.items())))
    for out in results.values():
        out.model = load_fold_model(out.run_id) if load_model else None
    return dict(sorted(results.items()))
