"""Worker processes for the training of folds and tuning trials on one machine.

The default U-Net is narrow: TensorFlow's second thread adds little to one training process
(its ops are too small to split well), while one single-threaded process per core keeps every
core busy (``benchmarks/bench_train.py``; figures in benchmarks/README.md). Processes, not
threads: they share nothing but the MLflow and Optuna stores, through which the stage's
process collects what they did.

:func:`run_workers` spreads ``items`` (fold or trial numbers) over worker processes started
with ``spawn`` (a fork would copy TensorFlow's threads' state), each with ``threads`` CPU
threads, and returns what ``target(payload, item)`` returned for each item, or the error of
the items that failed. Faults: an interrupt (SIGINT/SIGTERM) of the stage stops every worker
with SIGTERM, which each turns into a ``KeyboardInterrupt`` (its MLflow runs end KILLED, see
:mod:`liverseg.runguard`); a worker whose stage is killed gets SIGTERM from the kernel (Linux)
and does the same; a worker's error ends only its own item, with the one-line message the
CLI would print (a bug keeps its traceback).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any, cast

WORKER_STOP_TIMEOUT_S = 60  # a stopped worker first ends its trial or fold and MLflow runs
WORKER_NAME = b"liverseg-worker"  # the workers' name in ps and top (at most 15 bytes)


def processes_for(setting: str | int, items: int) -> int:
    """Processes for ``items`` independent trainings: ``setting`` as an integer, or ``auto``:
    1 when TensorFlow sees a GPU (one process holds it); else one per item, or one per core
    when there are at least two items per core (each process then trains several items with
    one compiled model: Keras traces its training step once per process, not per item)."""
    if setting != "auto":
        return int(setting)
    from liverseg.training.tracking import tensorflow_distribution

    # tensorflow-cpu sees no GPU: no need to import TensorFlow (seconds) to ask it.
    if tensorflow_distribution() != "tensorflow-cpu":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return 1
    cores = os.cpu_count() or 1
    return items if items < 2 * cores else cores


def threads_per_process(processes: int) -> int:
    """CPU threads of each worker: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // processes)


def _name_and_tie_to_parent() -> None:
    """Linux: name this process :data:`WORKER_NAME` and have the kernel send it SIGTERM when
    its parent dies (a killed stage leaves no orphan training). Elsewhere: nothing."""
    pr_set_pdeathsig, pr_set_name = 1, 15
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(pr_set_name, ctypes.c_char_p(WORKER_NAME))
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _entry(
    target: Callable[[Any, int], Any],
    payload: Any,
    items: list[int],
    threads: int,
    progress: bool,
    conn: Connection,
) -> None:
    """A worker: ``target(payload, item)`` for each of ``items`` in turn, each result (or the
    error) sent to the stage; exit status 0, 1 after an error or 128 + signal."""
    _name_and_tie_to_parent()
    from liverseg import runguard

    previous = runguard.install()
    item = items[0]
    try:
        if progress:
            from liverseg.cli import show_progress

            show_progress()
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        for item in items:
            conn.send(("done", item, target(payload, item)))
        conn.close()
        # the stage waits for this exit: no interpreter teardown (seconds with TensorFlow)
        runguard.exit_without_teardown(0)
    except KeyboardInterrupt as exc:
        runguard.hold()
        runguard.end_own_runs("KILLED")
        signum = exc.signum if isinstance(exc, runguard.Interrupted) else signal.SIGINT
        sys.exit(128 + signum)
    except BaseException as exc:
        from liverseg.cli import error_line

        message = error_line(exc) if isinstance(exc, Exception) else None
        conn.send(("error", item, message or "".join(traceback.format_exception(exc)).strip()))
        conn.close()
        runguard.exit_without_teardown(1)
    finally:
        runguard.restore(previous)


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: the worker ends its MLflow runs KILLED
    for p in procs:
        p.join(WORKER_STOP_TIMEOUT_S)
        if p.is_alive():
            p.kill()
            p.join()


def run_workers(
    target: Callable[[Any, int], Any],
    payload: Any,
    items: list[int],
    processes: int,
    threads: int,
) -> tuple[dict[int, Any], dict[int, str]]:
    """Run ``target(payload, item)`` for every item in ``min(processes, len(items))`` worker
    processes of ``threads`` CPU threads (item ``i`` of the list goes to worker ``i % n``).

    ``target`` must be a module-level function and ``payload`` picklable. Returns (results by
    item, error message by item); an item whose worker died without a word gets a message
    naming the worker's exit. The workers print progress when this process' ``liverseg``
    logger does (the CLI's)."""
    n = min(processes, len(items))
    progress = bool(logging.getLogger("liverseg").handlers)
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    owner: dict[Connection, list[int]] = {}
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for i in range(n):
            mine = items[i::n]
            parent_end, child_end = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_entry, args=(target, payload, mine, threads, progress, child_end)
            )
            p.start()
            child_end.close()
            procs.append(p)
            owner[parent_end] = mine
        open_conns: list[Connection] = list(owner)
        while open_conns:
            for ready in wait(open_conns):
                conn = cast(Connection, ready)  # wait() returns what it was given
                try:
                    kind, item, value = conn.recv()
                except EOFError:  # the worker has exited
                    open_conns.remove(conn)
                    continue
                if kind == "done":
                    results[item] = value
                else:
                    errors[item] = str(value)
        for p in procs:
            p.join()
    except BaseException:
        _stop(procs)
        raise
    for p, mine in zip(procs, owner.values(), strict=True):
        missing = [i for i in mine if i not in results and i not in errors]
        if p.exitcode and missing:
            how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit status {p.exitcode}"
            errors[missing[0]] = f"its worker process {p.pid} ended with {how}"
    return results, errors
