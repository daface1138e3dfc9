"""The evaluate stage's results, written and read here only: ``metrics.json`` (the means, the
standard deviations and one row per test patient) and ``per_patient.csv`` (the same rows).

``register`` reads ``metrics.json`` back with :func:`read_test_metrics`: its ``dice_mean``
decides champion or challenger.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from liverseg.errors import DataError
from liverseg.fsutil import read_stage_json, write_json


def write_results(folder: Path, result: dict[str, Any]) -> None:
    """Write ``result`` (with its ``per_patient`` rows) into ``folder``."""
    write_json(folder / "metrics.json", result)
    rows = result["per_patient"]
    with open(folder / "per_patient.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def read_test_metrics(path: Path) -> dict[str, Any]:
    """The evaluate stage's ``metrics.json``; its ``dice_mean`` must be a number in [0, 1]."""
    path = Path(path)
    data = read_stage_json(path, "evaluate")
    value = data.get("dice_mean") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{path}: dice_mean: missing or not a number (got {value!r})")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise DataError(f"{path}: dice_mean: must be in [0, 1], got {value!r}")
    return data
