"""Training speed: the project's loop against a bare loop and the FLOP floor.

For each model configuration, seconds per epoch and slices per second of

* ``project``: :func:`liverseg.training.fit.fit` as the ``train`` stage runs it (augmentation,
  validation every epoch on every ``train.val_stride``-th validation slice, early stopping,
  per-epoch MLflow logging to a throwaway SQLite store);
* ``bare``: the same compiled model in Keras' loop over pre-batched tensors cached in memory,
  one execution per epoch, no augmentation, validation, callbacks or logging;
* ``floor``: the training FLOPs (3 x the forward convolutions' FLOPs per slice, backward being
  about twice forward) at the conv throughput measured in this run (a 3x3, 64-channel conv).

so each row shows the loop's overhead (project / bare) and the fraction of peak (floor / time).
Times are wall seconds and CPU seconds of this process: on a machine shared with other jobs,
compare CPU seconds (they hardly depend on the others' load), not wall seconds.
Configurations: ``default`` (params.yaml's train section on the default phantom, fold 0, at
``prepare.image_size``) and ``gpu`` (the GPU profile of docs/gpu.md: base 32, depth 5, batch 16, on
phantom slices prepared at 256x256; ``--gpu-slices`` of them, time per epoch scales with the
slice count, see ``--growth``; a quarter as many validation slices, the share of the profile's
5 folds, each validating on the patients of one fold and training on four). The first epoch
(tracing) is not timed; the fastest of the others is reported (the machine may be shared: the
minimum is the least disturbed figure).

``--levers`` times the project loop on the default configuration with one thing changed at
a time (steps per execution, MLflow logging, validation, augmentation, jit_compile,
mixed_bfloat16). Thread settings apply to the whole process: run it again with ``--threads``.
``--growth`` times the bare loop against slice count, image size and width. ``--input`` times
the training input pipeline alone (:func:`liverseg.training.dataset.make_dataset` as ``fit``
builds it, augmentation included) on random slices at 96 and 256 pixels: on a GPU it must
deliver more slices per second than the model trains.

Run from the repository root with the venv active::

    python benchmarks/bench_train.py --levers --growth
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# prepare.k_folds of docs/gpu.md's GPU profile (dvc exp run -n ircad-gpu): validation slices are
# a quarter of the training slices there
GPU_PROFILE_K_FOLDS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", default=["default", "gpu"], choices=["default", "gpu"])
    p.add_argument("--epochs", type=int, default=4, help="timed epochs (after one untimed)")
    p.add_argument("--gpu-slices", type=int, default=32, help="training slices for gpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    p.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16"])
    p.add_argument("--threads", default=None, help="INTRA,INTER op threads (default: TF's)")
    p.add_argument("--levers", action="store_true", help="one change at a time (default cfg)")
    p.add_argument("--growth", action="store_true", help="bare loop vs slices, size, width")
    p.add_argument("--input", action="store_true", help="the input pipeline alone")
    p.add_argument("--input-slices", type=int, default=1000, help="slices for --input")
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- data
def phantom_fold(work: Path, image_size: int, params_path: Path) -> tuple[Any, Any]:
    """Fold 0's (train, val) arrays of the default phantom prepared at ``image_size``."""
    from liverseg.data.phantom import write_phantom
    from liverseg.data.prepared import load_prepared
    from liverseg.data.splits import fold_cases
    from liverseg.params import load_section
    from liverseg.stages.prepare import prepare

    ingest = load_section("ingest", params_path)
    prep = dataclasses.replace(load_section("prepare", params_path), image_size=image_size)
    raw = work / "raw"
    if not raw.exists():
        write_phantom(raw, ingest.phantom)
    out = work / f"prepared-{image_size}"
    if not out.exists():
        prepare(raw, out, prep)
    splits = json.loads((out / "splits.json").read_text())
    train_ids, val_ids = fold_cases(splits, 0)
    return load_prepared(out, train_ids), load_prepared(out, val_ids)


# -------------------------------------------------------------------------------- timing
def epoch_timer() -> Any:
    """A callback recording each epoch's wall and CPU time (this process, all threads) from
    one epoch's start to the next's."""
    import keras

    class Timer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.starts: list[tuple[float, float]] = []
            self.end = (0.0, 0.0)

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.starts.append((time.perf_counter(), time.process_time()))

        def on_train_end(self, logs: Any = None) -> None:
            self.end = (time.perf_counter(), time.process_time())

        def times(self) -> dict[str, float]:
            """First epoch (tracing included) and the fastest later one, in wall and CPU
            seconds. On a machine shared with other jobs the wall minimum is the figure
            least disturbed by them, and CPU seconds hardly depend on them at all."""
            edges = [*self.starts, self.end]
            wall = [b[0] - a[0] for a, b in zip(edges[:-1], edges[1:], strict=True)]
            cpu = [b[1] - a[1] for a, b in zip(edges[:-1], edges[1:], strict=True)]
            later = slice(1, None) if len(wall) > 1 else slice(None)
            return {
                "first_wall": wall[0],
                "first_cpu": cpu[0],
                "wall": min(wall[later]),
                "cpu": statistics.median(cpu[later]),
            }

    return Timer()


def conv_gflops(precision: str, repeat: int = 5) -> float:
    """Throughput (GFLOP/s) of a 3x3, 64 -> 64 channel conv on 8 x 64 x 64 maps."""
    import tensorflow as tf

    dtype = tf.bfloat16 if precision == "mixed_bfloat16" else tf.float32
    x = tf.cast(tf.random.normal((8, 64, 64, 64)), dtype)
    k = tf.cast(tf.random.normal((3, 3, 64, 64)), dtype)
    conv = tf.function(lambda x: tf.reduce_sum(tf.cast(tf.nn.conv2d(x, k, 1, "SAME"), tf.float32)))
    conv(x).numpy()
    flops = 2.0 * 8 * 64 * 64 * 3 * 3 * 64 * 64
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(10):
            conv(x)
        conv(x).numpy()
        best = min(best, (time.perf_counter() - t0) / 11)
    return flops / best / 1e9


def spec_now(cfg: Any) -> Any:
    """``cfg.spec`` at the precision this benchmark set as Keras' global policy."""
    import keras

    return dataclasses.replace(cfg.spec, precision=keras.mixed_precision.global_policy().name)


def bare_seconds(train: Any, cfg: Any, batch_size: int, epochs: int) -> dict[str, float]:
    """Epoch times (see ``Timer.times``) of the bare loop: the compiled model on cached
    batches, nothing else."""
    import keras
    import tensorflow as tf

    from liverseg.training.fit import compile_unet

    steps = math.ceil(train[0].shape[0] / batch_size)
    model = compile_unet(train[0].shape[1], spec_now(cfg), 1e-3, 0, steps_per_execution=steps)
    ds = tf.data.Dataset.from_tensor_slices(train).batch(batch_size).cache()
    timer = epoch_timer()
    model.fit(ds, epochs=epochs + 1, callbacks=[timer], verbose=0, shuffle=False)
    keras.backend.clear_session(free_memory=True)
    return dict(timer.times())


def project_seconds(
    train: Any, val: Any, cfg: Any, batch_size: int, epochs: int, **fit_kwargs: Any
) -> dict[str, float]:
    """Epoch times (see ``Timer.times``) of :func:`liverseg.training.fit.fit` as ``train``
    runs it."""
    import keras
    import mlflow

    from liverseg.training.fit import MlflowEpochLogger, fit

    synchronous = fit_kwargs.pop("synchronous_logging", False)
    fit_kwargs.setdefault("val_stride", cfg.val_stride)
    policy = keras.mixed_precision.global_policy()
    if "precision" in fit_kwargs:
        keras.mixed_precision.set_global_policy(fit_kwargs.pop("precision"))
    timer = epoch_timer()
    with mlflow.start_run() as run:
        fit(
            train,
            val,
            spec_now(cfg),
            learning_rate=1e-3,
            batch_size=batch_size,
            epochs=epochs + 1,
            seed=0,
            patience=epochs + 1,
            distribute=cfg.distribute,
            callbacks=[timer, MlflowEpochLogger(run.info.run_id, synchronous=synchronous)],
            **fit_kwargs,
        )
    keras.mixed_precision.set_global_policy(policy)
    keras.backend.clear_session(free_memory=True)
    return dict(timer.times())


def train_gflop_per_slice(cfg: Any, image_size: int) -> float:
    """3 x forward conv GFLOP of one slice (forward + backward)."""
    from liverseg.model.unet import build_unet, count_flops

    return 3.0 * count_flops(build_unet(image_size, cfg.model), image_size) / 1e9


# ---------------------------------------------------------------------------------- tables
def configs(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from liverseg.params import ModelParams, load_section

    train_cfg = load_section("train", args.params)
    size = load_section("prepare", args.params).image_size
    out = []
    if "default" in args.configs:
        tr, va = phantom_fold(work, size, args.params)
        batch = args.batch_size or train_cfg.batch_size
        out.append({"name": "default", "cfg": train_cfg, "train": tr, "val": va, "batch": batch})
    if "gpu" in args.configs:
        tr, va = phantom_fold(work, 256, args.params)
        n = min(args.gpu_slices, tr[0].shape[0])
        nv = min(max(n // (GPU_PROFILE_K_FOLDS - 1), 1), va[0].shape[0])
        gpu_cfg = dataclasses.replace(
            train_cfg,
            model=ModelParams(depth=5, base_filters=32, dropout=0.1, batch_norm=True),
            precision=args.precision,
        )
        out.append(
            {
                "name": "gpu",
                "cfg": gpu_cfg,
                "train": (tr[0][:n], tr[1][:n]),
                "val": (va[0][:nv], va[1][:nv]),
                "batch": 16,
            }
        )
    return out


def main_table(args: argparse.Namespace, work: Path, peak: float) -> list[dict[str, Any]]:
    rows = []
    for c in configs(args, work):
        n = int(c["train"][0].shape[0])
        size = int(c["train"][0].shape[1])
        project = project_seconds(c["train"], c["val"], c["cfg"], c["batch"], args.epochs)
        bare = bare_seconds(c["train"], c["cfg"], c["batch"], args.epochs)
        gflop = train_gflop_per_slice(c["cfg"], size)
        floor = n * gflop / peak
        row = {
            "config": c["name"],
            "model": f"d{c['cfg'].model.depth} f{c['cfg'].model.base_filters} {size}px",
            "train_slices": n,
            "val_slices": int(c["val"][0].shape[0]),
            "batch": c["batch"],
            "precision": args.precision,
            "project_s_per_epoch": round(project["wall"], 3),
            "project_cpu_s_per_epoch": round(project["cpu"], 3),
            "project_slices_per_s": round(n / project["wall"], 1),
            "project_first_epoch_s": round(project["first_wall"], 1),
            "bare_s_per_epoch": round(bare["wall"], 3),
            "bare_cpu_s_per_epoch": round(bare["cpu"], 3),
            "bare_slices_per_s": round(n / bare["wall"], 1),
            "floor_s_per_epoch": round(floor, 3),
            "overhead_wall": round(project["wall"] / bare["wall"], 2),
            "overhead_cpu": round(project["cpu"] / bare["cpu"], 2),
            "project_fraction_of_peak": round(floor / project["wall"], 3),
            "bare_fraction_of_peak": round(floor / bare["wall"], 3),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def levers_table(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """The project loop on the default configuration, one change at a time."""
    from liverseg.params import AugmentParams, load_section

    cfg = load_section("train", args.params)
    size = load_section("prepare", args.params).image_size
    tr, va = phantom_fold(work, size, args.params)
    batch = args.batch_size or cfg.batch_size
    no_aug = dataclasses.replace(
        cfg, augment=AugmentParams(flip=False, rotate_deg=0, scale=0, intensity=0, blur_prob=0)
    )
    variants: list[tuple[str, Any, Any, dict[str, Any]]] = [
        (
            "before: 1 step/execution, synchronous logging",
            cfg,
            va,
            {"steps_per_execution": 1, "synchronous_logging": True},
        ),
        ("now: 1 execution/epoch, asynchronous logging, validation batch 32", cfg, va, {}),
        ("now, synchronous logging", cfg, va, {"synchronous_logging": True}),
        ("now, validation on every slice (val_stride 1)", cfg, va, {"val_stride": 1}),
        ("now, no validation", cfg, None, {}),
        ("now, no augmentation", no_aug, va, {}),
        ("now, jit_compile", cfg, va, {"jit_compile": True}),
        ("now, mixed_bfloat16", cfg, va, {"precision": "mixed_bfloat16"}),
    ]
    rows = []
    bare = bare_seconds(tr, cfg, batch, args.epochs)
    for name, c, v, kw in variants:
        t = project_seconds(tr, v, c, batch, args.epochs, **kw)
        row = {
            "variant": name,
            "s_per_epoch": round(t["wall"], 3),
            "cpu_s_per_epoch": round(t["cpu"], 3),
            "first_epoch_cpu_s": round(t["first_cpu"], 1),
            "cpu_vs_bare": round(t["cpu"] / bare["cpu"], 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    rows.append(
        {
            "variant": "bare loop",
            "s_per_epoch": round(bare["wall"], 3),
            "cpu_s_per_epoch": round(bare["cpu"], 3),
            "first_epoch_cpu_s": round(bare["first_cpu"], 1),
            "cpu_vs_bare": 1.0,
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    return rows


def growth_table(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Bare-loop s/epoch against slices, image size and width (others at the default)."""
    from liverseg.params import load_section

    cfg = load_section("train", args.params)
    size0 = load_section("prepare", args.params).image_size
    batch = args.batch_size or cfg.batch_size
    grid: list[tuple[int, int, int]] = [(64, size0, 8), (208, size0, 8)]  # slices
    grid += [(64, s, 8) for s in (128, 192, 256)]  # image size
    grid += [(64, size0, w) for w in (16, 32)]  # width
    rows = []
    data: dict[int, Any] = {}
    for n, size, width in grid:
        if size not in data:
            data[size] = phantom_fold(work, size, args.params)[0]
        tr = data[size]
        n = min(n, tr[0].shape[0])
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base_filters=width))
        t = bare_seconds((tr[0][:n], tr[1][:n]), c, batch, max(2, args.epochs - 1))
        row = {
            "slices": n,
            "image_size": size,
            "base_filters": width,
            "depth": cfg.model.depth,
            "train_gflop_per_slice": round(train_gflop_per_slice(c, size), 3),
            "bare_s_per_epoch": round(t["wall"], 3),
            "bare_cpu_s_per_epoch": round(t["cpu"], 3),
            "cpu_ms_per_slice": round(1000 * t["cpu"] / n, 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def input_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Slices per second of the augmented training input pipeline alone, no model."""
    import numpy as np

    from liverseg.params import load_section
    from liverseg.training.dataset import make_dataset

    cfg = load_section("train", args.params)
    rows = []
    for size, batch in ((96, args.batch_size or cfg.batch_size), (256, 16)):
        rng = np.random.default_rng(0)
        images = rng.random((args.input_slices, size, size, 1), dtype=np.float32)
        masks = (images > 0.5).astype(np.float32)
        ds = make_dataset(
            images, masks, batch_size=batch, training=True, augment=cfg.augment, seed=0
        )
        times = []
        for _ in range(max(2, args.epochs) + 1):  # the first pass traces: not timed
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in ds:
                pass
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        wall = min(t[0] for t in times[1:])
        cpu = statistics.median(t[1] for t in times[1:])
        row = {
            "input_image_size": size,
            "slices": args.input_slices,
            "batch": batch,
            "s_per_epoch": round(wall, 3),
            "cpu_s_per_epoch": round(cpu, 3),
            "slices_per_s": round(args.input_slices / wall, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tensorflow as tf

    if args.threads:
        intra, inter = (int(x) for x in args.threads.split(","))
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    import keras
    import mlflow

    if args.precision != "float32":
        keras.mixed_precision.set_global_policy(args.precision)
    result: dict[str, Any] = {"argv": sys.argv[1:], "device": tf.config.list_physical_devices()}
    result["device"] = [d.name for d in result["device"]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        mlflow.set_experiment("bench-train")
        peak = conv_gflops(args.precision)
        result["conv_gflops"] = round(peak, 1)
        print(json.dumps({"conv_gflops": result["conv_gflops"]}), flush=True)
        if args.input:
            result["input"] = input_table(args)
        if args.levers:
            result["levers"] = levers_table(args, work)
        result["rows"] = main_table(args, work, peak)
        if args.growth:
            result["growth"] = growth_table(args, work)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
