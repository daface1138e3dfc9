"""MLflow runs and the process that owns them.

Every run started through ``mlflow.start_run`` carries :func:`process_tags` (host, PID and
the PID's start time, against a recycled PID), added by the :class:`RunContext` plugin that
``pyproject.toml`` registers. With them, :func:`end_stale_runs` ends KILLED the RUNNING runs
whose process provably no longer exists on this host (SIGKILL, a crash; other hosts' runs are
left alone), and :func:`end_own_runs` ends this process's unfinished runs after a stop.
Module-level imports: standard library only (MLflow loads this plugin in every process).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from liverseg import stop

HOST_TAG = "liverseg.host"
PID_TAG = "liverseg.pid"
START_TAG = "liverseg.pid_start"
ENDED_BY_TAG = "liverseg.ended_by"


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
    """True when ``tags`` name a process of this host that no longer exists (False when
    unsure: another host, no PID, a live process whose start time matches or is unreadable)."""
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
    """MLflow run context provider: :func:`process_tags` on every run ``start_run`` creates."""

    def in_context(self) -> bool:
        return True

    def tags(self) -> dict[str, str]:
        return process_tags()


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
    """After a stop: end this process's unfinished runs with ``status``; their number."""
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
    # Runs that a ``with`` block ended FAILED on the way out of the stop, and any still
    # RUNNING; not a run that failed on its own before it (e.g. a diverged tuning trial).
    since = stop.requested_at_ms()
    ended = [
        r for r in runs if r.info.status == "RUNNING" or (r.info.end_time or 0) >= since - 1000
    ]
    client = MlflowClient()
    for r in ended:
        if r.info.status != status:
            _retry_busy(client.set_terminated, r.info.run_id, status=status)
    return len(ended)


def retry(fn: Any, *args: Any, attempts: int, delay_s: float, when: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, retried ``attempts`` times in all, ``delay_s * 2**i`` apart,
    while the error it raises satisfies ``when``; the last error is raised."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not when(exc) or i == attempts - 1:
                raise
            time.sleep(delay_s * 2**i)
    return None


def _retry_busy(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Retried while the tracking store answers "temporarily unavailable" (a SQLite store
    locked by another writer, seen under heavy load)."""
    from mlflow.exceptions import MlflowException

    def busy(exc: Exception) -> bool:
        return isinstance(exc, MlflowException) and exc.error_code == "TEMPORARILY_UNAVAILABLE"

    return retry(fn, *args, attempts=8, delay_s=0.25, when=busy, **kwargs)
