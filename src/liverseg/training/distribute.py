"""Data-parallel training over the devices of one machine (``train.distribute``).

``none``: TensorFlow's default device. ``mirrored``: ``tf.distribute.MirroredStrategy`` over
every visible GPU, or the logical CPU devices without one (how the tests run it). The batch
size is the **global** batch: Keras splits it over the N replicas (so N must divide it) and
one step is the same step as on one device, with the learning rate unchanged; for an N-times
larger batch, raise the learning rate N-fold too (Goyal et al., 2017). Batch normalisation
computes its statistics per replica, as Keras does by default.
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
    """The context to build and compile a model that trains with ``kind`` in."""
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
