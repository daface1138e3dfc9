"""The set-up that the ``train`` and ``tune`` stages share before they train: the MLflow
experiment (with its artifact root) and Keras' precision policy and seed.

The tracking URI is set by the entry point (``liverseg.cli``), never here.
"""

from __future__ import annotations

from pathlib import Path

# The repository's own SQLite store (``sqlite:///mlruns/...``) keeps its artifacts here.
ARTIFACT_ROOT = Path("mlruns/artifacts")


def experiment(name: str) -> str:
    """Id of MLflow experiment ``name`` (see :func:`~liverseg.training.tracking.ensure_experiment`),
    created with its artifacts under :data:`ARTIFACT_ROOT` when tracking goes to the
    repository's store, beside the database for another SQLite store, and where a tracking
    server puts them otherwise."""
    import mlflow

    from liverseg.training.tracking import ensure_experiment

    root = ARTIFACT_ROOT if mlflow.get_tracking_uri().startswith("sqlite:///mlruns") else None
    return ensure_experiment(name, root)


def keras_session(precision: str, seed: int) -> None:
    """Set Keras' global dtype policy to ``precision`` (``train.precision``) and seed Python,
    NumPy and TensorFlow with ``seed``. Imports TensorFlow: the ``tune`` stage calls it only
    after its extra workers have started."""
    import keras

    if precision != "float32":
        keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(seed)
