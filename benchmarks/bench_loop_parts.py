"""The parts of the default training loop's overhead, one call at a time, in CPU milliseconds.

``bench_train.py --levers`` shows that what the project's loop adds to the bare loop on the
default configuration is validation and augmentation. This script times those two parts
alone, and the alternatives tried for them:

* ``augment``: :func:`liverseg.training.dataset._augment_batch` per batch of the default
  training batch size at ``prepare.image_size``, whole and by part (geometry, blur, intensity),
  as a traced function and with XLA (``jit_compile``) where XLA can compile it;
* ``warp``: the geometry's one kernel, ``ImageProjectiveTransformV3`` (image and mask stacked
  on the channel axis, as the augmentation calls it), on two channels and on one;
* ``forward``: the default U-Net's forward pass (validation's work) per slice at several batch
  sizes, with XLA, and without BatchNorm (its share of the forward pass).

CPU seconds of this process (all threads), the best of five repeats. Run from the repository
root with the venv active::

    python benchmarks/bench_loop_parts.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any


def cpu_ms(fn: Callable[[], Any], calls: int, repeats: int = 5) -> float:
    """CPU milliseconds per call of ``fn`` (traced first, best of ``repeats``)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - c0) / calls * 1000)
    return best


def row(**kw: Any) -> dict[str, Any]:
    print(json.dumps(kw), flush=True)
    return kw


def main() -> int:
    import numpy as np
    import tensorflow as tf

    from liverseg.model.unet import build_unet
    from liverseg.params import load_section
    from liverseg.training import dataset

    train = load_section("train")
    size = load_section("prepare").image_size
    batch = train.batch_size
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((batch, size, size, 1), dtype=np.float32))
    masks = tf.constant((rng.random((batch, size, size, 1)) > 0.5).astype(np.float32))
    seed = tf.constant([1, 2], tf.int64)
    rows = []

    aug = train.augment
    parts = {
        "whole": aug,
        "geometry": dataclasses.replace(aug, intensity=0, blur_prob=0),
        "blur": dataclasses.replace(aug, rotate_deg=0, scale=0, intensity=0),
        "intensity": dataclasses.replace(aug, rotate_deg=0, scale=0, blur_prob=0),
    }
    for name, params in parts.items():
        for jit in (False, True):
            fn = tf.function(
                lambda p=params: dataset._augment_batch(images, masks, seed, p), jit_compile=jit
            )
            try:
                ms: float | str = round(cpu_ms(fn, 100), 3)
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as exc:
                ms = "no XLA kernel: " + str(exc).split("(")[0].split(":")[-1].strip()[:60]
            rows.append(row(part="augment", what=name, batch=batch, jit=jit, cpu_ms_per_batch=ms))
    rows.append(
        row(
            part="augment",
            what="an empty traced call",
            cpu_ms_per_batch=round(cpu_ms(tf.function(lambda: images * 1.0), 200), 3),
        )
    )

    transforms = tf.constant([[0.98, 0.1, -3.0, -0.1, 0.98, 4.0, 0.0, 0.0]] * batch)
    stacked = tf.concat([images, masks], axis=-1)
    for channels, x in (("image and mask", stacked), ("image only", images)):
        fn = tf.function(
            lambda x=x: tf.raw_ops.ImageProjectiveTransformV3(
                images=x,
                transforms=transforms,
                output_shape=[size, size],
                fill_value=0.0,
                interpolation="BILINEAR",
                fill_mode="CONSTANT",
            )
        )
        ms = cpu_ms(fn, 200)
        per_value = ms * 1e6 / (batch * size * size * int(x.shape[-1]))
        rows.append(
            row(
                part="warp",
                channels=channels,
                cpu_ms_per_batch=round(ms, 3),
                cpu_ns_per_output_value=round(per_value, 1),
            )
        )

    val = tf.constant(rng.random((128, size, size, 1), dtype=np.float32))
    for bn in (True, False):
        model = build_unet(size, dataclasses.replace(train.model, batch_norm=bn), seed=0)
        for jit in (False, True) if bn else (False,):
            forward = tf.function(lambda a, m=model: m(a, training=False), jit_compile=jit)
            for b in (8, 32, 64, 128) if bn and not jit else (32,):
                ms = cpu_ms(lambda b=b, f=forward: f(val[:b]), max(2, 256 // b))
                rows.append(
                    row(
                        part="forward",
                        batch_norm=bn,
                        jit=jit,
                        batch=b,
                        cpu_ms_per_slice=round(ms / b, 3),
                    )
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
