"""Batch normalisation and Adam kernels, and processes against threads: the bare training loop
of the default U-Net (depth 4, base 8, 96x96, batch 4: the tuned batch) on 208 cached slices.

Rows, each timed in fresh processes one after the other (the fastest of ``--epochs`` epochs
after an untimed first one):

* Keras' ``BatchNormalization`` (moments and element-wise ops) against liverseg's
  ``FusedBatchNorm`` (TensorFlow's fused kernel), in one process with TensorFlow's threads;
* Keras' ``Adam`` against liverseg's ``FusedAdam`` (TensorFlow's fused kernel), in one process
  of one thread, with the CPU seconds of the first epoch (tracing) beside the per-epoch figure;
* ``FusedBatchNorm`` and ``FusedAdam`` in N processes of one thread each running at once
  (``--processes``, default: the machine's cores): seconds per epoch of each process, and the
  throughput in epochs per second of all of them together.

Run from the repository root with the venv active::

    python benchmarks/bench_processes.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def one(bn: str, opt: str, threads: int | None, epochs: int) -> dict[str, float]:
    """Time the bare loop in this process."""
    import numpy as np
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras

    from liverseg.model import unet
    from liverseg.model.optimizers import FusedAdam
    from liverseg.params import ModelParams

    if bn == "keras":
        unet.FusedBatchNorm = keras.layers.BatchNormalization  # type: ignore[misc]
    keras.utils.set_random_seed(0)
    model = unet.build_unet(96, ModelParams(depth=4, base_filters=8, dropout=0.1), seed=0)
    optimizer = FusedAdam(1e-3) if opt == "fused" else keras.optimizers.Adam(1e-3)
    model.compile(optimizer=optimizer, loss="binary_crossentropy",
                  steps_per_execution=1 << 20)  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.random((208, 96, 96, 1), dtype=np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, (x > 0.5).astype(np.float32))).batch(4).cache()
    cpu = time.process_time()
    model.fit(ds, epochs=1, verbose=0)
    first_cpu = time.process_time() - cpu
    best = float("inf")
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.fit(ds, epochs=1, verbose=0)
        best = min(best, time.perf_counter() - t0)
    return {"s_per_epoch": best, "first_epoch_cpu_s": first_cpu}


def spawn(bn: str, opt: str, threads: int | None, epochs: int, n: int) -> list[dict[str, float]]:
    """``n`` processes at once, each timing the loop; their results."""
    cmd = [sys.executable, __file__, "--child", bn, opt, str(threads or 0), str(epochs)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        for _ in range(n)
    ]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        bn, opt, threads, epochs = args.child
        print(json.dumps(one(bn, opt, int(threads) or None, int(epochs))))
        return
    rows = [
        ("Keras BatchNormalization, Keras Adam, 1 process, TensorFlow's threads", "keras",
         "keras", None, 1),
        ("FusedBatchNorm, Keras Adam, 1 process, TensorFlow's threads", "fused", "keras", None, 1),
        ("Keras BatchNormalization, Keras Adam, 1 process of 1 thread", "keras", "keras", 1, 1),
        ("FusedBatchNorm, Keras Adam, 1 process of 1 thread", "fused", "keras", 1, 1),
        ("FusedBatchNorm, FusedAdam, 1 process of 1 thread", "fused", "fused", 1, 1),
        (f"FusedBatchNorm, FusedAdam, {args.processes} processes of 1 thread at once", "fused",
         "fused", 1, args.processes),
    ]  # fmt: skip
    print(f"cores: {os.cpu_count()}; 208 slices 96x96, batch 4; fastest of {args.epochs} epochs")
    print("| variant | s/epoch per process | epochs/s, all processes | first epoch, CPU s |")
    print("|---|---|---|---|")
    for label, bn, opt, threads, n in rows:
        res = spawn(bn, opt, threads, args.epochs, n)
        per = [r["s_per_epoch"] for r in res]
        first = [r["first_epoch_cpu_s"] for r in res]
        print(
            f"| {label} | {', '.join(f'{s:.2f}' for s in per)} | {sum(1 / s for s in per):.2f} "
            f"| {', '.join(f'{s:.1f}' for s in first)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
