"""Quality per minute of the train stage's folds: what shorter or parallel training costs.

Two experiments on the default prepared phantom (``data/prepared``, after ``dvc repro``) with
params.yaml's model, augmentation and the tuned learning rate and batch size
(``reports/tune/best_params.json``):

* ``schedule``: fold ``--fold`` trained for E epochs at a constant learning rate (what ``train``
  does) against a cosine decay to zero over fewer epochs; best validation Dice (2-D, pooled over
  the fold's validation slices) and wall/CPU seconds per configuration;
* ``parallel``: the k folds one after the other in one process (``fit`` reuses one compiled
  model, so Keras traces the training step once) against all k at once in k threads (k models,
  k traces); wall and CPU seconds. The threads seed their models concurrently, so their Dice
  figures are not the sequential ones; this measures time only.

Run from the repository root with the venv active (each experiment takes minutes on 2 cores)::

    python benchmarks/bench_quality_per_minute.py schedule --epochs 16 8:cosine 10:cosine
    python benchmarks/bench_quality_per_minute.py parallel --epochs 4
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=["schedule", "parallel"])
    p.add_argument(
        "--epochs",
        nargs="+",
        default=["16", "8:cosine", "10:cosine"],
        help="schedule: EPOCHS[:cosine] per run; parallel: one epoch count",
    )
    p.add_argument("--fold", type=int, default=0, help="schedule: the fold")
    p.add_argument("--prepared", type=Path, default=REPO / "data/prepared")
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--tuned", type=Path, default=REPO / "reports/tune/best_params.json")
    return p.parse_args(argv)


def _setup(args: argparse.Namespace) -> tuple[Any, float, int, dict[str, Any]]:
    from liverseg.data.prepared import load_splits
    from liverseg.params import TrainParams, load_section

    cfg: TrainParams = load_section("train", args.params)
    tuned = json.loads(args.tuned.read_text())
    return cfg, float(tuned["learning_rate"]), int(tuned["batch_size"]), load_splits(args.prepared)


def schedule(args: argparse.Namespace) -> None:
    import keras

    from liverseg.data.prepared import load_prepared
    from liverseg.data.splits import fold_cases
    from liverseg.training import fit as fit_module

    cfg, lr, batch, splits = _setup(args)
    train_ids, val_ids = fold_cases(splits, args.fold)
    train, val = load_prepared(args.prepared, train_ids), load_prepared(args.prepared, val_ids)
    steps = -(-int(train[0].shape[0]) // batch)
    for item in args.epochs:
        epochs_text, _, kind = item.partition(":")
        epochs = int(epochs_text)
        rate: Any = lr
        if kind == "cosine":
            rate = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps * epochs)
        # a new model per run: a compiled model's optimizer keeps its kind of learning rate
        fit_module.forget_compiled_models()
        t0, c0 = time.perf_counter(), time.process_time()
        res = fit_module.fit(
            train,
            val,
            cfg.spec,
            learning_rate=rate,
            batch_size=batch,
            epochs=epochs,
            seed=cfg.seed + args.fold,
            patience=epochs,
        )
        print(
            json.dumps(
                {
                    "fold": args.fold,
                    "epochs": epochs,
                    "schedule": kind or "constant",
                    "lr": lr,
                    "batch": batch,
                    "best_val_dice": round(res.best["val_dice"], 4),
                    "best_epoch": (res.best_epoch or 0) + 1,
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "cpu_s": round(time.process_time() - c0, 1),
                }
            ),
            flush=True,
        )


def parallel(args: argparse.Namespace) -> None:
    from liverseg.data.prepared import load_prepared
    from liverseg.data.splits import fold_cases
    from liverseg.training import fit as fit_module

    cfg, lr, batch, splits = _setup(args)
    epochs = int(args.epochs[0])
    k = len(splits["folds"])
    data = [
        tuple(load_prepared(args.prepared, ids) for ids in fold_cases(splits, f)) for f in range(k)
    ]

    def one(fold: int, spe: int | None) -> None:
        fit_module.fit(
            *data[fold],
            cfg.spec,
            learning_rate=lr,
            batch_size=batch,
            epochs=epochs,
            seed=cfg.seed + fold,
            steps_per_execution=spe,
        )

    for mode in ("sequential", "threads"):
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "sequential":
            for f in range(k):
                one(f, None)
        else:
            # distinct steps_per_execution bounds: one compiled model per thread, not shared
            threads = [
                threading.Thread(target=one, args=(f, fit_module.ONE_EXECUTION_PER_EPOCH + 1 + f))
                for f in range(k)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        print(
            json.dumps(
                {
                    "mode": mode,
                    "folds": k,
                    "epochs": epochs,
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "cpu_s": round(time.process_time() - c0, 1),
                }
            ),
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    schedule(args) if args.experiment == "schedule" else parallel(args)


if __name__ == "__main__":
    main()
