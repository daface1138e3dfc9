"""Resumable cross-validation: the finished folds of an interrupted ``train`` are reused.

The cache is MLflow itself, not a second store: every fold run is tagged ``fold_key``, a hash
of everything that defines the fold's model (the prepared data's content hash, every training
param, learning rate, batch size, the fold and its cases, the source of ``liverseg.training``
and ``liverseg.model``, the Keras version), and holds ``fold.json`` (its summary row and
per-epoch history) beside its model. A later ``train`` whose fold has the same key reuses a
FINISHED fold run whose ``cv`` parent ended KILLED or FAILED (an interrupted train; the CLI
ends the runs of a SIGKILLed one KILLED first): it loads the model and moves the run under the
new ``cv`` parent (tag ``resumed_from_parent`` names the old one), so the fold runs are not
duplicated. Folds of a FINISHED ``cv`` are never taken: ``dvc repro -f`` retrains.

Why not one DVC stage per fold (``foreach``): the per-fold outputs, params and a final stage
over them would rewrite ``dvc.yaml`` and split one MLflow ``cv`` run into several processes,
while the fold runs already hold every fold's model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

FOLD_KEY_TAG = "fold_key"
RESUMED_TAG = "resumed_from_parent"
FOLD_FILE = "fold.json"
# The code that defines a fold's model: a change here retrains.
CODE_DIRS = ("training", "model")


def _code_hash() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for d in CODE_DIRS:
        for f in sorted((root / d).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def fold_key(data_sha256: str, params: dict[str, Any], fold: int, train: list, val: list) -> str:
    """Hash of what defines fold ``fold``'s model (see the module docstring)."""
    import keras

    payload = {
        "data": data_sha256,
        "params": params,
        "fold": fold,
        "train": list(train),
        "val": list(val),
        "code": _code_hash(),
        "keras": keras.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def save_fold(row: dict[str, Any], history: dict[str, list[float]]) -> None:
    """Log the fold's summary row and history to the active (fold) run."""
    mlflow.log_dict({"row": row, "history": history}, FOLD_FILE)


def load_fold_model(run_id: str) -> Any:
    """The Keras model of fold run ``run_id`` (uncompiled)."""
    from liverseg.model.keras_metrics import CUSTOM_OBJECTS

    return mlflow.keras.load_model(
        f"runs:/{run_id}/model",
        custom_objects=CUSTOM_OBJECTS,
        load_model_kwargs={"compile": False},
    )


@dataclass
class ReusedFold:
    run_id: str
    old_parent: str
    row: dict[str, Any]
    history: dict[str, list[float]]
    model: Any


def reuse_fold(
    experiment_id: str, key: str, new_parent: str, *, load_model: bool
) -> ReusedFold | None:
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
        return ReusedFold(run_id, parent, saved["row"], saved["history"], model)
    return None
