"""The tune stage: study identity, storages, objective/pruning/MLflow records, resume, workers.

Fast tests replace Keras training by a scripted ``fit`` (per-epoch val_dice from a table) so
the pruning, counting and MLflow bookkeeping are checked against hand values; the slow tests
train the real tiny U-Net in-process and run ``liverseg tune`` as processes (resume after a
kill, two workers on SQLite, two workers on a PostgreSQL server the test starts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import MlflowStore
from liverseg import stop
from liverseg.data.prepared import load_splits
from liverseg.errors import DataError, ParamsError
from liverseg.params import AugmentParams, ModelParams, TrainParams, TuneParams, as_flat_dict
from liverseg.tracking import content_hash, ensure_experiment
from liverseg.tuning.generations import TrialJob, optimize_in_generations
from liverseg.tuning.objective import OBJECTIVE_METRIC, make_objective
from liverseg.tuning.report import summarize, write_report
from liverseg.tuning.study import (
    SQLITE_BUSY_TIMEOUT_S,
    TuningError,
    count_finished,
    create_study,
    open_storage,
    redact,
    sampler_seed,
    study_name,
)

SIZE = 32
N_SLICES = 8
CASES = [f"case{i}" for i in range(6)]
SPLITS = {
    "seed": 0,
    "n_test": 1,
    "k_folds": 2,
    "test": ["case0"],
    "folds": [["case1", "case2"], ["case3", "case4", "case5"]],
}
# Validation slices per fold (8 slices per case): how the scripted fit tells the folds apart.
VAL_SLICES = {0: 16, 1: 24}
EXPERIMENT = "tune-test"

TINY_TRAIN = TrainParams(
    model=ModelParams(depth=2, base_filters=4, dropout=0.0, batch_norm=False),
    augment=AugmentParams(flip=False, rotate_deg=0.0, scale=0.0, intensity=0.0, blur_prob=0.0),
    experiment=EXPERIMENT,
)


def optimize(study: optuna.Study, objective: Any, tune: TuneParams) -> int:
    """The study's generations, with the trials in this process."""
    job = TrialJob(Path("."), tune, TINY_TRAIN, "", study.study_name, "0", "parent")
    return optimize_in_generations(study, tune, job, objective)


def tiny_tune(**kw: Any) -> TuneParams:
    base: dict[str, Any] = {
        "n_trials": 2,
        "timeout_s": 600.0,
        "epochs": 2,
        "folds": (0,),
        "lr_min": 1e-3,
        "lr_max": 3e-2,
        "batch_sizes": (4, 8),
        "pruner_warmup_epochs": 0,
        "seed": 0,
        "storage": "sqlite:///optuna/optuna.db",
    }
    base.update(kw)
    return TuneParams(**base)


def write_prepared(root: Path, seed: int = 0) -> Path:
    """Six cases of 8 slices 32x32: a bright disc (the 'liver', = mask) on a dim background."""
    (root / "cases").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for case in CASES:
        cy, cx = rng.uniform(10, 22, (2, N_SLICES, 1, 1))
        r = rng.uniform(5, 9, (N_SLICES, 1, 1))
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        image = np.clip(0.2 + 0.6 * mask + rng.normal(0, 0.05, mask.shape), 0, 1)
        np.savez_compressed(
            root / "cases" / f"{case}.npz",
            image=image.astype(np.float32),
            mask=mask.astype(np.uint8),
            slice_index=np.arange(N_SLICES),
        )
    (root / "splits.json").write_text(json.dumps(SPLITS))
    meta = {"params": {"window": [-100.0, 400.0], "image_size": SIZE}, "cases": {}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    return write_prepared(tmp_path / "prepared")


# ----------------------------------------------------------------------------- scripted fit
Curve = Callable[[float, int, int], list[float]]  # (lr, batch size, fold) -> val_dice per epoch


def scripted_fit(curve: Curve, calls: list[dict[str, Any]]) -> Callable[..., Any]:
    """A stand-in for ``liverseg.training.fit.fit`` that plays ``curve`` to the callbacks."""

    def fake_fit(
        train: Any,
        val: Any,
        cfg: TrainParams,
        *,
        learning_rate: float,
        batch_size: int,
        epochs: int,
        seed: int,
        patience: int | None = None,
        distribute: str = "none",
        callbacks: list[Any] | None = None,
        progress: str | None = None,
        val_stride: int = 1,
    ) -> Any:
        fold = {n: f for f, n in VAL_SLICES.items()}[val[0].shape[0]]
        calls.append(
            {
                "fold": fold,
                "seed": seed,
                "patience": patience,
                "epochs": epochs,
                "stride": val_stride,
            }
        )
        # the objective labels each fold's progress lines with its trial and fold
        assert progress is not None and progress.startswith("tune: trial ")
        assert progress.endswith(f" fold-{fold}")
        # what the epoch logger reads besides the logs: the optimizer's learning rate
        model = SimpleNamespace(
            stop_training=False, optimizer=SimpleNamespace(learning_rate=learning_rate)
        )
        for cb in callbacks or []:
            cb.set_model(model)
        values = curve(learning_rate, batch_size, fold)
        history: dict[str, list[float]] = {"val_dice": []}
        for epoch in range(epochs):
            history["val_dice"].append(values[epoch])
            for cb in callbacks or []:
                cb.on_epoch_end(epoch, {"loss": 0.5, "val_dice": values[epoch]})
            stop.check()  # as fit's own stop point after each epoch
            if model.stop_training:
                break
        return SimpleNamespace(model=model, history=history)

    return fake_fit


def run_scripted(
    monkeypatch: pytest.MonkeyPatch,
    prepared: Path,
    tune: TuneParams,
    curve: Curve,
    *,
    storage_url: str,
    enqueue: list[dict[str, Any]] | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    train: TrainParams = TINY_TRAIN,
) -> tuple[optuna.Study, str, list[dict[str, Any]]]:
    """Optimise a study with the scripted fit; returns (study, parent run id, fit calls)."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("liverseg.training.fit.fit", scripted_fit(curve, calls))
    # Real Keras here only costs a garbage collection per call; count the calls instead.
    monkeypatch.setattr(
        "keras.backend.clear_session", lambda **k: calls.append({"clear_session": k})
    )
    study = create_study(open_storage(storage_url), "study", tune, pruner=pruner)
    for params in enqueue or []:
        study.enqueue_trial(params)
    exp_id = ensure_experiment(EXPERIMENT)
    parent = MlflowClient().create_run(exp_id, run_name="study-test").info.run_id
    objective = make_objective(prepared, tune, train, experiment_id=exp_id, parent_run_id=parent)
    optimize(study, objective, tune)
    return study, parent, calls


def trial_runs(parent: str | None = None) -> dict[int, Any]:
    """MLflow trial runs by trial number (children of ``parent`` if given)."""
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    runs = MlflowClient().search_runs([exp.experiment_id], "tags.kind = 'trial'")
    if parent is not None:
        runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    return {int(r.data.tags["trial_number"]): r for r in runs}


def client_history(run_id: str, key: str) -> list[tuple[int, float]]:
    hist = MlflowClient().get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


def val_dice_steps(run_id: str) -> list[tuple[int, float]]:
    hist = MlflowClient().get_metric_history(run_id, "val_dice")
    return sorted((m.step, round(m.value, 6)) for m in hist)


# -------------------------------------------------------------------------------- identity
BASE_HASH = "a" * 64


@pytest.mark.parametrize(
    ("what", "data_hash", "tune_kw", "train", "same"),
    [
        ("nothing", BASE_HASH, {}, TINY_TRAIN, True),
        ("data", "b" * 64, {}, TINY_TRAIN, False),
        ("lr_min", BASE_HASH, {"lr_min": 2e-3}, TINY_TRAIN, False),
        ("lr_max", BASE_HASH, {"lr_max": 5e-2}, TINY_TRAIN, False),
        ("batch_sizes", BASE_HASH, {"batch_sizes": (4, 8, 16)}, TINY_TRAIN, False),
        ("folds", BASE_HASH, {"folds": (0, 1)}, TINY_TRAIN, False),
        ("epochs", BASE_HASH, {"epochs": 3}, TINY_TRAIN, False),
        ("seed", BASE_HASH, {"seed": 1}, TINY_TRAIN, False),
        (
            "model depth",
            BASE_HASH,
            {},
            dataclasses.replace(TINY_TRAIN, model=dataclasses.replace(TINY_TRAIN.model, depth=3)),
            False,
        ),
        ("loss", BASE_HASH, {}, dataclasses.replace(TINY_TRAIN, loss="dice"), False),
        (
            "augment",
            BASE_HASH,
            {},
            dataclasses.replace(TINY_TRAIN, augment=AugmentParams(flip=True)),
            False,
        ),
        (
            "precision",
            BASE_HASH,
            {},
            dataclasses.replace(TINY_TRAIN, precision="mixed_bfloat16"),
            False,
        ),
        # Not part of the objective: the same study goes on.
        ("n_trials", BASE_HASH, {"n_trials": 50}, TINY_TRAIN, True),
        ("timeout", BASE_HASH, {"timeout_s": 5.0}, TINY_TRAIN, True),
        ("storage", BASE_HASH, {"storage": "journal:x.log"}, TINY_TRAIN, True),
        ("pruner warm-up", BASE_HASH, {"pruner_warmup_epochs": 3}, TINY_TRAIN, True),
        ("train lr", BASE_HASH, {}, dataclasses.replace(TINY_TRAIN, learning_rate=0.1), True),
        ("train epochs", BASE_HASH, {}, dataclasses.replace(TINY_TRAIN, epochs=99), True),
    ],
)
def test_study_name_follows_the_objectives_inputs(
    what: str, data_hash: str, tune_kw: dict[str, Any], train: TrainParams, same: bool
) -> None:
    base = study_name(BASE_HASH, tiny_tune(), TINY_TRAIN)
    name = study_name(data_hash, tiny_tune(**tune_kw), train)
    assert name.startswith("liverseg-") and len(name) == len("liverseg-") + 12
    int(name.removeprefix("liverseg-"), 16)
    assert (name == base) is same, what


def test_study_name_of_prepared_data_changes_with_a_byte(tmp_path: Path) -> None:
    a = write_prepared(tmp_path / "a")
    b = write_prepared(tmp_path / "b")
    assert study_name(content_hash(a), tiny_tune(), TINY_TRAIN) == study_name(
        content_hash(b), tiny_tune(), TINY_TRAIN
    )
    meta = json.loads((b / "meta.json").read_text())
    meta["params"]["image_size"] = 33
    (b / "meta.json").write_text(json.dumps(meta))
    assert study_name(content_hash(a), tiny_tune(), TINY_TRAIN) != study_name(
        content_hash(b), tiny_tune(), TINY_TRAIN
    )


@pytest.mark.parametrize(
    ("seed", "worker", "existing", "expected"),
    [(42, 0, 0, 42), (7, 0, 0, 7)],
)
def test_sampler_seed_of_a_fresh_single_worker_study_is_the_seed(
    seed: int, worker: int, existing: int, expected: int
) -> None:
    assert sampler_seed(seed, worker, existing) == expected


def test_sampler_seed_differs_per_worker_and_on_resume() -> None:
    seeds = {sampler_seed(42, w, n) for w in (0, 1, 2) for n in (0, 3)}
    assert len(seeds) == 6
    assert sampler_seed(42, 1, 3) == sampler_seed(42, 1, 3)


# --------------------------------------------------------------------------------- storage
@pytest.mark.parametrize(
    ("url", "kind", "created"),
    [
        ("sqlite:///{tmp}/deep/er/optuna.db", optuna.storages.RDBStorage, "deep/er"),
        ("sqlite:///{tmp}/optuna.db?timeout=5", optuna.storages.RDBStorage, "."),
        ("journal:{tmp}/shared/journal.log", optuna.storages.JournalStorage, "shared"),
    ],
)
def test_open_storage_kinds(tmp_path: Path, url: str, kind: type, created: str) -> None:
    storage = open_storage(url.format(tmp=tmp_path))
    assert isinstance(storage, kind)
    assert (tmp_path / created).is_dir()
    study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = optuna.load_study(study_name="s", storage=open_storage(url.format(tmp=tmp_path)))
    assert len(again.trials) == 2


def test_sqlite_storage_waits_for_the_lock(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/o.db")
    assert isinstance(storage, optuna.storages.RDBStorage)
    args = storage.engine_kwargs["connect_args"]
    assert args["timeout"] == SQLITE_BUSY_TIMEOUT_S


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("optuna.db", "not a study storage"),
        ("redis://localhost/0", "not a study storage"),
        ("sqlite://", "needs a database file"),
        ("sqlite:///:memory:", "needs a database file"),
        ("journal:", "needs a file path"),
    ],
)
def test_open_storage_rejects(url: str, match: str) -> None:
    with pytest.raises(ParamsError, match=f"tune.storage.*{match}"):
        open_storage(url)


def test_unreachable_database_is_a_tuning_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("liverseg.tuning.study.STORAGE_RETRY_S", 0.0)
    with pytest.raises(TuningError, match="127.0.0.1:1/x.*cannot open"):
        open_storage("postgresql://u:secret@127.0.0.1:1/x")
    assert redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"


@pytest.mark.filterwarnings(
    "ignore:Heartbeat of storage", "ignore::optuna.exceptions.ExperimentalWarning"
)
def test_a_dead_workers_trial_is_failed_and_its_run_ended(
    mlflow_store: MlflowStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trial whose process died: RUNNING, last heartbeat older than the grace period.
    monkeypatch.setattr("liverseg.tuning.study.HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr("liverseg.tuning.study.HEARTBEAT_GRACE_S", 1)
    storage = open_storage(f"sqlite:///{tmp_path}/o.db")
    study = create_study(storage, "s", tiny_tune())
    exp_id = ensure_experiment(EXPERIMENT)
    run_id = MlflowClient().create_run(exp_id, run_name="trial-0").info.run_id
    trial = study.ask()
    trial.set_user_attr("mlflow_run_id", run_id)
    study.ask().set_user_attr("mlflow_run_id", "0" * 32)  # its run is gone: only a warning
    for t in study.trials:
        storage.record_heartbeat(t._trial_id)
    time.sleep(2.5)
    with pytest.warns(UserWarning, match="trial 1: could not end MLflow run 0000"):
        optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["state"] == "FAIL"


# ------------------------------------------------------------------------------ prepared data
@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "splits.json: not found"),
        ("{not json", "splits.json: not valid JSON"),
        ('{"test": []}', "splits.json: has no 'folds' list"),
    ],
)
def test_load_splits_rejects(tmp_path: Path, content: str | None, match: str) -> None:
    if content is not None:
        (tmp_path / "splits.json").write_text(content)
    with pytest.raises(DataError, match=match):
        load_splits(tmp_path)


def test_missing_fold_is_a_params_error(prepared: Path, mlflow_store: MlflowStore) -> None:
    with pytest.raises(ParamsError, match=r"tune.folds: fold\(s\) \[2\] do not exist"):
        make_objective(prepared, tiny_tune(folds=(0, 2)), TINY_TRAIN, experiment_id="0")


# ------------------------------------------------------------------------- scripted objective
def test_objective_reports_every_fold_epoch_and_averages_best_dice(
    prepared: Path, mlflow_store: MlflowStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fold 0: 0.5 then 0.6 (best 0.6); fold 1: 0.9 then 0.7 (best 0.9) -> value 0.75.
    curves = {0: [0.5, 0.6], 1: [0.9, 0.7]}
    tune = tiny_tune(n_trials=1, folds=(0, 1), seed=5)
    study, parent, calls = run_scripted(
        monkeypatch,
        prepared,
        tune,
        lambda lr, bs, fold: curves[fold],
        storage_url=f"sqlite:///{tmp_path}/o.db",
        train=dataclasses.replace(TINY_TRAIN, val_stride=3),
    )
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE
    assert trial.value == pytest.approx(0.75)
    assert trial.intermediate_values == pytest.approx({0: 0.5, 1: 0.6, 2: 0.9, 3: 0.7})
    # Same seeded start per fold for every trial, no early stopping, train's validation stride.
    # A fresh Keras session before each fold's training (so between trials too).
    assert calls == [
        {"clear_session": {"free_memory": True}},
        {"fold": 0, "seed": 5, "patience": None, "epochs": 2, "stride": 3},
        {"clear_session": {"free_memory": True}},
        {"fold": 1, "seed": 6, "patience": None, "epochs": 2, "stride": 3},
    ]
    run = trial_runs(parent)[0]
    assert run.info.run_name == "trial-0"
    assert run.info.status == "FINISHED"
    assert run.data.tags["state"] == "COMPLETE"
    assert run.data.params["learning_rate"] == repr(trial.params["learning_rate"])
    assert run.data.params["batch_size"] == str(trial.params["batch_size"])
    assert run.data.metrics["value"] == pytest.approx(0.75)
    assert run.data.metrics["fold_0_val_dice"] == pytest.approx(0.6)
    assert run.data.metrics["fold_1_val_dice"] == pytest.approx(0.9)
    # MLflow counts epochs from 1; Optuna's intermediate values stay at the 0-based steps
    assert val_dice_steps(run.info.run_id) == [(1, 0.5), (2, 0.6), (3, 0.9), (4, 0.7)]
    # the objective so far: fold 0's best, then the mean of fold 0's best and fold 1's so far
    objective = client_history(run.info.run_id, OBJECTIVE_METRIC)
    assert [step for step, _ in objective] == [1, 2, 3, 4]
    assert [v for _, v in objective] == pytest.approx([0.5, 0.6, 0.75, 0.75])
    assert objective[-1][1] == pytest.approx(run.data.metrics["value"])
    assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
    assert trial.user_attrs["worker"].endswith(f":{os.getpid()}")


# Trials 0 and 1 (batch 4, the pruner's two start-up trials) climb 0.6, 0.7, 0.8; trial 2
# (batch 8) 0.2, 0.3, 0.4: below their median at every step, so the median pruner stops it at
# the first step after warm-up.
@pytest.mark.parametrize(
    ("warmup", "epochs", "state", "steps"),
    [
        (0, 3, TrialState.PRUNED, [(1, 0.2)]),
        (1, 3, TrialState.PRUNED, [(1, 0.2), (2, 0.3)]),
        (2, 3, TrialState.PRUNED, [(1, 0.2), (2, 0.3), (3, 0.4)]),
        (3, 3, TrialState.COMPLETE, [(1, 0.2), (2, 0.3), (3, 0.4)]),
    ],
)
def test_median_pruner_prunes_after_warmup(
    prepared: Path,
    mlflow_store: MlflowStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    warmup: int,
    epochs: int,
    state: TrialState,
    steps: list[tuple[int, float]],
) -> None:
    curves = {4: [0.6, 0.7, 0.8], 8: [0.2, 0.3, 0.4]}
    tune = tiny_tune(n_trials=3, epochs=epochs, pruner_warmup_epochs=warmup)
    study, parent, calls = run_scripted(
        monkeypatch,
        prepared,
        tune,
        lambda lr, bs, fold: curves[bs],
        storage_url=f"sqlite:///{tmp_path}/o.db",
        enqueue=[
            {"learning_rate": 1e-2, "batch_size": 4},
            {"learning_rate": 2e-2, "batch_size": 4},
            {"learning_rate": 1e-2, "batch_size": 8},
        ],
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, state]
    runs = trial_runs(parent)
    assert runs[2].data.tags["state"] == state.name
    assert runs[2].info.status == "FINISHED"
    assert val_dice_steps(runs[2].info.run_id) == steps
    assert ("value" in runs[2].data.metrics) is (state == TrialState.COMPLETE)


@pytest.mark.parametrize(
    ("behaviour", "raises", "status"),
    [
        # NaN Dice: recorded FAIL and the study goes on (no error).
        ("nan", None, "FAILED"),
        # A bug: recorded FAIL, and the study stops with the error.
        ("error", RuntimeError, "FAILED"),
    ],
)
def test_failed_trials_end_their_runs(
    prepared: Path,
    mlflow_store: MlflowStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    behaviour: str,
    raises: type[BaseException] | None,
    status: str,
) -> None:
    def curve(lr: float, bs: int, fold: int) -> list[float]:
        if behaviour == "error":
            raise RuntimeError("boom")
        return [float("nan"), float("nan")]

    url = f"sqlite:///{tmp_path}/o.db"
    with pytest.raises(raises) if raises else contextlib.nullcontext():
        run_scripted(monkeypatch, prepared, tiny_tune(n_trials=1), curve, storage_url=url)
    study = optuna.load_study(study_name="study", storage=open_storage(url))
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    (run,) = trial_runs().values()
    assert run.data.tags["state"] == "FAIL"
    assert run.info.status == status


@pytest.mark.parametrize("where", ["training", "run creation"])
def test_sigterm_fails_the_trial_and_kills_its_run(
    prepared: Path,
    mlflow_store: MlflowStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    def curve(lr: float, bs: int, fold: int) -> list[float]:
        if where == "training":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # recorded, not raised here: training stops at its stop point
        return [0.5, 0.6]

    if where == "run creation":  # in MLflow's bookkeeping: recorded, raised in the training
        create = MlflowClient.create_run

        def create_and_signal(self: MlflowClient, *a: Any, **k: Any) -> Any:
            run = create(self, *a, **k)
            if str(k.get("run_name", "")).startswith("trial-"):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            return run

        monkeypatch.setattr(MlflowClient, "create_run", create_and_signal)
    url = f"sqlite:///{tmp_path}/o.db"
    previous = stop.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_scripted(monkeypatch, prepared, tiny_tune(n_trials=3), curve, storage_url=url)
    finally:
        stop.restore(previous)
    study = optuna.load_study(study_name="study", storage=open_storage(url))
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    (run,) = trial_runs().values()
    assert run.data.tags["state"] == "FAIL"
    assert run.info.status == "KILLED"


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_rerun_runs_only_the_missing_finished_trials(
    prepared: Path,
    mlflow_store: MlflowStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    url = f"sqlite:///{tmp_path}/o.db" if kind == "sqlite" else f"journal:{tmp_path}/o.log"
    curves = {4: [0.6, 0.7], 8: [0.2, 0.3]}

    def curve(lr: float, bs: int, fold: int) -> list[float]:
        return curves[bs]

    # Trial 2 is pruned (after the two start-up trials): COMPLETE + PRUNED = 4 finished.
    first = [
        {"learning_rate": lr, "batch_size": b}
        for lr, b in ((1e-2, 4), (2e-2, 4), (1e-2, 8), (3e-3, 4))
    ]
    study, _, _ = run_scripted(
        monkeypatch, prepared, tiny_tune(n_trials=4), curve, storage_url=url, enqueue=first
    )
    before = [(t.number, t.state, t.params, t.value) for t in study.trials]
    assert [s for _, s, _, _ in before] == [
        TrialState.COMPLETE,
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.COMPLETE,
    ]
    # Same n_trials: nothing left to run.
    study, _, calls = run_scripted(
        monkeypatch, prepared, tiny_tune(n_trials=4), curve, storage_url=url
    )
    assert calls == [] and len(study.trials) == 4
    # Two more wanted: exactly two new trials, numbered after the old ones.
    study, _, _ = run_scripted(monkeypatch, prepared, tiny_tune(n_trials=6), curve, storage_url=url)
    after = [(t.number, t.state, t.params, t.value) for t in study.trials]
    assert after[:4] == before
    assert [n for n, *_ in after] == [0, 1, 2, 3, 4, 5]
    assert count_finished(study) == 6


def test_summary_needs_a_complete_trial(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/o.db", direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.PRUNED,
            params={"learning_rate": 1e-3, "batch_size": 4},
            distributions={
                "learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                "batch_size": optuna.distributions.CategoricalDistribution([4, 8]),
            },
            intermediate_values={0: 0.1},
        )
    )
    with pytest.raises(TuningError, match=r"no trial completed \(1 pruned, 0 failed"):
        summarize(study)


def _study_with(values: list[tuple[float, int, float | None]]) -> optuna.Study:
    """In-memory study of (lr, batch size, value or None = pruned) trials."""
    study = optuna.create_study(direction="maximize")
    dists = {
        "learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "batch_size": optuna.distributions.CategoricalDistribution([4, 8]),
    }
    for lr, bs, v in values:
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE if v is not None else TrialState.PRUNED,
                value=v,
                params={"learning_rate": lr, "batch_size": bs},
                distributions=dists,
                intermediate_values={0: v if v is not None else 0.0},
            )
        )
    return study


@pytest.mark.parametrize(
    ("trials", "best", "counts", "plots"),
    [
        (
            [(1e-3, 4, 0.5), (1e-2, 8, 0.8), (3e-2, 4, 0.6), (2e-3, 8, None)],
            {"learning_rate": 1e-2, "batch_size": 8, "trial_number": 1, "value": 0.8},
            {"n_complete": 3, "n_pruned": 1, "n_failed": 0},
            {
                "optimization_history.png": "ok",
                "param_importances.png": "ok",
                "slice.png": "ok",
                "contour.png": "ok",
            },
        ),
        (
            [(1e-3, 4, 0.5), (1e-2, 8, None)],
            {"learning_rate": 1e-3, "batch_size": 4, "trial_number": 0, "value": 0.5},
            {"n_complete": 1, "n_pruned": 1, "n_failed": 0},
            {
                "optimization_history.png": "ok",
                "param_importances.png": "needs >= 2 complete trials",
                "slice.png": "ok",
                "contour.png": "needs >= 2 distinct values of each parameter",
            },
        ),
    ],
)
def test_write_report(
    tmp_path: Path,
    trials: list[tuple[float, int, float | None]],
    best: dict[str, Any],
    counts: dict[str, int],
    plots: dict[str, str],
) -> None:
    study = _study_with(trials)
    out = tmp_path / "reports" / "tune"
    out.mkdir(parents=True)
    (out / "stale.png").write_text("old")
    summary, status = write_report(study, out, seed=0)
    expected = {**best, "study_name": study.study_name, **counts}
    assert summary == pytest.approx(expected)
    assert json.loads((out / "best_params.json").read_text()) == summary
    assert status == plots
    drawn = {name for name, s in plots.items() if s == "ok"}
    assert {p.name for p in out.iterdir()} == {"best_params.json", *drawn}
    for name in drawn:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plot_that_fails_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optuna.visualization import matplotlib as vis

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("no plot today")

    monkeypatch.setattr(vis, "plot_slice", broken)
    summary, status = write_report(
        _study_with([(1e-3, 4, 0.5), (1e-2, 8, 0.8)]), tmp_path / "out", seed=0
    )
    assert status["slice.png"] == "failed: RuntimeError: no plot today"
    assert status["optimization_history.png"] == "ok"
    assert (tmp_path / "out" / "best_params.json").is_file()
    assert not (tmp_path / "out" / "slice.png").exists()


# ---------------------------------------------------------------------------- stage arguments
@pytest.mark.parametrize(
    ("extra", "prepared_name", "error", "match"),
    [
        (["--out", "r", "--workers", "0"], "prepared", ParamsError, "--workers must be >= 1"),
        ([], "prepared", ParamsError, "--out is required"),
        (["--out", "r"], "missing", DataError, "missing/splits.json: not found"),
        (["--out", "r", "--storage", "redis://h/0"], "prepared", ParamsError, "tune.storage"),
    ],
)
def test_stage_rejects(
    prepared: Path,
    mlflow_store: MlflowStore,
    tmp_path: Path,
    extra: list[str],
    prepared_name: str,
    error: type[Exception],
    match: str,
) -> None:
    from liverseg.cli import build_parser
    from liverseg.stages import tune as stage

    params = write_params(tmp_path / "params.yaml", tiny_tune())
    folder = tmp_path / prepared_name
    argv = ["tune", "--prepared", str(folder), "--params", str(params), *extra]
    with pytest.raises(error, match=match):
        stage.main(build_parser("tune").parse_args(argv))


# ------------------------------------------------------------------------ real training (slow)
@pytest.mark.slow
def test_real_training_study_and_forced_prune(
    prepared: Path, mlflow_store: MlflowStore, tmp_path: Path
) -> None:
    tune = tiny_tune(n_trials=2, epochs=2)
    storage = open_storage(f"sqlite:///{tmp_path}/o.db")
    exp_id = ensure_experiment(EXPERIMENT)
    client = MlflowClient()
    parent = client.create_run(exp_id, run_name="study-real").info.run_id
    objective = make_objective(
        prepared, tune, TINY_TRAIN, experiment_id=exp_id, parent_run_id=parent
    )
    study = create_study(storage, "real", tune)
    assert isinstance(study.pruner.inner, optuna.pruners.MedianPruner)
    optimize(study, objective, tune)
    assert count_finished(study) == 2
    assert study.trials[0].state == TrialState.COMPLETE  # nothing to compare with yet
    assert 0.0 <= study.trials[0].value <= 1.0
    runs = trial_runs(parent)
    assert sorted(runs) == [0, 1]
    for t in study.trials:
        assert runs[t.number].data.tags["state"] == t.state.name
        assert runs[t.number].info.status == "FINISHED"
        assert [s - 1 for s, _ in val_dice_steps(runs[t.number].info.run_id)] == sorted(
            t.intermediate_values
        )
    assert val_dice_steps(runs[0].info.run_id) == [
        (s + 1, round(v, 6)) for s, v in sorted(study.trials[0].intermediate_values.items())
    ]
    summary, _ = write_report(study, tmp_path / "report", seed=0)
    assert summary["value"] == pytest.approx(study.best_value)

    # A pruner that prunes any Dice (< 1.01) after the first epoch: Keras must stop there.
    forced = create_study(
        storage, "forced", tune, pruner=optuna.pruners.ThresholdPruner(lower=1.01)
    )
    parent2 = client.create_run(exp_id, run_name="study-forced").info.run_id
    objective2 = make_objective(
        prepared,
        tiny_tune(n_trials=1, epochs=2),
        TINY_TRAIN,
        experiment_id=exp_id,
        parent_run_id=parent2,
    )
    optimize(forced, objective2, tiny_tune(n_trials=1, epochs=2))
    (trial,) = forced.trials
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]
    run = trial_runs(parent2)[0]
    assert run.data.tags["state"] == "PRUNED"
    assert run.info.status == "FINISHED"
    assert [s for s, _ in val_dice_steps(run.info.run_id)] == [1]
    assert run.data.metrics["loss"] > 0  # Keras' own epoch metrics are logged too


# ------------------------------------------------------------------------- processes (slow)
def write_params(path: Path, tune: TuneParams) -> Path:
    data = {
        "tune": as_flat_dict(tune),
        "train": {
            "model": as_flat_dict(TINY_TRAIN.model),
            "augment": as_flat_dict(TINY_TRAIN.augment),
            "experiment": EXPERIMENT,
        },
    }
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "liverseg.cli", "tune", *args]


def env_for(tracking: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking, "TF_CPP_MIN_LOG_LEVEL": "3"}


def load(url: str) -> optuna.Study:
    storage = open_storage(url)
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def assert_runs_match_trials(study: optuna.Study) -> dict[int, Any]:
    """Every trial has exactly one MLflow run whose tag is its state; none is RUNNING."""
    runs = trial_runs()
    assert sorted(runs) == [t.number for t in study.trials]
    for t in study.trials:
        assert t.state != TrialState.RUNNING
        run = runs[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert run.data.tags["state"] == t.state.name
        assert run.info.status == ("FINISHED" if t.state != TrialState.FAIL else "KILLED")
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    assert not MlflowClient().search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    return runs


def finished_trials(db: Path, states: tuple[str, ...] = ("COMPLETE", "PRUNED")) -> int:
    """Trials in ``states`` (default: finished ones) in an Optuna SQLite file, read-only (0
    before it exists)."""
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as c:
            marks = ", ".join("?" * len(states))
            query = f"SELECT count(*) FROM trials WHERE state IN ({marks})"
            return int(c.execute(query, states).fetchone()[0])
    except sqlite3.OperationalError:  # tables not created yet
        return 0


@pytest.mark.slow
def test_sigterm_at_any_moment_of_a_study_leaves_nothing_running(
    prepared: Path, mlflow_store: MlflowStore, tmp_path: Path
) -> None:
    """SIGTERM at moments spread over the first trials (asking, training, telling, the next
    generation): every time exit 143 and the resume hint, no trial and no MLflow run left
    RUNNING, each trial's run tagged with the trial's state, no report written. Where each
    signal lands depends on the machine; what must hold does not. (Before three fixes, 11 of 20
    such runs broke it: exit 0 after a trial, or a trial left RUNNING.)"""
    for i, delay in enumerate((0.0, 0.5, 1.2, 2.0, 3.0)):
        url = f"sqlite:///{tmp_path}/optuna-{i}.db"
        db = Path(url.removeprefix("sqlite:///"))
        params = write_params(
            tmp_path / f"params-{i}.yaml", tiny_tune(n_trials=50, epochs=1, storage=url)
        )
        out = tmp_path / f"reports-{i}"
        cmd = cli("--prepared", str(prepared), "--out", str(out), "--params", str(params))
        proc = subprocess.Popen(
            cmd,
            env=env_for(mlflow_store.uri),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 150
        try:
            while not finished_trials(db, ("RUNNING", "COMPLETE", "PRUNED", "FAIL")):
                assert proc.poll() is None and time.monotonic() < deadline, "no trial started"
                time.sleep(0.05)
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=120)
        where = f"SIGTERM {delay} s after the first trial was asked:\n{output[-2000:]}"
        assert proc.returncode == 128 + signal.SIGTERM, where
        assert "run the same command again to resume" in output, where
        study = load(url)
        assert study.trials, where
        client = MlflowClient()
        for t in study.trials:
            assert t.state != TrialState.RUNNING, where
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id:  # a trial stopped before its training has no run
                assert client.get_run(run_id).data.tags["state"] == t.state.name, where
        assert not client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'"
        ), where
        assert not out.exists(), where


@pytest.mark.slow
def test_killed_study_resumes_with_its_trials(
    prepared: Path, mlflow_store: MlflowStore, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/optuna/optuna.db"
    params = write_params(tmp_path / "params.yaml", tiny_tune(n_trials=50, epochs=1, storage=url))
    out = tmp_path / "reports" / "tune"
    cmd = cli("--prepared", str(prepared), "--out", str(out), "--params", str(params))
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        cmd, env=env_for(mlflow_store.uri), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 150
    try:
        while True:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            if finished_trials(Path(url.removeprefix("sqlite:///"))):
                break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        log.close()
    first_log = (tmp_path / "first.log").read_text()
    assert rc == 128 + signal.SIGTERM, first_log[-3000:]
    assert "interrupted" in first_log and "run the same command again to resume" in first_log
    study = load(url)
    assert_runs_match_trials(study)
    assert not out.exists()
    before = [(t.number, t.state, t.params, t.value) for t in study.trials]
    n_done = count_finished(study)

    write_params(params, tiny_tune(n_trials=n_done + 1, epochs=1, storage=url))
    res = subprocess.run(
        cmd,
        env=env_for(mlflow_store.uri),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    study = load(url)
    after = [(t.number, t.state, t.params, t.value) for t in study.trials]
    assert after[: len(before)] == before
    assert [n for n, *_ in after] == list(range(len(after)))
    assert count_finished(study) == n_done + 1
    assert_runs_match_trials(study)
    best = json.loads((out / "best_params.json").read_text())
    assert best["study_name"] == study.study_name
    assert best["n_complete"] + best["n_pruned"] == n_done + 1
    assert best["value"] == pytest.approx(study.best_value)


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(
    prepared: Path, mlflow_store: MlflowStore, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/optuna/optuna.db"
    params = write_params(tmp_path / "params.yaml", tiny_tune(n_trials=4, epochs=1, storage=url))
    out = tmp_path / "reports" / "tune"
    cmd = cli("--prepared", str(prepared), "--out", str(out), "--params", str(params))
    res = subprocess.run(
        [*cmd, "--workers", "2"],
        env=env_for(mlflow_store.uri),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "database is locked" not in res.stdout + res.stderr
    study = load(url)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))
    assert count_finished(study) >= 4
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2, workers
    runs = assert_runs_match_trials(study)
    # All trial runs hang under the one parent run of the invocation, which has the result.
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    (parent,) = MlflowClient().search_runs([exp.experiment_id], "tags.kind = 'study'")
    assert parent.info.run_name == f"study-{study.study_name}"
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    best = json.loads((out / "best_params.json").read_text())
    assert parent.data.metrics["best_value"] == pytest.approx(best["value"])
    assert parent.data.params["best_batch_size"] == str(best["batch_size"])
    logged = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "tune")}
    assert logged == {f"tune/{p.name}" for p in out.iterdir()}


def _initdb() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail(
            "PostgreSQL server not installed (/usr/lib/postgresql/*/bin/initdb missing): "
            "apt-get install -y postgresql"
        )
    return Path(found[-1])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL server on 127.0.0.1 with database ``optuna``.

    initdb refuses root, so as root the server runs as the ``postgres`` user, in a folder
    under /tmp that it owns (pytest's tmp_path is private to root).
    """
    bindir = _initdb().parent
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="liverseg-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"

    def pg(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)

    started = False
    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(base / "log"),
            "-o",
            opts,
            "-w",
            "start",
        )
        started = True
        pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna")
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        if started:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_worker_processes_share_a_postgresql_study(
    prepared: Path, mlflow_store: MlflowStore, tmp_path: Path, postgres_url: str
) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_tune(n_trials=4, epochs=1))
    # The experiment exists before both workers start (no race to create it).
    ensure_experiment(EXPERIMENT, tmp_path / "artifacts")
    cmd = cli("--prepared", str(prepared), "--params", str(params), "--worker-only")
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(2)]
    procs = [
        subprocess.Popen(
            [*cmd, "--storage", postgres_url],
            env=env_for(mlflow_store.uri),
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for log in logs
    ]
    codes = [p.wait(timeout=400) for p in procs]
    for log in logs:
        log.close()
    assert codes == [0, 0], [(tmp_path / f"worker{i}.log").read_text()[-2000:] for i in range(2)]
    study = load(postgres_url)
    expected_name = study_name(content_hash(prepared), tiny_tune(epochs=1), TINY_TRAIN)
    assert study.study_name == expected_name
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))
    assert count_finished(study) >= 4
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert workers == {f"{socket.gethostname()}:{p.pid}" for p in procs}
    assert_runs_match_trials(study)
    # --worker-only writes no report but each worker has its own parent run.
    assert not (tmp_path / "reports").exists()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    parents = MlflowClient().search_runs([exp.experiment_id], "tags.kind = 'study'")
    assert len(parents) == 2
    assert {p.data.tags["role"] for p in parents} == {"worker"}
