"""Exceptions with messages meant for the user: each names the file or key and the problem."""


class LiversegError(Exception):
    """Base class of the errors this project raises on purpose."""


class DataError(LiversegError, ValueError):
    """A data file is unreadable or violates the data contract (the message names the file)."""


class ParamsError(LiversegError, ValueError):
    """A params.yaml key is unknown, missing or out of range (the message names the key)."""


def error_line(exc: BaseException) -> str | None:
    """One line for an error a user can cause, or None for a bug (which keeps its traceback)."""
    import sys

    if isinstance(exc, LiversegError):
        return str(exc)
    if isinstance(exc, OSError):
        # ENOSPC, EACCES, EISDIR...: the path (fsutil names the output when the OS does not).
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        reason = exc.strerror or str(exc)
        return f"{where}: {reason}" if where else reason
    mlflow_exc = sys.modules.get("mlflow.exceptions")
    if mlflow_exc is not None and isinstance(exc, mlflow_exc.MlflowException):
        return f"MLflow: {str(exc.message).strip().splitlines()[0]}"
    return None
