"""Worker processes for the training of folds and tuning trials on one machine.

The default U-Net is narrow: one single-threaded process per core keeps every core busier than
TensorFlow's threads in one process (``benchmarks/bench_train.py``). Processes share nothing but
the MLflow and Optuna stores. :class:`Pool` spawns them once (a fork would copy TensorFlow's
threads' state); a worker is a loop over the items (fold or trial numbers) it is sent.

Faults: a stop of the stage is seen while it waits for its workers; it sends each SIGTERM,
which the worker takes at its next stop point (its MLflow runs end KILLED), and raises once
they have exited. A worker whose stage is killed gets SIGTERM from the kernel (Linux). A
worker's error ends only its own item, with the CLI's one-line message (a bug: its traceback).
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

from liverseg import runguard, show_progress, stop
from liverseg.errors import error_line

WORKER_STOP_TIMEOUT_S = 60  # a stopped worker first ends its trial or fold and MLflow runs
WORKER_NAME = b"liverseg-worker"  # in ps and top (at most 15 bytes)


def processes_for(setting: str | int, items: int) -> int:
    """Processes for ``items`` independent trainings: ``setting`` as an integer, or ``auto``:
    1 on a GPU; else one per item, or one per core when there are at least two items per core
    (a process then reuses its compiled model: Keras traces once per process, not per item)."""
    if setting != "auto":
        return int(setting)
    from liverseg.tracking import tensorflow_distribution

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


def _worker(
    target: Callable[[Any, int], Any], payload: Any, threads: int, progress: bool, conn: Connection
) -> None:
    """``target(payload, item)`` for each item the stage sends, each result (or its error) sent
    back, until the stage closes its end; exit status 0, or 128 + signal after a stop."""
    try:  # Linux: named WORKER_NAME (prctl PR_SET_NAME), SIGTERM when the parent dies (PDEATHSIG)
        libc = ctypes.CDLL(None)
        libc.prctl(15, ctypes.c_char_p(WORKER_NAME))
        libc.prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    stop.install()
    try:
        if progress:
            show_progress()
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        while True:
            stop.check()
            try:
                item = conn.recv()
            except EOFError:  # the stage has no more items
                return
            try:
                result = ("done", item, target(payload, item))
            except Exception as exc:
                text = error_line(exc) or "".join(traceback.format_exception(exc)).strip()
                result = ("error", item, text)
            try:
                conn.send(result)
            except OSError:  # the stage has gone (it stops this worker with SIGTERM too)
                stop.check()
                return
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, stop.Interrupted) else signal.SIGINT
        stop.request(signum)
        runguard.end_own_runs("KILLED")
        sys.exit(128 + signum)


class Pool:
    """``min(processes, max_items)`` worker processes of ``threads`` CPU threads each, that run
    ``target(payload, item)`` (module-level, picklable payload); they log progress when this
    process does. Leaving the context ends them (with SIGTERM after an exception)."""

    def __init__(
        self,
        target: Callable[[Any, int], Any],
        payload: Any,
        processes: int,
        threads: int,
        max_items: int,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        progress = bool(logging.getLogger("liverseg").handlers)
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        for _ in range(max(1, min(processes, max_items))):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(target, payload, threads, progress, theirs))
            p.start()
            theirs.close()
            self.procs.append(p)
            self.conns.append(mine)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(terminate=kind is not None)

    def run(self, items: list[int]) -> tuple[dict[int, Any], dict[int, str]]:
        """Item ``i`` goes to worker ``i % n``; returns (results by item, error message by
        item; a worker that died names its exit). A stop asked meanwhile stops the workers
        and is raised."""
        owner: dict[Connection, list[int]] = {c: [] for c in self.conns}
        for i, item in enumerate(items):
            conn = self.conns[i % len(self.conns)]
            conn.send(item)
            owner[conn].append(item)
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        waiting = [c for c, mine in owner.items() if mine]
        while waiting:
            if stop.requested() is not None:
                self.close(terminate=True)
                stop.check()
            for ready in wait(waiting, timeout=0.2):
                conn = cast(Connection, ready)  # wait() returns what it was given
                try:
                    kind, item, value = conn.recv()
                except EOFError:  # the worker has exited
                    waiting.remove(conn)
                    continue
                (results if kind == "done" else errors)[item] = value
                if all(i in results or i in errors for i in owner[conn]):
                    waiting.remove(conn)
        for p, conn in zip(self.procs, self.conns, strict=True):
            missing = [i for i in owner[conn] if i not in results and i not in errors]
            if missing:
                p.join()
                how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit status {p.exitcode}"
                errors[missing[0]] = f"its worker process {p.pid} ended with {how}"
        return results, {k: str(v) for k, v in errors.items()}

    def close(self, terminate: bool = False) -> None:
        """End the workers: idle ones exit when their pipe closes; ``terminate`` sends SIGTERM."""
        for conn in self.conns:
            conn.close()
        for p in self.procs:
            if terminate and p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(WORKER_STOP_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join()
