"""What the ``train`` and ``tune`` stages set up in Keras before they train.

(Their MLflow experiment needs no set-up of its own:
:func:`liverseg.training.tracking.ensure_experiment` puts the artifacts of a SQLite store
beside its database, ``mlruns/artifacts`` for the repository's ``sqlite:///mlruns/mlflow.db``.)
"""

from __future__ import annotations


def keras_session(precision: str, seed: int) -> None:
    """Set Keras' global dtype policy to ``precision`` (``train.precision``) and seed Python,
    NumPy and TensorFlow with ``seed``. Imports TensorFlow: the ``tune`` stage calls it only
    after its extra workers have started."""
    import keras

    if precision != "float32":
        keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(seed)
