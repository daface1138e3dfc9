"""Exceptions with messages meant for the user: each names the file or key and the problem."""


class LiversegError(Exception):
    """Base class of the errors this project raises on purpose."""


class DataError(LiversegError, ValueError):
    """A data file is unreadable or violates the data contract (the message names the file)."""


class ParamsError(LiversegError, ValueError):
    """A params.yaml key is unknown, missing or out of range (the message names the key)."""
