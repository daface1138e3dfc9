"""Atomic output helpers: a failed stage must leave no half-written output behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from liverseg import stop
from liverseg.errors import DataError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_dead_leftovers(final: Path) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>`` beside ``final`` of dead PIDs
    (the PID in the temporary names lets a later run remove what a killed one left behind)."""
    for kind in ("tmp", "old"):
        for p in final.parent.glob(f".{final.name}.{kind}-*"):
            pid = p.name[len(f".{final.name}.{kind}-") :].split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@contextmanager
def _removed_on_error(tmp: Path, final: Path) -> Iterator[None]:
    """Remove ``tmp`` if the block raises; an OSError without a file name (ENOSPC and EFBIG on
    a write carry none) is given ``final``'s."""
    try:
        yield
    except BaseException as exc:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(final)
        raise


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success it replaces ``final``.

    On an exception (or a stop asked by SIGINT/SIGTERM, checked before the replacement, see
    :mod:`liverseg.stop`) the temporary folder is removed and ``final`` is left as it was, so
    a stage that fails half-way leaves neither a partial output nor a missing old one. The
    folder gets the permissions the umask gives.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    with _removed_on_error(tmp, final):
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700
        yield tmp
        stop.check()
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; it is renamed onto ``final`` on success.

    The file gets the permissions the umask gives (``mkstemp`` makes it 0600)."""
    final = Path(final)
    if final.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_leftovers(final)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    with _removed_on_error(tmp, final):
        tmp.chmod(0o666 & ~_umask())
        yield tmp
        os.replace(tmp, final)


def check_output_path(final: Path) -> None:
    """Fail now, before any work, if ``final`` cannot be written as a file: it is a folder, or
    its nearest existing parent is not a writable folder (an OSError naming the path)."""
    final = Path(final)
    if final.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(final))
    parent = final.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a parent is not a directory", str(final))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "permission denied", str(parent))


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_stage_json(path: Path, stage: str) -> Any:
    """The JSON file another stage wrote; a missing or broken file is a DataError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{path}: not found (run the {stage} stage first)") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
