"""The data stages' process pool (ingest's synthesis, prepare's cases), stoppable.

A plain ``ProcessPoolExecutor.map`` queues items ahead of its workers and finishes them all
before a stop can be seen: in ``ingest`` that was minutes after SIGTERM. Here no item waits in
a queue and the stop (:mod:`liverseg.stop`) is checked twice a second, so a stop waits only for
the items running (one per worker). They are not killed: killing a worker of a
``ProcessPoolExecutor`` can hang its shutdown (it did, in ``test_prepare_on_a_full_disk``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from itertools import islice
from typing import TypeVar

from liverseg import stop

T = TypeVar("T")
U = TypeVar("U")


def map_in_processes(
    fn: Callable[[T], U], items: Iterable[T], processes: int, each: Callable[[U], object]
) -> None:
    """``each(fn(item))`` for every item in order, ``fn`` run in ``processes`` worker processes
    with at most one item each at a time.

    A stop asked, or an item's error, ends it once the items running have ended: the items not
    started are dropped. What was written is left to the caller's
    :func:`liverseg.fsutil.atomic_dir` to remove.
    """
    todo = iter(items)
    futures: list[Future[U]] = []  # submitted, not yet handed to each, in order
    with ProcessPoolExecutor(processes) as pool:  # its exit waits for the items running
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
