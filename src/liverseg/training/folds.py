"""One cross-validation fold as an MLflow run, trained in this process or in worker processes.

:func:`train_fold` trains fold ``k`` and records it as the child run ``fold-k`` of the ``cv``
run (per-epoch metrics, ``fold.json``, the model). :func:`run_folds` trains the folds still to
do: one after the other in this process (``train.parallel_folds: 1``, TensorFlow's own thread
count), or all at once in worker processes, each with ``max(1, cores // processes)`` CPU
threads (``auto``: one process per fold without a GPU, on one on a GPU).

Why processes: the default U-Net is narrow, so TensorFlow's second thread adds little to one
training process (its ops are too small to split well), while two processes keep two cores
busy (measured in ``benchmarks/bench_train.py``, figures in benchmarks/README.md). Threads of
one process would share Python's lock and Keras' global state; processes share nothing but
the MLflow store, through which the ``cv`` run's process collects each fold's run and model.

What a fold computes depends on its thread count (the order of floating-point sums), not on
which process trains it or when, so a configuration gives the same models on every run; and
the finished fold runs of an interrupted ``train`` are reused as before
(:mod:`liverseg.training.resume`). Faults: a worker that fails ends its fold run FAILED and
the ``train`` fails naming the fold; an interrupt (SIGINT/SIGTERM) stops every worker, whose
fold runs end KILLED; a worker whose parent is killed gets SIGTERM (Linux) and does the same.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from liverseg.data.splits import fold_cases, load_splits
from liverseg.errors import LiversegError
from liverseg.params import TrainParams
from liverseg.training.fit import MlflowEpochLogger, fit

WORKER_STOP_TIMEOUT_S = 60  # a stopped worker first ends its fold run KILLED


class FoldError(LiversegError):
    """A fold's worker process failed (the message names the fold and the cause)."""


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
    what: str  # the model in words, for the run description
    k: int


@dataclass
class FoldOutcome:
    run_id: str
    row: dict[str, Any]
    history: dict[str, list[float]]
    model: Any  # keras.Model, or None when the final model does not need it


def log_keras_model(model: Any) -> None:
    """Log ``model`` as the active run's MLflow Keras model ``model`` with its signature."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from liverseg.training.tracking import tensorflow_distribution

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
    import mlflow

    from liverseg.training import resume
    from liverseg.training.dataset import load_prepared
    from liverseg.training.tracking import log_dataset

    cfg = job.cfg
    train_ids, val_ids = fold_cases(load_splits(job.prepared), fold)
    key = resume.fold_key(job.tags.get("data_sha256", ""), job.params, fold, train_ids, val_ids)
    train = load_prepared(job.prepared, train_ids)
    val = load_prepared(job.prepared, val_ids)
    with mlflow.start_run(
        experiment_id=job.experiment_id,
        run_name=f"fold-{fold}",
        parent_run_id=job.parent_run_id,
        nested=True,
        tags=job.tags,
        description=(
            f"Fold {fold} of {job.k}: trained on patients {', '.join(train_ids)}, "
            f"validated on {', '.join(val_ids)}; {job.what}."
        ),
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
                resume.FOLD_KEY_TAG: key,
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
        mlflow.log_metrics(
            {
                "best_val_dice": row["best_val_dice"],
                "best_val_iou": row["best_val_iou"],
                "best_epoch": row["best_epoch"],
                "train_seconds": res.seconds,
            }
        )
        log_keras_model(res.model)
        resume.save_fold(row, res.history)
    print(
        f"train: fold {fold}: best val Dice {row['best_val_dice']:.4f} at epoch "
        f"{row['best_epoch']} ({res.seconds:.0f} s, val {','.join(val_ids)})",
        flush=True,
    )
    return FoldOutcome(run.info.run_id, row, res.history, res.model)


# ------------------------------------------------------------------------------ worker processes
def fold_processes(setting: str | int, k: int) -> int:
    """How many processes train folds at once: ``train.parallel_folds`` (``auto``: ``k`` on a
    CPU, 1 when TensorFlow sees a GPU: one process holds it)."""
    if setting != "auto":
        return int(setting)
    import tensorflow as tf

    return 1 if tf.config.list_physical_devices("GPU") else k


def threads_per_process(processes: int) -> int:
    """CPU threads of each fold process: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // processes)


WORKER_NAME = b"liverseg-fold"  # the worker's name in ps and top (at most 15 bytes)


def _name_and_tie_to_parent() -> None:
    """Linux: name this process :data:`WORKER_NAME` and have the kernel send it SIGTERM when
    its parent dies (so a killed stage leaves no orphan training). Elsewhere: nothing."""
    pr_set_pdeathsig, pr_set_name = 1, 15
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(pr_set_name, ctypes.c_char_p(WORKER_NAME))
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _worker(job: FoldJob, folds: list[int], threads: int, progress: bool, conn: Connection) -> None:
    """A worker process: train ``folds`` one after the other, send each outcome (no model: the
    parent loads it from the fold run) and end with exit status 0, 128 + signal or 1."""
    _name_and_tie_to_parent()
    from liverseg import runguard

    previous = runguard.install()
    try:
        if progress:
            from liverseg.cli import show_progress

            show_progress()
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        from liverseg.training.setup import keras_session

        keras_session(job.cfg.precision, job.cfg.seed)
        fold = folds[0]
        for fold in folds:
            out = train_fold(job, fold)
            conn.send(("done", fold, out.run_id, out.row, out.history))
    except KeyboardInterrupt as exc:
        runguard.hold()
        runguard.end_own_runs("KILLED")
        signum = exc.signum if isinstance(exc, runguard.Interrupted) else signal.SIGINT
        sys.exit(128 + signum)
    except BaseException as exc:  # the fold's ``with`` block has ended its run FAILED
        from liverseg.cli import error_line

        message = error_line(exc) if isinstance(exc, Exception) else None
        conn.send(("error", fold, message or "".join(traceback.format_exception(exc)).strip()))
        sys.exit(1)
    finally:
        runguard.restore(previous)


def _load_fold_model(run_id: str) -> Any:
    import mlflow

    from liverseg.model.keras_metrics import CUSTOM_OBJECTS

    return mlflow.keras.load_model(
        f"runs:/{run_id}/model",
        custom_objects=CUSTOM_OBJECTS,
        load_model_kwargs={"compile": False},
    )


def _stop(procs: list[multiprocessing.process.BaseProcess]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: the worker ends its fold run KILLED
    for p in procs:
        p.join(WORKER_STOP_TIMEOUT_S)
        if p.is_alive():
            p.kill()
            p.join()


def run_folds(job: FoldJob, folds: list[int], processes: int) -> dict[int, FoldOutcome]:
    """Train ``folds``: in this process when ``processes`` is 1, else in ``min(processes,
    len(folds))`` worker processes (fold ``i`` of the list goes to worker ``i % n``)."""
    load_model = job.cfg.final == "ensemble"
    if processes <= 1 or not folds:
        outcomes = {}
        for fold in folds:
            out = train_fold(job, fold)
            if not load_model:
                import keras

                out.model = None
                keras.backend.clear_session(free_memory=True)
            outcomes[fold] = out
        return outcomes

    n = min(processes, len(folds))
    threads = threads_per_process(processes)
    progress = bool(logging.getLogger("liverseg").handlers)
    ctx = multiprocessing.get_context("spawn")  # not fork: TensorFlow's threads do not survive it
    procs, conns, owner = [], [], {}
    results: dict[int, tuple[str, dict[str, Any], dict[str, list[float]]]] = {}
    errors: dict[int, str] = {}
    try:
        for i in range(n):
            mine = folds[i::n]
            parent_end, child_end = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_worker,
                args=(job, mine, threads, progress, child_end),
            )
            p.start()
            child_end.close()
            procs.append(p)
            conns.append(parent_end)
            owner[parent_end] = mine
        print(
            f"train: folds {', '.join(map(str, folds))} in {n} processes of {threads} CPU "
            f"thread(s) each (train.parallel_folds: {job.cfg.parallel_folds})",
            flush=True,
        )
        open_conns = list(conns)
        while open_conns:
            for conn in wait(open_conns):
                try:
                    msg = conn.recv()
                except EOFError:  # the worker has exited
                    open_conns.remove(conn)
                    continue
                if msg[0] == "done":
                    _, fold, run_id, row, history = msg
                    results[fold] = (run_id, row, history)
                else:
                    errors[msg[1]] = msg[2]
        for p in procs:
            p.join()
    except BaseException:
        _stop(procs)
        raise
    for p, conn in zip(procs, conns, strict=True):
        missing = [f for f in owner[conn] if f not in results]
        missing = [f for f in missing if f not in errors]
        if p.exitcode and missing:
            how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit status {p.exitcode}"
            errors[missing[0]] = f"its worker process {p.pid} ended with {how}"
    if errors:
        raise FoldError("; ".join(f"fold {fold}: {text}" for fold, text in sorted(errors.items())))
    return {
        fold: FoldOutcome(run_id, row, history, _load_fold_model(run_id) if load_model else None)
        for fold, (run_id, row, history) in sorted(results.items())
    }
