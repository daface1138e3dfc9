"""The objective: one trial trains a fresh U-Net on each fold of ``tune.folds`` and returns the
mean of the folds' best validation Dice; each trial has its own MLflow run.

Pruning steps: epoch ``e`` (from 0) of the ``i``-th fold of ``tune.folds`` is step
``i * tune.epochs + e``. The trial's run ``trial-<n>`` (nested under ``parent_run_id``) holds
params ``learning_rate`` and ``batch_size``, the fold runs' per-epoch metrics at those steps
plus one, led by ``objective_val_dice`` (the trial's value so far), the final ``value`` and
tag ``state``; it ends FINISHED (COMPLETE, PRUNED), FAILED (FAIL) or KILLED (a stop).
TensorFlow is imported only when the objective is made.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import FrozenTrial, TrialState

from liverseg import runguard
from liverseg.data.prepared import load_splits
from liverseg.data.splits import fold_cases
from liverseg.errors import ParamsError
from liverseg.params import TrainParams, TuneParams
from liverseg.tracking import NOTE_TAG
from liverseg.tuning.best_params import PARAM_BATCH, PARAM_LR

# Logged first in every epoch's batch: MLflow's compare view plots the first shared metric.
OBJECTIVE_METRIC = "objective_val_dice"

STATE_TAG = "state"  # MLflow tag of a trial run: its Optuna state
progress = logging.getLogger("liverseg.progress")


class TrialDiverged(Exception):
    """Training produced no finite validation Dice (e.g. a learning rate too high)."""


def search_space_failures() -> tuple[type[Exception], ...]:
    """Trial errors that are results about the search space (diverged, out of memory): the
    trial is FAIL and the study goes on."""
    import tensorflow as tf

    return (TrialDiverged, tf.errors.ResourceExhaustedError)


class TrialReporter:
    """Reports each epoch's ``val_dice`` to the trial and keeps the trial's value so far. When
    the pruner says so, training stops with :attr:`pruned_step` set; the objective then raises
    ``TrialPruned`` outside Keras."""

    def __init__(
        self, trial: optuna.Trial, step_offset: int, prior: list[float] | None = None
    ) -> None:
        self.trial = trial
        self.step_offset = step_offset
        self.prior = list(prior or [])
        self.pruned_step: int | None = None
        self.last_value = math.nan
        self.best = math.nan

    def objective_metric(self, values: dict[str, float]) -> dict[str, float]:
        """``{OBJECTIVE_METRIC: mean of the earlier folds' bests and this fold's best so
        far}``; empty while this fold has no finite ``val_dice`` yet."""
        current = values.get("val_dice", math.nan)
        if math.isfinite(current) and not current <= self.best:
            self.best = current
        if not math.isfinite(self.best):
            return {}
        return {OBJECTIVE_METRIC: float(np.mean([*self.prior, self.best]))}

    def keras_callback(self) -> Any:
        """A Keras callback that reports each epoch's ``val_dice`` to the trial (NaN when
        missing, which every Optuna pruner prunes) and stops training when told to prune."""
        import keras

        def on_epoch_end(epoch: int, logs: dict[str, Any] | None = None) -> None:
            step = self.step_offset + epoch
            self.last_value = float((logs or {}).get("val_dice", math.nan))
            self.trial.report(self.last_value, step)
            if self.trial.should_prune():
                self.pruned_step = step
                callback.model.stop_training = True

        callback = keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)
        return callback


def end_trial_run(client: MlflowClient, run_id: str, state: str, status: str) -> None:
    """Tag the trial's run with its Optuna state and end it with ``status``."""
    try:
        client.set_tag(run_id, STATE_TAG, state)
    finally:
        client.set_terminated(run_id, status=status)


def end_stale_trial_run(study: optuna.Study, trial: FrozenTrial) -> None:
    """Heartbeat callback: a trial whose process died is FAIL; end its MLflow run too."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    try:
        end_trial_run(MlflowClient(), str(run_id), TrialState.FAIL.name, "KILLED")
    except Exception as exc:  # a missing run must not stop the worker that noticed it
        warnings.warn(
            f"trial {trial.number}: could not end MLflow run {run_id}: {exc}", stacklevel=2
        )


def make_objective(
    prepared: Path,
    tune: TuneParams,
    train: TrainParams,
    *,
    experiment_id: str,
    parent_run_id: str | None = None,
) -> Callable[[optuna.Trial], float]:
    """The objective (see the module docstring); every fold's training starts from the same
    seeded initialisation (``tune.seed + fold``), so trials differ only by their parameters."""
    import keras

    from liverseg.data.prepared import load_prepared
    from liverseg.training.fit import MlflowEpochLogger, fit

    client = MlflowClient()
    splits = load_splits(prepared)
    n_folds = len(splits["folds"])
    bad = [f for f in tune.folds if f >= n_folds]
    if bad:
        raise ParamsError(
            f"params: tune.folds: fold(s) {bad} do not exist; {prepared}/splits.json has "
            f"{n_folds} folds (0..{n_folds - 1})"
        )
    data: dict[int, tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {}
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def fold_data(fold: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        if fold not in data:
            train_ids, val_ids = fold_cases(splits, fold)
            data[fold] = (load_prepared(prepared, train_ids), load_prepared(prepared, val_ids))
        return data[fold]

    def objective(trial: optuna.Trial) -> float:
        # First: whoever finds this trial RUNNING after a SIGKILL can then prove it dead.
        trial.set_user_attr("process", runguard.process_tags())
        lr = trial.suggest_float(PARAM_LR, tune.lr_min, tune.lr_max, log=True)
        batch_size = int(trial.suggest_categorical(PARAM_BATCH, list(tune.batch_sizes)))
        tags = {
            "study_name": trial.study.study_name,
            "trial_number": str(trial.number),
            "worker": worker,
            "kind": "trial",
            STATE_TAG: TrialState.RUNNING.name,
            **runguard.process_tags(),
        }
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        tags[NOTE_TAG] = f"Trial {trial.number}: lr {lr:.3g}, batch {batch_size}"
        run_id = client.create_run(
            experiment_id, run_name=f"trial-{trial.number}", tags=tags
        ).info.run_id
        state, status = TrialState.FAIL.name, "FAILED"
        t0 = time.perf_counter()
        value = math.nan
        try:
            trial.set_user_attr("worker", worker)
            trial.set_user_attr("mlflow_run_id", run_id)
            params = {PARAM_LR: repr(lr), PARAM_BATCH: str(batch_size), "epochs": str(tune.epochs)}
            params["folds"] = ",".join(map(str, tune.folds))
            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            fold_values: dict[int, float] = {}
            for pos, fold in enumerate(tune.folds):
                reporter = TrialReporter(
                    trial, step_offset=pos * tune.epochs, prior=list(fold_values.values())
                )
                logger = MlflowEpochLogger(
                    run_id, client, step_offset=pos * tune.epochs, first=reporter.objective_metric
                )
                train_xy, val_xy = fold_data(fold)
                # Free what the previous trial or fold left (fit's reused compiled model stays).
                keras.backend.clear_session(free_memory=True)
                res = fit(
                    train_xy,
                    val_xy,
                    train.spec,
                    learning_rate=lr,
                    batch_size=batch_size,
                    epochs=tune.epochs,
                    seed=tune.seed + fold,
                    patience=None,
                    distribute=train.distribute,
                    callbacks=[logger, reporter.keras_callback()],
                    progress=f"tune: trial {trial.number} fold-{fold}",
                    val_stride=train.val_stride,
                )
                if reporter.pruned_step is not None:
                    raise optuna.TrialPruned(
                        f"fold {fold}, epoch {reporter.pruned_step - pos * tune.epochs + 1}: "
                        f"val_dice {reporter.last_value:.4f}"
                    )
                best = max(filter(math.isfinite, res.history.get("val_dice", [])), default=None)
                if best is None:
                    raise TrialDiverged(
                        f"trial {trial.number}: fold {fold} has no finite val_dice "
                        f"(learning rate {lr:.3g}, batch size {batch_size})"
                    )
                fold_values[fold] = best
            value = float(np.mean(list(fold_values.values())))
            now = int(time.time() * 1000)
            final = [Metric("value", value, now, 0)]
            final += [Metric(f"fold_{f}_val_dice", v, now, 0) for f, v in fold_values.items()]
            client.log_batch(run_id, metrics=final, synchronous=True)
            state, status = TrialState.COMPLETE.name, "FINISHED"
            return value
        except optuna.TrialPruned:
            state, status = TrialState.PRUNED.name, "FINISHED"
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:  # (fit has waited for its epochs' queued MLflow writes)
            end_trial_run(client, run_id, state, status)
            progress.info(
                f"tune: trial {trial.number} {state}: value {value:.4f} (lr {lr:.2e}, "
                f"batch {batch_size}) {time.perf_counter() - t0:.0f} s"
            )

    return objective
