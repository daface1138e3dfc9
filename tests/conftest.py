"""Shared fixtures: tiny synthetic data and a tiny copy of the repository for end-to-end runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A pipeline small enough for CI: 6 phantom cases of 32x32x16, a 2-level U-Net of 4 filters.
TINY_PARAMS = {
    "ingest": {
        "dataset": "phantom",
        "phantom": {"n_cases": 6, "size": 48, "n_slices": 16, "spacing": [6.0, 6.0, 8.0]},
    },
    "prepare": {"image_size": 32, "n_test": 2, "k_folds": 2, "liver_free_fraction": 0.2},
    "tune": {"n_trials": 2, "epochs": 1, "batch_sizes": [8, 16], "timeout_s": 120},
    "train": {"model": {"depth": 2, "base_filters": 4}, "epochs": 2, "patience": 2},
}

# Outputs and environments at the repository's top level are not copied (the copy makes its own).
TOP_LEVEL_SKIP = {".venv", ".git", "data", "models", "reports", "optuna", "mlartifacts", "mlruns"}
ANYWHERE_SKIP = shutil.ignore_patterns(
    "__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache", ".ruff_cache"
)


def _ignore(folder: str, names: list[str]) -> set[str]:
    skip = set(ANYWHERE_SKIP(folder, names))
    if Path(folder) == REPO:
        skip |= TOP_LEVEL_SKIP & set(names)
    if Path(folder) == REPO / ".dvc":
        skip |= {"tmp", "cache"} & set(names)
    return skip


def deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: the venv's bin first on PATH, quiet TensorFlow."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(**extra), capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode})\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def stop_group(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Stop a server started with ``start_new_session=True`` and every process it spawned:
    SIGTERM to its process group, SIGKILL after 30 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def make_repo_copy(dest: Path, params_override: dict) -> Path:
    """A git repository in ``dest`` holding this project's files with tiny params."""
    shutil.copytree(REPO, dest, ignore=_ignore)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    deep_update(params, params_override)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / "mlruns").mkdir(exist_ok=True)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], dest)
    return dest


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny copy of the repository on which ``dvc repro`` has run once."""
    repo = make_repo_copy(tmp_path_factory.mktemp("e2e") / "repo", TINY_PARAMS)
    run(["dvc", "repro"], repo)
    # dvc.lock and the `cache: false` outputs (metrics, curves, reports), as a user commits them
    run(["git", "add", "dvc.lock", "reports"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], repo)
    return repo


# ----------------------------------------------------------------------------- MLflow stores
@dataclass(frozen=True)
class MlflowStore:
    """A private SQLite tracking store: ``root/mlflow.db``, artifacts under ``root/artifacts``."""

    uri: str
    root: Path

    def experiment(self, name: str) -> str:
        """The id of experiment ``name`` (created with its artifacts under ``root``)."""
        from liverseg.tracking import ensure_experiment

        return ensure_experiment(name, self.root / "artifacts")


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its tables created (the migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@contextmanager
def mlflow_store_at(root: Path, template: Path) -> Iterator[MlflowStore]:
    """A copy of the empty store at ``root``, the tracking URI (environment and MLflow's
    process-wide setting) pointing at it while the context lasts."""
    import mlflow

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, root / "mlflow.db")
    store = MlflowStore(f"sqlite:///{root / 'mlflow.db'}", root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store.uri)
        mlflow.set_tracking_uri(store.uri)
        try:
            yield store
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture
def mlflow_store(tmp_path: Path, empty_mlflow_db: Path) -> Iterator[MlflowStore]:
    """A private MLflow store for one test, in ``tmp_path/mlruns``."""
    with mlflow_store_at(tmp_path / "mlruns", empty_mlflow_db) as store:
        yield store


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepare stage's output for 5 phantom patients of 32x32x10: 1 test patient, 2 folds."""
    from liverseg.data.phantom import write_phantom
    from liverseg.params import PhantomParams, PrepareParams
    from liverseg.stages.prepare import prepare

    root = tmp_path_factory.mktemp("prep")
    write_phantom(root / "raw", PhantomParams(n_cases=5, size=32, n_slices=10, seed=1))
    prepare(root / "raw", root / "prepared", PrepareParams(image_size=32, n_test=1, k_folds=2))
    return root / "prepared"


@pytest.fixture(autouse=True)
def _no_stop_left() -> Iterator[None]:
    """A stop a test asked (liverseg.stop is per process) does not stop the tests after it."""
    yield
    from liverseg import stop

    stop.forget()
