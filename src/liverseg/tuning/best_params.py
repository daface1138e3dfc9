"""``best_params.json``, the tune stage's result: written and read here only (``train`` reads
it when ``train.use_tuned``). Standard library and project files only, so that reading it
does not load the tuning package's dependencies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from liverseg.errors import DataError
from liverseg.fsutil import write_json

FILE = "best_params.json"
PARAM_LR = "learning_rate"
PARAM_BATCH = "batch_size"


def write_best_params(folder: Path, summary: dict[str, Any]) -> None:
    """``folder/best_params.json``: the best trial's parameters, value and the trial counts."""
    write_json(Path(folder) / FILE, summary)


def read_best_params(path: Path) -> tuple[float, int]:
    """(learning rate, batch size) of a ``best_params.json``; a DataError naming it if not."""
    import json

    try:
        best = json.loads(Path(path).read_text())
        return float(best[PARAM_LR]), int(best[PARAM_BATCH])
    except FileNotFoundError as exc:
        raise DataError(
            f"{path}: not found; run the tune stage or set train.use_tuned: false"
        ) from exc
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a tuning result ({exc})") from exc
