"""MLflow helpers shared by the train, tune, evaluate and register stages.

The tracking URI is set by the entry point (``liverseg.cli``), never here.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import yaml


def ensure_experiment(name: str, artifact_root: Path | None = None) -> str:
    """Id of experiment ``name``, created (with artifacts under ``artifact_root``) if missing."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if artifact_root is not None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        location = artifact_root.resolve().as_uri()
    try:
        return str(mlflow.create_experiment(name, artifact_location=location))
    except mlflow.exceptions.MlflowException:
        # Another worker created it between our lookup and our create.
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def git_commit() -> str:
    """The working tree's commit (with ``-dirty`` when it has changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def dvc_out_hash(path: Path, lock: Path = Path("dvc.lock")) -> str:
    """The md5 that ``dvc.lock`` records for output ``path`` (as DVC hashes it), or ``unknown``."""
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "unknown"
    want = Path(path).as_posix().rstrip("/")
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if str(out.get("path", "")).rstrip("/") == want:
                return str(out.get("md5", "unknown"))
    return "unknown"


def content_hash(folder: Path) -> str:
    """SHA-256 over the relative paths and bytes of every file under ``folder`` (sorted)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def log_params_flat(params: dict[str, Any]) -> None:
    """Log a flat dict of params (lists as strings), in batches MLflow accepts."""
    items = {k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in params.items()}
    keys = list(items)
    for i in range(0, len(keys), 90):
        mlflow.log_params({k: items[k] for k in keys[i : i + 90]})


def tensorflow_distribution() -> str:
    """The installed TensorFlow distribution: ``tensorflow-cpu`` (the ``cpu`` extra) or
    ``tensorflow`` (the ``gpu`` extra), for the pip requirements logged with a model."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            version(dist)
        except PackageNotFoundError:
            continue
        return dist
    return "tensorflow"
