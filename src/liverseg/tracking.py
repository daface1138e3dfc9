"""MLflow helpers shared by the train, tune, evaluate and register stages (and serving).

The tracking URI is set by the entry point (``liverseg.cli``), never here. The train stage's
``run.json`` (:func:`write_train_run`, :func:`read_train_run`) names the MLflow runs that the
evaluate and register runs nest under.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import yaml

from liverseg.errors import DataError
from liverseg.fsutil import read_stage_json, write_json

# The MLflow UI (3.x) opens an experiment on the view its kind names; without this tag it
# guesses, and an experiment with no traces opens on the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The tag MLflow shows as the description of an experiment, run or model.
NOTE_TAG = "mlflow.note.content"
EXPERIMENT_DESCRIPTION = (
    "Liver segmentation in abdominal CT with a 2D U-Net (liverseg). One `cv` run per `train` "
    "(named `cv-<experiment>` for `dvc exp run`) with its `fold-K` (`fold-K-<experiment>`) "
    "curves, the `final` model, "
    "`evaluate` (3-D test Dice, HD95, overlays) and `register` runs nested under it; one "
    "`study-...` run per Optuna study with a `trial-N` run per trial. Sort the `cv` runs by "
    "`test_dice_mean` or `cv_val_dice_mean`; the Dataset column names the DVC hash of the data."
)


def _sqlite_database(uri: str) -> Path | None:
    """The database file of a SQLite store's URI (artifacts go beside it); None for servers."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


# Where MLflow 3.17's SQLite store writes the artifact locations it made absolute (it resolves
# a relative one against the working directory when the experiment is created, and each run's
# and each logged model's from its experiment's at creation).
ARTIFACT_LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


def follow_moved_store() -> None:
    """Make a moved or copied SQLite store (``cp -a``, ``mv`` of the repository) keep its
    artifacts beside it again: artifact locations that still name ``artifacts/`` beside the
    database at its old place are rewritten to the one beside it now, so new runs write into
    this copy and old runs read the copied files. Locations elsewhere are left alone."""
    import sqlite3
    from contextlib import closing
    from urllib.parse import unquote, urlparse

    database = _sqlite_database(mlflow.get_tracking_uri())
    if database is None or not database.is_file():
        return
    root = (database.parent / "artifacts").resolve()
    here = root.as_uri()
    with closing(sqlite3.connect(database, timeout=60)) as db, db:
        locations = {row[0] for row in db.execute("SELECT artifact_location FROM experiments")}
        moved = []
        for old in sorted(locations - {here}):
            path = Path(unquote(urlparse(old).path))
            if not old.startswith("file://") or path.parts[-2:] != root.parts[-2:]:
                continue  # not the default layout (mlruns/artifacts) of a store elsewhere
            moved.append(old)
            for table, column in ARTIFACT_LOCATION_COLUMNS:
                db.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (here, len(old) + 1, old, len(old) + 1, old + "/"),
                )
    for old in moved:
        logging.getLogger("liverseg").info(
            "%s: the store was moved or copied; its artifact locations %s now read %s",
            database,
            old,
            here,
        )


def ensure_experiment(name: str, artifact_root: Path | None = None) -> str:
    """Id of experiment ``name``, created (with artifacts under ``artifact_root``, by default
    beside a SQLite store) if missing; tagged as a model-training experiment with a
    description if it has none. A moved SQLite store is made to follow first
    (:func:`follow_moved_store`)."""
    follow_moved_store()
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        database = _sqlite_database(mlflow.get_tracking_uri())
        root = artifact_root or (database and database.parent / "artifacts")
        location = None
        if root:
            root.mkdir(parents=True, exist_ok=True)
            location = root.resolve().as_uri()
        try:
            exp_id = str(mlflow.create_experiment(name, artifact_location=location))
        except mlflow.exceptions.MlflowException:
            # Another worker created it between our lookup and our create.
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
        else:
            exp = client.get_experiment(exp_id)
    for key, value in ((EXPERIMENT_KIND_TAG, EXPERIMENT_KIND), (NOTE_TAG, EXPERIMENT_DESCRIPTION)):
        if key not in exp.tags:
            try:
                client.set_experiment_tag(exp.experiment_id, key, value)
            except mlflow.exceptions.MlflowException:
                # Workers starting together on a tracking server race to insert the same tag
                # (a unique-key error in its database): fine if one of them wrote it.
                if key not in client.get_experiment(exp.experiment_id).tags:
                    raise
    return str(exp.experiment_id)


# The runs table shows a metric with all its digits (0.92308807...): the headline figures are
# logged rounded under their names, what a user reads and sorts by, and exact as <name>_exact.
HEADLINE_DECIMALS = 4


def headline_metrics(values: dict[str, float]) -> dict[str, float]:
    """``values`` rounded to :data:`HEADLINE_DECIMALS` decimals, and each exact value again
    as ``<name>_exact``."""
    rounded = {k: round(float(v), HEADLINE_DECIMALS) for k, v in values.items()}
    return {**rounded, **{f"{k}_exact": float(v) for k, v in values.items()}}


def log_dataset(path: Path, digest: str, context: str) -> None:
    """Record ``path`` as an input of the active run (the runs table's Dataset column):
    ``digest`` is the data's version (DVC's hash, MLflow keeps 36 characters), the source is
    ``path`` as ``dvc.yaml`` names it and ``context`` the split it served as."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    name = Path(path).as_posix()
    with warnings.catch_warnings():
        # "can be interpreted in multiple ways: LocalArtifactDatasetSource, <the same>"
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(name)
    dataset = MetaDataset(source=source, name=name, digest=digest[:36])  # type: ignore[abstract]
    try:
        mlflow.log_input(dataset, context=context)
    except mlflow.exceptions.MlflowException:
        # Folds or trials logging the same new dataset at once race on MLflow's check-then-insert
        # into its datasets table: the losers get a unique-key violation. The row exists now.
        mlflow.log_input(dataset, context=context)


DVC_WRITTEN = (":(exclude)dvc.lock", ":(exclude)reports")


def git_commit() -> str:
    """The working tree's commit (with ``-dirty`` when it has changes), or ``unknown``."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout

    try:
        sha = git("rev-parse", "HEAD").strip()
        # dvc.lock and the committed metrics/plots are what `dvc repro` itself rewrites: they
        # record results, not the code that produced them, so they do not make a run dirty.
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", *DVC_WRITTEN)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty.strip() else "")


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
    """Log a flat dict of params, lists as ``a,b`` (MLflow splits it into batches itself)."""
    mlflow.log_params(
        {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in params.items()}
    )


def tensorflow_distribution() -> str:
    """The installed TensorFlow distribution: ``tensorflow-cpu`` (the ``cpu`` extra) or
    ``tensorflow`` (the ``gpu`` extra), for the pip requirements logged with a model."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("tensorflow-cpu")
        return "tensorflow-cpu"
    except PackageNotFoundError:
        return "tensorflow"


def write_train_run(path: Path, run: dict[str, str]) -> None:
    """The train stage's ``run.json``: ``{"experiment_id", "parent_run_id", "final_run_id",
    "tracking_uri"}``."""
    write_json(path, run)


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
