"""Shared fixtures: tiny synthetic data and a tiny copy of the repository for end-to-end runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A pipeline small enough for CI: 6 phantom cases of 32x32x16, a 2-level U-Net of 4 filters.
# Trials and folds in the stage's process (a worker process costs a TensorFlow import, ~5 s of
# CPU): the tests of worker processes set ``processes: auto`` on their copy.
TINY_PARAMS = {
    "ingest": {
        "dataset": "phantom",
        "phantom": {"n_cases": 6, "size": 48, "n_slices": 16, "spacing": [6.0, 6.0, 8.0]},
    },
    "prepare": {"image_size": 32, "n_test": 2, "k_folds": 2, "liver_free_fraction": 0.2},
    "tune": {"n_trials": 2, "epochs": 1, "batch_sizes": [8, 16], "timeout_s": 120, "processes": 1},
    "train": {"model": {"depth": 2, "base_filters": 4}, "epochs": 2, "patience": 2, "processes": 1},
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


class _Repro(threading.Thread):
    """``dvc repro`` of the tiny repository in a thread, its own session (signals sent to the
    tests' process or group do not reach it), with the environment of when it was made."""

    def __init__(self, repo: Path) -> None:
        super().__init__(daemon=True)
        self.repo, self.env = repo, tool_env()
        self.proc: subprocess.Popen[str] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.proc = subprocess.Popen(
                ["dvc", "repro"],
                cwd=self.repo,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            out, err = self.proc.communicate()
            if self.proc.returncode != 0:
                raise AssertionError(
                    f"dvc repro failed ({self.proc.returncode})\n--- stdout\n{out[-4000:]}"
                    f"\n--- stderr\n{err[-6000:]}"
                )
        except BaseException as exc:
            self.error = exc


@pytest.fixture(scope="session", autouse=True)
def _tiny_repro(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[_Repro | None]:
    """When a selected test needs ``tiny_repo``, its ``dvc repro`` starts with the session, on
    the core that the unit tests before it (one process) leave idle; the fixture waits for it."""
    if not any("tiny_repo" in item.fixturenames for item in request.session.items):
        yield None
        return
    repro = _Repro(make_repo_copy(tmp_path_factory.mktemp("e2e") / "repo", TINY_PARAMS))
    repro.start()
    try:
        yield repro
    finally:
        if repro.proc is not None and repro.proc.poll() is None:  # the session ended early
            stop_group(repro.proc)
        repro.join()


@pytest.fixture(scope="session")
def tiny_repo(_tiny_repro: _Repro | None) -> Path:
    """A tiny copy of the repository on which ``dvc repro`` has run once."""
    assert _tiny_repro is not None  # (started for every session with a test that asks this)
    _tiny_repro.join()
    if _tiny_repro.error is not None:
        raise _tiny_repro.error
    repo = _tiny_repro.repo
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
def tracking_at(uri: str) -> Iterator[None]:
    """The tracking URI (environment and MLflow's process-wide setting) while the context lasts."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(None)


@contextmanager
def mlflow_store_at(root: Path, template: Path) -> Iterator[MlflowStore]:
    """A copy of the empty store at ``root``, the tracking URI (environment and MLflow's
    process-wide setting) pointing at it while the context lasts."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, root / "mlflow.db")
    store = MlflowStore(f"sqlite:///{root / 'mlflow.db'}", root)
    with tracking_at(store.uri):
        yield store


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


# ------------------------------------------------------------------ a served model (session)
# One `mlflow models serve` of one tiny registered model for the whole session: test_serving and
# test_faults both ask it (each used to start its own: a second model fit, registry and server).
SERVED_MODEL = "liver-unet-test"
SERVED_LIMIT_MB = 2  # the server's LIVERSEG_MAX_REQUEST_MB: a 512x512 float32 slice (1 MB) fits


@dataclass(frozen=True)
class Store:
    """The served model's tracking store, with a finished training parent run."""

    uri: str
    root: Path
    run_json: Path
    parent_run_id: str


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def register_with(store: Store, model: Path, dice: float, tag: str) -> dict:
    """Register ``model`` with test Dice ``dice`` as the register stage does (tracking URI set)."""
    from liverseg.inference import PostProcessing
    from liverseg.params import RegisterParams
    from liverseg.stages.register import register

    metrics = store.root / f"metrics-{tag}.json"
    metrics.write_text(json.dumps({"dice_mean": dice}))
    return register(
        model,
        metrics,
        store.run_json,
        store.root / f"register-{tag}",
        RegisterParams(model_name=SERVED_MODEL),
        PostProcessing(),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-level U-Net trained for a few seconds on bright discs, so masks are non-trivial."""
    import keras
    import numpy as np

    from liverseg.model.folder import save_model_dir
    from liverseg.model.unet import build_unet
    from liverseg.params import ModelParams

    folder = tmp_path_factory.mktemp("tiny_model") / "models"
    keras.utils.set_random_seed(0)
    model = build_unet(32, ModelParams(depth=2, base_filters=4, dropout=0.0), seed=0)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    n = 64
    centres = rng.integers(8, 24, size=(n, 2))
    radii = rng.integers(4, 9, size=n)
    y = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2) <= (
        radii[:, None, None] ** 2
    )
    # Windowed [-100, 400] HU: 0.35 is 75 HU (the disc), 0.05 is -75 HU (the background).
    x = np.where(y, 0.35, 0.05) + rng.normal(0.0, 0.03, y.shape)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    model.fit(x[..., None], y[..., None].astype(np.float32), epochs=5, batch_size=16, verbose=0)
    return save_model_dir(folder, model, window=(-100, 400), image_size=32)


@pytest.fixture(scope="session")
def serving_store(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path) -> Store:
    """A SQLite tracking store in a temporary folder, with a finished training parent run."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    shutil.copy(empty_mlflow_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking_at(uri):
        exp_id = MlflowStore(uri, root).experiment("liverseg-test")
        with mlflow.start_run(experiment_id=exp_id, run_name="train") as run:
            parent = run.info.run_id
    run_json = root / "run.json"
    link = {"experiment_id": exp_id, "parent_run_id": parent, "final_run_id": ""}
    run_json.write_text(json.dumps({**link, "tracking_uri": uri}))
    return Store(uri, root, run_json, parent)


@pytest.fixture(scope="session")
def server(tiny_model: Path, serving_store: Store) -> Iterator[Server]:
    """``mlflow models serve`` of the champion (version 1), stopped by its process group."""
    from liverseg.registry import CHAMPION
    from liverseg.serving.forms import MAX_REQUEST_ENV

    with tracking_at(serving_store.uri):
        first = register_with(serving_store, tiny_model, 0.90, "v1")
    assert first["decision"] == CHAMPION and first["version"] == "1"
    port = free_port()
    log = serving_store.root / "serve.log"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{SERVED_MODEL}@{CHAMPION}"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = tool_env(MLFLOW_TRACKING_URI=serving_store.uri, **{MAX_REQUEST_ENV: str(SERVED_LIMIT_MB)})
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd,
            cwd=serving_store.root,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no /ping within 120 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield Server(url, proc, log)
    finally:
        stop_group(proc)
