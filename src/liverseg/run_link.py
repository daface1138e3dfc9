"""The train stage's ``run.json``: the MLflow runs that the evaluate and register runs nest under.

``{"experiment_id": ..., "parent_run_id": ..., "final_run_id": ..., "tracking_uri": ...}``,
written by the train stage; read here only, so that evaluate and register require the same.
"""

from __future__ import annotations

from pathlib import Path

from liverseg.errors import DataError
from liverseg.fsutil import read_stage_json


def read_train_run(path: Path) -> dict[str, str]:
    """The train stage's ``run.json`` as strings; ``parent_run_id`` is required (a missing or
    broken file is a DataError naming it)."""
    path = Path(path)
    data = read_stage_json(path, "train")
    if not isinstance(data, dict) or not isinstance(data.get("parent_run_id"), str):
        raise DataError(f"{path}: parent_run_id: missing (not a train stage run.json)")
    if not data["parent_run_id"]:
        raise DataError(f"{path}: parent_run_id: empty")
    return {k: str(v) for k, v in data.items() if v is not None}
