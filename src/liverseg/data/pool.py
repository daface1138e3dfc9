"""The data stages' process pool (ingest's synthesis, prepare's cases), stoppable at once.

A plain ``ProcessPoolExecutor.map`` queues items ahead of its workers and finishes them all
before a stop can be seen: in ``ingest`` that was minutes after SIGTERM. Here no item waits
in a queue, the stop (:mod:`liverseg.stop`) is checked twice a second, and the workers are
killed, not waited for.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from itertools import islice
from typing import TypeVar

from liverseg import stop

T = TypeVar("T")
U = TypeVar("U")


def _killable_worker() -> None:
    """A data worker dies of SIGTERM (the pool's end after a stop) and leaves SIGINT (Ctrl+C
    reaches the whole process group) to its parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def map_in_processes(
    fn: Callable[[T], U], items: Iterable[T], processes: int, each: Callable[[U], object]
) -> None:
    """``each(fn(item))`` for every item in order, ``fn`` run in ``processes`` worker processes
    with at most one item each at a time.

    A stop asked, or an item's error, ends it within half a second: the items not started are
    dropped and the workers killed, so what they were writing is left to the caller's
    :func:`liverseg.fsutil.atomic_dir` to remove.
    """
    todo = iter(items)
    futures: list[Future[U]] = []  # submitted, not yet handed to each, in order
    pool = ProcessPoolExecutor(processes, initializer=_killable_worker)
    try:
        while True:
            stop.check()
            for f in futures:  # an item's error ends the map at once, not in its turn
                if f.done() and f.exception() is not None:
                    f.result()
            running = sum(not f.done() for f in futures)
            futures += [pool.submit(fn, x) for x in islice(todo, processes - running)]
            while futures and futures[0].done():
                each(futures.pop(0).result())
            if not futures:
                return
            wait([f for f in futures if not f.done()], 0.5, FIRST_COMPLETED)
    except BaseException:
        # the workers' items are not wanted: kill them (Python 3.14: pool.terminate_workers())
        for process in (getattr(pool, "_processes", None) or {}).values():
            process.terminate()
        raise
    finally:
        pool.shutdown(cancel_futures=True)
