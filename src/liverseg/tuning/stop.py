"""SIGINT/SIGTERM during a study: a stop that waits until Optuna and MLflow are consistent."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

from liverseg import runguard


class StopSignal:
    """Turns SIGINT/SIGTERM into a ``KeyboardInterrupt`` only where that is safe.

    A ``KeyboardInterrupt`` raised inside Optuna's or MLflow's bookkeeping (asking for a
    trial, telling its result, ending its run) would leave a trial or a run RUNNING for good.
    So inside :meth:`critical` sections a signal only sets :attr:`requested`; it is raised
    as ``KeyboardInterrupt`` on entering or returning to an :meth:`interruptible` section
    (e.g. the training of a trial, where the objective records the trial FAIL and its run
    KILLED). :func:`liverseg.tuning.study.optimize` and, for trials in its own process,
    :func:`liverseg.tuning.generations.optimize_in_generations` are critical except for the
    objective's training; both raise a requested stop instead of starting another trial.

    A signal that lands in TensorFlow's or the tracking store's code is deferred and sent
    again until it lands outside (:func:`liverseg.runguard.retry_outside_tensorflow`).
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum = int(signal.SIGINT)
        self._interruptible = True

    def handler(self, signum: int, frame: Any) -> None:
        if not self.requested:
            self.signum = signum
            runguard.note_interrupt()
        self.requested = True
        if self._interruptible and not runguard.retry_outside_tensorflow(signum, frame):
            raise runguard.Interrupted(signum)

    def raise_if_requested(self) -> None:
        if self.requested:
            runguard.forget_pending()
            raise runguard.Interrupted(self.signum)

    @contextlib.contextmanager
    def _mode(self, interruptible: bool) -> Iterator[None]:
        previous = self._interruptible
        self._interruptible = interruptible
        try:
            if interruptible:
                self.raise_if_requested()
            yield
        finally:
            self._interruptible = previous
        if previous:
            self.raise_if_requested()

    def interruptible(self) -> contextlib.AbstractContextManager[None]:
        """A section that a signal may interrupt at once."""
        return self._mode(True)

    def critical(self) -> contextlib.AbstractContextManager[None]:
        """A section that a signal must not interrupt; a stop waits for its end."""
        return self._mode(False)

    @contextlib.contextmanager
    def installed(
        self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
    ) -> Iterator[None]:
        """Handle ``signals`` with :meth:`handler` (main thread only), restored on exit."""
        previous = {s: signal.signal(s, self.handler) for s in signals}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def section(
    stop: StopSignal | None, interruptible: bool
) -> contextlib.AbstractContextManager[None]:
    """``stop``'s interruptible or critical section; nothing without a ``stop``."""
    if stop is None:
        return contextlib.nullcontext()
    return stop.interruptible() if interruptible else stop.critical()
