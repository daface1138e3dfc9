"""liverseg: liver segmentation in abdominal CT with a 2D U-Net (DVC + MLflow + Optuna)."""

import logging
import sys

__version__ = "0.1.0"


def show_progress() -> None:
    """Send the library's progress lines (logger ``liverseg``, one per epoch) to stderr, where
    DVC shows them; the library itself stays quiet unless its caller (the CLI, a worker
    process of the CLI) does this."""
    logger = logging.getLogger("liverseg")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
