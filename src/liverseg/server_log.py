"""The model server's log: one line, not a traceback, for a client that hung up."""

from __future__ import annotations

import logging


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
