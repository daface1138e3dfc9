"""Data-parallel training over the devices of one machine (``train.distribute``).

* ``none``: TensorFlow's default device (one GPU, or the CPU);
* ``mirrored``: ``tf.distribute.MirroredStrategy`` over every visible GPU (``CUDA_VISIBLE_DEVICES``
  chooses them), or over the logical CPU devices when there is no GPU (how the tests run it
  with two). Every replica holds a copy of the weights; each step's gradients are all-reduced.

Batch and learning-rate rule: ``batch_size`` (``train.batch_size`` or the tuned one) is the
**global** batch. Keras splits each batch of the dataset over the N replicas (``batch_size / N``
slices each, so it must divide evenly), divides each replica's mean loss by N and sums the
gradients, so one step is the same step as on one device: the learning rate is used
unchanged, and more GPUs give the same training, faster per step when the batch is large enough
to keep them busy. To use the extra memory for an N-times larger batch instead, raise the batch
size and the learning rate together, N-fold (the linear scaling rule of Goyal et al., 2017).
One difference remains: batch normalisation computes its statistics per replica (over
``batch_size / N`` slices), as Keras' ``BatchNormalization`` does by default.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from liverseg.errors import ParamsError

DISTRIBUTE = ("none", "mirrored")


@functools.cache
def _mirrored() -> Any:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)


def replicas(kind: str) -> int:
    """How many replicas ``kind`` trains on here."""
    return int(_mirrored().num_replicas_in_sync) if kind == "mirrored" else 1


def scope(kind: str, batch_size: int) -> contextlib.AbstractContextManager[Any]:
    """The context in which to build and compile a model that trains with ``kind``."""
    if kind not in DISTRIBUTE:
        raise ParamsError(f"params: train.distribute: {kind!r} is not one of {DISTRIBUTE}")
    if kind == "none":
        return contextlib.nullcontext()
    n = replicas(kind)
    if batch_size % n:
        raise ParamsError(
            f"params: train.distribute: mirrored over {n} replicas needs a batch size divisible "
            f"by {n}, got {batch_size} (train.batch_size or the tuned one)"
        )
    return _mirrored().scope()


def steps_per_execution(kind: str, wanted: int) -> int:
    """Keras' ``steps_per_execution`` for ``kind``: 1 under ``mirrored``.

    Several steps per execution over a distributed dataset fail in TensorFlow 2.21 on its
    last, shorter execution ("You must feed a value for placeholder tensor"); on GPUs each
    step is large enough that one step per execution costs little.
    """
    return 1 if kind == "mirrored" else wanted
