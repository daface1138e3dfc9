"""Stopping on SIGINT (Ctrl+C) or SIGTERM (``timeout``, CI, ``docker stop``, Kubernetes).

The handler (:func:`install`) only records the request, so nothing is ever raised inside
TensorFlow, SQLAlchemy or the MLflow store. :func:`check` raises :class:`Interrupted` where
stopping is safe: training's Keras callback, the fold, trial and worker loops, inference's
slice batches and :func:`liverseg.fsutil.atomic_dir`. ``finally`` blocks end MLflow runs and
remove temporary outputs; the CLI ends this process's runs KILLED and exits 128 + the signal.
Standard library only: worker processes and the CLI import it before anything heavy.
"""

from __future__ import annotations

import signal
import time
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop was asked by ``signum``; ``message``: what is kept and how to go on."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"signal {signum}")
        self.signum = int(signum)
        self.message = message


_requested: int | None = None  # the first signal received, until forget()
_requested_at_ms = 0


def request(signum: int, frame: Any = None) -> None:
    """Record a stop (the signal handler); a later signal does not replace the first."""
    global _requested, _requested_at_ms
    if _requested is None:
        _requested, _requested_at_ms = int(signum), int(time.time() * 1000)


def requested_at_ms() -> int:
    """When the stop was asked (ms since the epoch; 0 if none was)."""
    return _requested_at_ms if _requested is not None else 0


def requested() -> int | None:
    """The signal number of the stop asked, or None."""
    return _requested


def check() -> None:
    """Raise :class:`Interrupted` if a stop was asked."""
    if _requested is not None:
        raise Interrupted(_requested)


def forget() -> None:
    """No stop asked (tests, and a process that handled one and goes on)."""
    global _requested
    _requested = None


def install() -> dict[int, Any]:
    """SIGINT and SIGTERM record a stop (main thread only); the previous handlers."""
    return {s: signal.signal(s, request) for s in SIGNALS}


def restore(previous: dict[int, Any]) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)
