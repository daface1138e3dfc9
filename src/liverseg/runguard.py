"""Faults: signals, MLflow runs of dead processes, and the one-line error of the CLI.

* **Signals**: :func:`install` makes SIGTERM (what ``timeout``, CI cancellation, ``docker stop``
  and Kubernetes send) raise :class:`Interrupted`, a ``KeyboardInterrupt`` like Ctrl+C's, so
  the same ``with``/``finally`` blocks run: MLflow's ``with start_run()`` ends its run,
  :func:`liverseg.fsutil.atomic_dir` removes its temporary output. The CLI then ends this
  process's runs KILLED (:func:`end_own_runs`), prints one line and exits 128 + the signal
  number (130 for SIGINT, 143 for SIGTERM).
* **Dead processes** (SIGKILL, a crashed machine): every MLflow run started through
  ``mlflow.start_run`` carries the tags of :func:`process_tags` (host, PID and the PID's start
  time, added by the :class:`RunContext` plugin that ``pyproject.toml`` registers with MLflow).
  :func:`end_stale_runs`, called by the CLI before a stage that tracks in MLflow, ends the
  RUNNING runs whose process provably no longer exists on this host (KILLED) and says so.
  The start time guards against a recycled PID; runs of other hosts are left alone (nothing
  here can prove those dead).
* **Exit**: :func:`exit_without_teardown` ends a stage's process (and a worker) once its
  atexit handlers have run (MLflow's queues, multiprocessing's finalizers, logging), without
  the interpreter's teardown of every module and object, which takes about 1.5 s once
  TensorFlow is loaded (benchmarks/README.md): time a pipeline of six stages would wait.

Module-level imports are kept to the standard library: MLflow loads this module as a plugin
in every process that imports it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

HOST_TAG = "liverseg.host"
PID_TAG = "liverseg.pid"
START_TAG = "liverseg.pid_start"
ENDED_BY_TAG = "liverseg.ended_by"
DEBUG_ENV = "LIVERSEG_DEBUG"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``message`` (optional) says what is kept and how to go on."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"signal {signum}")
        self.signum = int(signum)
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_interrupted_at_ms: int | None = None


# The signal whose Interrupted is deferred (retry_outside_tensorflow), until it is raised.
_pending_signal: int | None = None


def _raise_interrupted(signum: int, frame: Any) -> None:
    note_interrupt()
    if retry_outside_tensorflow(signum, frame):
        return
    raise Interrupted(signum)


def raise_pending() -> None:
    """Raise the :class:`Interrupted` of a signal deferred by :func:`retry_outside_tensorflow`,
    if there is one (and stop its retries). For points where stopping is safe and that the
    retries may not hit: training calls it at each epoch's end, so that a stage or worker
    stops there at the latest, even when it spends nearly all its time in TensorFlow and the
    stores (a short tuning trial could otherwise end before a retry landed)."""
    global _pending_signal
    signum, _pending_signal = _pending_signal, None
    if signum is not None:
        raise Interrupted(signum)


def forget_pending() -> None:
    """Stop the retries of a deferred signal (its stop is being raised another way)."""
    global _pending_signal
    _pending_signal = None


# Code an exception must not be raised in the middle of: TensorFlow's Python (which its C++
# may have called: the exception is lost or turned into another error) and the tracking
# store's database session (raised mid-transaction, the session keeps SQLite locked while the
# clean-up tries to end the runs: "database is locked", seen in CI).
_DEFER_IN = tuple(
    os.sep + os.path.join(*parts) + os.sep
    for parts in (("tensorflow",), ("sqlalchemy",), ("mlflow", "store"))
)


def _in_tensorflow(frame: Any) -> bool:
    while frame is not None:
        if any(d in frame.f_code.co_filename for d in _DEFER_IN):
            return True
        frame = frame.f_back
    return False


def retry_outside_tensorflow(signum: int, frame: Any) -> bool:
    """When the signal came while TensorFlow's Python code or a tracking-store transaction
    runs (see ``_DEFER_IN``), mark it pending, send it again to the main thread in 50 ms and
    return True; the retries end where it lands outside (or when :func:`raise_pending` or
    :func:`forget_pending` took it). Else nothing is pending any more; returns False."""
    global _pending_signal
    if not _in_tensorflow(frame):
        _pending_signal = None
        return False
    _pending_signal = signum
    timer = threading.Timer(0.05, _retry, (signum,))
    timer.daemon = True
    timer.start()
    return True


def _retry(signum: int) -> None:
    """Send ``signum`` to the main thread again, unless its Interrupted has been raised."""
    main = threading.main_thread().ident
    if _pending_signal == signum and main is not None:
        signal.pthread_kill(main, signum)


def note_interrupt() -> None:
    """Remember when the first interrupt came (:func:`end_own_runs` ends the runs after it)."""
    global _interrupted_at_ms
    if _interrupted_at_ms is None:
        _interrupted_at_ms = int(time.time() * 1000)


def install() -> dict[int, Any]:
    """SIGTERM and SIGINT raise :class:`Interrupted` (main thread only); returns the previous
    handlers, for :func:`restore`."""
    return {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}


def hold() -> None:
    """Ignore SIGINT and SIGTERM (while this process cleans up after the first one)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def restore(previous: dict[int, Any]) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ------------------------------------------------------------------------------ process identity
def _start_time(pid: int) -> str | None:
    """The PID's start time in clock ticks since boot (Linux ``/proc``), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so count after its closing ")".
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags(pid: int | None = None) -> dict[str, str]:
    """Tags that identify this process: host, PID and the PID's start time."""
    pid = os.getpid() if pid is None else pid
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), START_TAG: _start_time(pid) or ""}


def is_dead(tags: dict[str, Any]) -> bool:
    """True when ``tags`` name a process of this host that no longer exists.

    False when unsure: another host, no PID, or a live process with that PID and start time
    (or a live one where the start time cannot be read).
    """
    if tags.get(HOST_TAG) != socket.gethostname():
        return False
    try:
        pid = int(tags.get(PID_TAG, ""))
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    start = _start_time(pid)
    recorded = tags.get(START_TAG) or ""
    return bool(start and recorded and start != recorded)


class RunContext:
    """MLflow run context provider (entry point ``mlflow.run_context_provider``): adds
    :func:`process_tags` to every run that ``mlflow.start_run`` creates."""

    def in_context(self) -> bool:
        return True

    def tags(self) -> dict[str, str]:
        return process_tags()


# ----------------------------------------------------------------------------------- MLflow runs
def _runs(filter_string: str) -> list[Any]:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not exp_ids:
        return []
    return list(
        client.search_runs(exp_ids, filter_string, run_view_type=ViewType.ALL, max_results=5000)
    )


def end_stale_runs() -> list[str]:
    """End KILLED the RUNNING runs of dead processes of this host; one line per process."""
    from mlflow.tracking import MlflowClient

    host = socket.gethostname().replace("'", "")
    runs = _runs(f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'")
    client = MlflowClient()
    by_pid: dict[str, list[str]] = {}
    for r in runs:
        if not is_dead(r.data.tags):
            continue
        client.set_tag(r.info.run_id, ENDED_BY_TAG, f"{host}:{os.getpid()} (process was dead)")
        client.set_terminated(r.info.run_id, status="KILLED")
        by_pid.setdefault(r.data.tags[PID_TAG], []).append(r.info.run_name or r.info.run_id)
    return [
        f"ended {len(names)} stale RUNNING MLflow run(s) of dead process {pid} as KILLED: "
        + ", ".join(sorted(names))
        for pid, names in sorted(by_pid.items())
    ]


def end_own_runs(status: str = "KILLED") -> int:
    """After an interrupt: end this process's unfinished runs with ``status``; their number."""
    if "mlflow" not in sys.modules:
        return 0
    import mlflow
    from mlflow.tracking import MlflowClient

    # The epoch logger's queued writes go first: one writer at a time on a SQLite store.
    _retry_busy(mlflow.flush_async_logging)
    while mlflow.active_run() is not None:
        _retry_busy(mlflow.end_run, status)
    mine = process_tags()
    host = mine[HOST_TAG].replace("'", "")
    runs = _runs(
        f"attributes.status != 'FINISHED' and tags.`{HOST_TAG}` = '{host}' "
        f"and tags.`{PID_TAG}` = '{mine[PID_TAG]}' and tags.`{START_TAG}` = '{mine[START_TAG]}'"
    )
    # Runs that a ``with`` block ended FAILED on the way out of the interrupt, and any still
    # RUNNING; not a run that failed on its own before it (e.g. a diverged tuning trial).
    since = _interrupted_at_ms or 0
    ended = [
        r for r in runs if r.info.status == "RUNNING" or (r.info.end_time or 0) >= since - 1000
    ]
    client = MlflowClient()
    for r in ended:
        if r.info.status != status:
            _retry_busy(client.set_terminated, r.info.run_id, status=status)
    return len(ended)


def _retry_busy(fn: Any, *args: Any, attempts: int = 8, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, retried while the tracking store answers "temporarily
    unavailable" (a SQLite store locked by another writer, seen under heavy load)."""
    from mlflow.exceptions import MlflowException

    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if exc.error_code != "TEMPORARILY_UNAVAILABLE" or i == attempts - 1:
                raise
            time.sleep(0.25 * 2**i)
    return None


# ------------------------------------------------------------------------------- model server
def _is_disconnect(exc: BaseException | None, depth: int = 0) -> bool:
    """A client that hung up: Starlette's ``ClientDisconnect`` or a reset/broken connection,
    also inside exception groups and chains (the scoring server's middleware wraps it)."""
    if exc is None or depth > 10:
        return False
    if type(exc).__name__ == "ClientDisconnect" or isinstance(exc, ConnectionError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e, depth + 1) for e in exc.exceptions)
    return _is_disconnect(exc.__cause__ or exc.__context__, depth + 1)


class ClientDisconnectFilter(logging.Filter):
    """Turns uvicorn's traceback for a client that hung up into one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _is_disconnect(record.exc_info[1]):
            record.msg = "client disconnected before the response was sent; request dropped"
            record.args = ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_client_disconnects(logger: str = "uvicorn.error") -> None:
    """Install :class:`ClientDisconnectFilter` on the server's error logger (idempotent)."""
    log = logging.getLogger(logger)
    if not any(isinstance(f, ClientDisconnectFilter) for f in log.filters):
        log.addFilter(ClientDisconnectFilter())


def exit_without_teardown(code: int) -> NoReturn:
    """End this process with exit status ``code`` as ``sys.exit`` would, minus the teardown.

    What a normal exit does first is done here too: non-daemon threads are joined, the atexit
    handlers run (MLflow's asynchronous logging queues drain, multiprocessing's finalizers,
    ``logging.shutdown``), the standard streams are flushed. Then ``os._exit`` skips the
    destruction of modules and objects (TensorFlow's among them), which writes nothing.
    """
    # What the interpreter calls first on exit (and multiprocessing before a forked child's
    # os._exit): stops concurrent.futures' pools after their queued work, joins the threads.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        # closed, or a broken pipe: nothing more can be said
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
