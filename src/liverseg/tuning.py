"""Optuna study over the learning rate and batch size of the U-Net that ``train`` trains.

A trial suggests a learning rate (log-uniform in ``[tune.lr_min, tune.lr_max]``) and a batch
size (categorical over ``tune.batch_sizes``), then trains a fresh U-Net for ``tune.epochs``
epochs (no early stopping) on each fold of ``tune.folds`` in turn. Architecture, loss,
augmentation and precision come from the ``train`` section, so the tuned values fit the model
that ``train`` builds. The trial's value is the mean over its folds of the best epoch's
validation Dice (pooled 2-D Dice, as ``train`` selects its epoch by); the study maximises it.

Arrays follow the pipeline contract of :func:`liverseg.training.dataset.load_prepared`:
``(N, H, W, 1)`` float32 images in [0, 1] and 0/1 masks; a fold's slices stay in memory for
every trial this process runs.

Pruning steps: the validation Dice of epoch ``e`` (0-based) of the ``i``-th fold in
``tune.folds`` is reported at step ``i * tune.epochs + e``, so with one fold the step is the
epoch and every trial's steps line up for the median pruner.

Study identity: the study's name hashes everything that defines the objective (the prepared
data's content hash, search space, folds, epochs, seed and the train section's model, loss,
augmentation and precision). Changed inputs start a new study in the same storage; rerunning on
the same inputs loads the study and runs only the trials still missing to ``tune.n_trials``
finished (COMPLETE + PRUNED) ones, so an interrupted run resumes. Several processes, on one
machine or many, can optimise one study at once through a shared storage.

MLflow layout (the tracking URI is the caller's): each trial is a run ``trial-<n>`` nested
under a parent run (``parent_run_id``), with params ``learning_rate`` and ``batch_size``, the
Keras epoch metrics at the steps above plus one (MLflow counts epochs from 1, as the fold runs
do), ``objective_val_dice`` (the trial's value so far, see :class:`TrialReporter`), the final
``value``, a description and tag ``state`` =
COMPLETE / PRUNED / FAIL. Its status is FINISHED for COMPLETE and PRUNED, FAILED for FAIL and
KILLED when the process was interrupted; it is never left RUNNING by an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import FrozenTrial, TrialState

from liverseg import runguard
from liverseg.data.splits import fold_cases, load_splits
from liverseg.errors import LiversegError, ParamsError
from liverseg.fsutil import atomic_dir, write_json
from liverseg.params import TrainParams, TuneParams, as_flat_dict
from liverseg.training.tracking import NOTE_TAG

# Bump when the objective's definition changes (what is measured, not its inputs): a new
# version starts new studies instead of mixing incomparable values into old ones.
OBJECTIVE_VERSION = 1
STUDY_PREFIX = "liverseg-"
NAME_HASH_CHARS = 12

PARAM_LR = "learning_rate"
# The trial's objective as an MLflow metric, logged first in every epoch's batch: the UI's
# compare view plots the runs' first shared metric against their params.
OBJECTIVE_METRIC = "objective_val_dice"
PARAM_BATCH = "batch_size"
# Trials that count towards tune.n_trials: a failed trial is retried, not counted.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

# Two unpruned trials: the parameter-importance plot needs at least two complete trials, and a
# median over one trial prunes everything that is not better than a single random draw. More
# would leave little pruning in the few trials a CPU budget allows (params.yaml: 4).
MEDIAN_PRUNER_STARTUP_TRIALS = 2

# SQLite lets one writer in at a time; the others wait up to this long instead of failing with
# "database is locked" (a trial writes a handful of rows per epoch, far below this).
SQLITE_BUSY_TIMEOUT_S = 60
# RDB storages: a running trial writes a heartbeat this often; a trial whose heartbeat is older
# than the grace period (its process was killed or its machine died) is marked FAIL by the
# next worker that starts a trial, so it does not stay RUNNING forever.
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120
# Workers starting together on a fresh database may race to create Optuna's tables.
STORAGE_OPEN_ATTEMPTS = 5
STORAGE_RETRY_S = 0.5

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
JOURNAL_PREFIX = "journal:"

# MLflow tag of a trial run: its Optuna state (RUNNING until the trial ends).
STATE_TAG = "state"

# One line per trial epoch and per trial (the CLI sends it to stderr).
progress = logging.getLogger("liverseg.progress")


class TuningError(LiversegError):
    """The study cannot be opened or has no usable result (the message says which study)."""


class TrialDiverged(Exception):
    """Training produced no finite validation Dice (e.g. a learning rate too high).

    The trial is recorded FAIL and the study goes on: a diverging learning rate is a result
    about the search space, not a bug.
    """


# ------------------------------------------------------------------------------- interrupts
class StopSignal:
    """Turns SIGINT/SIGTERM into a ``KeyboardInterrupt`` only where that is safe.

    A ``KeyboardInterrupt`` raised inside Optuna's or MLflow's bookkeeping (asking for a
    trial, telling its result, ending its run) would leave a trial or a run RUNNING for good.
    So inside :meth:`critical` sections a signal only sets :attr:`requested`; it is raised
    as ``KeyboardInterrupt`` on entering or returning to an :meth:`interruptible` section
    (e.g. the training of a trial, where the objective records the trial FAIL and its run
    KILLED). :func:`optimize` is critical except for the objective's training, and stops
    starting trials once a stop is requested.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum = int(signal.SIGINT)
        self._interruptible = True

    def handler(self, signum: int, frame: Any) -> None:
        if not self.requested:
            self.signum = signum
            runguard.note_interrupt()
        self.requested = True
        if self._interruptible and not runguard.retry_outside_tensorflow(signum, frame):
            raise runguard.Interrupted(signum)

    def raise_if_requested(self) -> None:
        if self.requested:
            raise runguard.Interrupted(self.signum)

    @contextlib.contextmanager
    def _mode(self, interruptible: bool) -> Iterator[None]:
        previous = self._interruptible
        self._interruptible = interruptible
        try:
            if interruptible:
                self.raise_if_requested()
            yield
        finally:
            self._interruptible = previous
        if previous:
            self.raise_if_requested()

    def interruptible(self) -> contextlib.AbstractContextManager[None]:
        """A section that a signal may interrupt at once."""
        return self._mode(True)

    def critical(self) -> contextlib.AbstractContextManager[None]:
        """A section that a signal must not interrupt; a stop waits for its end."""
        return self._mode(False)

    @contextlib.contextmanager
    def installed(
        self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
    ) -> Iterator[None]:
        """Handle ``signals`` with :meth:`handler` (main thread only), restored on exit."""
        previous = {s: signal.signal(s, self.handler) for s in signals}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _section(
    stop: StopSignal | None, interruptible: bool
) -> contextlib.AbstractContextManager[None]:
    if stop is None:
        return contextlib.nullcontext()
    return stop.interruptible() if interruptible else stop.critical()


# ----------------------------------------------------------------------------- study identity
def study_inputs(data_hash: str, tune: TuneParams, train: TrainParams) -> dict[str, Any]:
    """Everything that defines the objective's values, as plain JSON-able data.

    Not included, on purpose: ``tune.n_trials`` and ``tune.timeout_s`` (raising them extends
    the same study), ``tune.storage`` (where the study lives), the pruner's warm-up (decides
    which trials stop early, not what a finished trial measures), and the train section's own
    learning rate, batch size, epochs and patience (tuning replaces or does not use them).
    """
    return {
        "objective_version": OBJECTIVE_VERSION,
        "data_sha256": data_hash,
        "search_space": {
            PARAM_LR: [tune.lr_min, tune.lr_max, "log"],
            PARAM_BATCH: list(tune.batch_sizes),
        },
        "folds": list(tune.folds),
        "epochs": tune.epochs,
        "seed": tune.seed,
        "train": {
            "model": as_flat_dict(train.model),
            "loss": train.loss,
            "augment": as_flat_dict(train.augment),
            "precision": train.precision,
        },
    }


def study_name(data_hash: str, tune: TuneParams, train: TrainParams) -> str:
    """``liverseg-<12 hex>``: a short hash of :func:`study_inputs`."""
    blob = json.dumps(study_inputs(data_hash, tune, train), sort_keys=True)
    return STUDY_PREFIX + hashlib.sha256(blob.encode()).hexdigest()[:NAME_HASH_CHARS]


# ------------------------------------------------------------------------------------ storage
def redact(url: str) -> str:
    """``url`` without its password, for logs, tags and error messages."""
    if url.startswith(JOURNAL_PREFIX):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL has no password we could find either
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage that ``url`` (``tune.storage``) names.

    * ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``: one machine, several
      processes (writers wait for the lock up to ``SQLITE_BUSY_TIMEOUT_S``);
    * ``postgresql://user:pw@host:port/db``, ``mysql://...``: many machines;
    * ``journal:PATH``: an append-only log file, for many machines on a shared file system
      (NFS) where SQLite's locking is unreliable.
    """
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX) :])
        if not str(path) or str(path) == ".":
            raise ParamsError(f"params: tune.storage: {url!r}: journal: needs a file path")
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))

    scheme = url.split(":", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in RDB_SCHEMES:
        raise ParamsError(
            f"params: tune.storage: {redact(url)!r} is not a study storage; use "
            "sqlite:///PATH, postgresql://USER:PW@HOST:PORT/DB, mysql://... or journal:PATH"
        )
    url = _with_installed_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if scheme == "sqlite":
        path_part = url.split("///", 1)[1] if "///" in url else ""
        db_path = path_part.split("?", 1)[0]
        if not db_path or db_path == ":memory:":
            raise ParamsError(
                f"params: tune.storage: {url!r}: needs a database file (sqlite:///PATH); an "
                "in-memory database cannot be shared or resumed"
            )
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}

    import sqlalchemy.exc

    last: Exception | None = None
    for attempt in range(STORAGE_OPEN_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=HEARTBEAT_GRACE_S,
                    heartbeat_stale_trial_callback=end_stale_trial_run,
                )
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            last = exc
            time.sleep(STORAGE_RETRY_S * (attempt + 1))
    raise TuningError(
        f"tune.storage {redact(url)}: cannot open the study storage after "
        f"{STORAGE_OPEN_ATTEMPTS} attempts: {last}"
    )


def _with_installed_driver(url: str) -> str:
    """``postgresql://`` with the psycopg2 driver when psycopg 3 is not installed.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3; the project installs
    psycopg2 (``psycopg2-binary``), so without this the documented URL would not load.
    An explicit ``postgresql+DRIVER://`` is left alone.
    """
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def sampler_seed(seed: int, worker_index: int, n_existing: int) -> int:
    """The TPE sampler's seed for one worker joining a study that has ``n_existing`` trials.

    A fresh study's first worker uses ``seed`` itself. Any other worker, or a resumed study,
    gets a seed derived from all three, because a sampler re-seeded with ``seed`` would draw
    the same first (random start-up) points again: parallel workers would all evaluate the
    same learning rates, and a resumed study would repeat its first trials.
    """
    if worker_index == 0 and n_existing == 0:
        return seed
    return int(np.random.SeedSequence([seed, worker_index, n_existing]).generate_state(1)[0])


def create_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    tune: TuneParams,
    *,
    worker_index: int = 0,
    pruner: optuna.pruners.BasePruner | None = None,
    inputs: dict[str, Any] | None = None,
) -> optuna.Study:
    """Create or load (``load_if_exists``) the maximising study ``name`` in ``storage``.

    ``pruner`` defaults to the median pruner with ``tune.pruner_warmup_epochs`` warm-up steps;
    ``inputs`` (:func:`study_inputs`) is stored as a study attribute the first time.
    """
    if pruner is None:
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=MEDIAN_PRUNER_STARTUP_TRIALS,
            n_warmup_steps=tune.pruner_warmup_epochs,
        )
    try:
        study_id = storage.get_study_id_from_name(name)
        n_existing = len(storage.get_all_trials(study_id, deepcopy=False))
    except KeyError:  # a new study
        n_existing = 0
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=sampler_seed(tune.seed, worker_index, n_existing)),
        pruner=pruner,
    )
    if inputs is not None and "inputs" not in study.user_attrs:
        study.set_user_attr("inputs", inputs)
    return study


def count_trials(study: optuna.Study) -> dict[str, int]:
    """Number of trials per state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    return counts


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards ``tune.n_trials`` (COMPLETE + PRUNED)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


# ------------------------------------------------------------------------------------- MLflow
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


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL (and their MLflow runs KILLED) the RUNNING trials whose process is provably
    dead (:func:`liverseg.runguard.is_dead`), without waiting for the heartbeat; their numbers.
    """
    dead = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if runguard.is_dead(t.user_attrs.get("process") or {})
    ]
    for t in dead:
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        end_stale_trial_run(study, t)
    return [t.number for t in dead]


# ---------------------------------------------------------------------------------- objective
class TrialReporter:
    """Reports each epoch's ``val_dice`` to the trial and logs the epoch's metrics to MLflow.

    Plain Python so that this module imports without TensorFlow; :func:`keras_callback` wraps
    it for ``model.fit``. When the pruner says so, :meth:`on_epoch_end` returns True (stop
    training after this epoch) and sets :attr:`pruned_step`; the objective then raises
    ``TrialPruned`` outside Keras.
    """

    def __init__(
        self,
        trial: optuna.Trial,
        client: MlflowClient,
        run_id: str,
        step_offset: int,
        prior: list[float] | None = None,
    ) -> None:
        self.trial = trial
        self.client = client
        self.run_id = run_id
        self.step_offset = step_offset
        self.prior = list(prior or [])
        self.pruned_step: int | None = None
        self.last_value = math.nan
        self.best = math.nan

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> bool:
        """Log and report epoch ``epoch`` (0-based); True when the trial is to be pruned.

        MLflow counts epochs from 1 (as the fold runs and the CLI do): the epoch is logged at
        step ``step + 1``. ``OBJECTIVE_METRIC``, logged first so that the UI's compare view
        picks it, is the trial's value so far (mean over its folds of the best ``val_dice``,
        the earlier folds' ``prior`` bests and this fold's best so far); its last value is the
        trial's value."""
        logs = logs or {}
        step = self.step_offset + epoch
        now = int(time.time() * 1000)
        values = {k: f for k, v in logs.items() if (f := _as_float(v)) is not None}
        current = values.get("val_dice", math.nan)
        if math.isfinite(current) and not current <= self.best:
            self.best = current
        if math.isfinite(self.best):
            values = {OBJECTIVE_METRIC: float(np.mean([*self.prior, self.best])), **values}
        metrics = [Metric(k, v, now, step + 1) for k, v in values.items() if math.isfinite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        # A missing or NaN val_dice is reported as NaN, which every Optuna pruner prunes.
        self.last_value = values.get("val_dice", math.nan)
        self.trial.report(self.last_value, step)
        if self.trial.should_prune():
            self.pruned_step = step
            return True
        return False


def keras_callback(reporter: TrialReporter, stop: StopSignal | None = None) -> Any:
    """A Keras callback that feeds ``reporter`` (not interruptible: it writes to Optuna's
    storage) and stops training when it says prune."""
    import keras

    callback = keras.callbacks.LambdaCallback()

    def on_epoch_end(epoch: int, logs: dict[str, Any] | None = None) -> None:
        with _section(stop, interruptible=False):
            prune = reporter.on_epoch_end(epoch, logs)
        if prune:
            callback.model.stop_training = True

    callback.on_epoch_end = on_epoch_end
    return callback


def _as_float(value: Any) -> float | None:
    """A Keras log value (Python float, NumPy or TensorFlow scalar) as float; None if not one."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _best_finite(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else None


def make_objective(
    prepared: Path,
    tune: TuneParams,
    train: TrainParams,
    *,
    experiment_id: str,
    parent_run_id: str | None = None,
    client: MlflowClient | None = None,
    stop: StopSignal | None = None,
) -> Callable[[optuna.Trial], float]:
    """The objective: mean best validation Dice over ``tune.folds`` of one short training.

    Each trial gets an MLflow run (see the module docstring); every fold's training starts
    from the same seeded initialisation (``tune.seed + fold``) so trials differ only by their
    hyperparameters. With ``stop``, a signal interrupts a trial only during its training.
    """
    import keras

    from liverseg.training.dataset import load_prepared
    from liverseg.training.fit import fit

    client = client or MlflowClient()
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
        tags[NOTE_TAG] = (
            f"Optuna trial {trial.number} of study `{trial.study.study_name}`: learning rate "
            f"{lr:.3g}, batch size {batch_size}, {tune.epochs} epochs on fold(s) "
            f"{', '.join(map(str, tune.folds))}. Objective (`{OBJECTIVE_METRIC}`, maximised): "
            "the mean over those folds of the best epoch's validation Dice."
        )
        run_id = client.create_run(
            experiment_id, run_name=f"trial-{trial.number}", tags=tags
        ).info.run_id
        state, status = TrialState.FAIL.name, "FAILED"
        t0 = time.perf_counter()
        value = math.nan
        try:
            trial.set_user_attr("worker", worker)
            trial.set_user_attr("mlflow_run_id", run_id)
            client.log_batch(
                run_id,
                params=[
                    Param(PARAM_LR, repr(lr)),
                    Param(PARAM_BATCH, str(batch_size)),
                    Param("epochs", str(tune.epochs)),
                    Param("folds", ",".join(map(str, tune.folds))),
                ],
            )
            fold_values: dict[int, float] = {}
            for pos, fold in enumerate(tune.folds):
                reporter = TrialReporter(
                    trial,
                    client,
                    run_id,
                    step_offset=pos * tune.epochs,
                    prior=list(fold_values.values()),
                )
                with _section(stop, interruptible=True):
                    train_xy, val_xy = fold_data(fold)
                    # Drop the previous trial's or fold's graph and free its memory (this
                    # also runs the garbage collector, so Optuna's gc_after_trial is off).
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
                        callbacks=[keras_callback(reporter, stop)],
                        progress=f"tune: trial {trial.number} fold-{fold}",
                    )
                if reporter.pruned_step is not None:
                    raise optuna.TrialPruned(
                        f"fold {fold}, epoch {reporter.pruned_step - pos * tune.epochs + 1}: "
                        f"val_dice {reporter.last_value:.4f}"
                    )
                best = _best_finite(res.history.get("val_dice", []))
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
        finally:
            end_trial_run(client, run_id, state, status)
            progress.info(
                f"tune: trial {trial.number} {state}: value {value:.4f} (lr {lr:.2e}, batch "
                f"{batch_size}) {time.perf_counter() - t0:.0f} s"
            )

    return objective


def optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    tune: TuneParams,
    stop: StopSignal | None = None,
) -> int:
    """Run trials until the study has ``tune.n_trials`` finished ones or ``tune.timeout_s``
    has passed in this process; returns the number of trials this call started.

    Several workers on one study stop together: each checks the study's count after every
    trial (``MaxTrialsCallback``). A worker may still start a trial while another's last one
    runs, so a parallel study can end with up to ``workers - 1`` extra finished trials.
    """
    remaining = tune.n_trials - count_finished(study)
    if remaining <= 0:
        return 0
    import tensorflow as tf

    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [
        optuna.study.MaxTrialsCallback(tune.n_trials, states=FINISHED_STATES)
    ]
    if stop is not None:
        callbacks.append(lambda study, trial: study.stop() if stop.requested else None)
    started = 0

    def counted(trial: optuna.Trial) -> float:
        nonlocal started
        started += 1
        return objective(trial)

    with _section(stop, interruptible=False):
        study.optimize(
            counted,
            n_trials=remaining,
            timeout=tune.timeout_s,
            # A diverging or out-of-memory configuration is a result about the search space:
            # record it FAIL and go on. Anything else is a bug and stops the study.
            catch=(TrialDiverged, tf.errors.ResourceExhaustedError),
            callbacks=callbacks,
        )
    return started


# ------------------------------------------------------------------------------------- report
def summarize(study: optuna.Study) -> dict[str, Any]:
    """The best trial and the trial counts: the content of ``best_params.json``."""
    counts = count_trials(study)
    if counts[TrialState.COMPLETE.name] == 0:
        raise TuningError(
            f"study {study.study_name}: no trial completed ({counts['PRUNED']} pruned, "
            f"{counts['FAIL']} failed, {counts['RUNNING']} running); raise tune.n_trials or "
            "tune.timeout_s, or check the failed trials' MLflow runs"
        )
    best = study.best_trial
    assert best.value is not None
    return {
        PARAM_LR: float(best.params[PARAM_LR]),
        PARAM_BATCH: int(best.params[PARAM_BATCH]),
        "trial_number": best.number,
        "value": float(best.value),
        "study_name": study.study_name,
        "n_complete": counts[TrialState.COMPLETE.name],
        "n_pruned": counts[TrialState.PRUNED.name],
        "n_failed": counts[TrialState.FAIL.name],
    }


def _save_plot(ax: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    axes = list(ax.flat) if isinstance(ax, np.ndarray) else [ax]
    fig = axes[0].figure
    # Optuna draws one panel per parameter plus a colour bar in a default-size figure; widen
    # it so the bar does not cover the last panel.
    fig.set_size_inches(max(6.4, 4.8 * len(axes)), 4.8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_plots(study: optuna.Study, out: Path, seed: int) -> dict[str, str]:
    """Study plots as PNG in ``out``; returns ``{file: "ok" | reason it was skipped}``.

    * ``optimization_history.png``: value per trial and best so far;
    * ``param_importances.png``: fANOVA importances (needs >= 2 complete trials);
    * ``slice.png``: value against each parameter;
    * ``contour.png``: value over learning rate x batch size (needs >= 2 distinct values of
      each among the complete trials).

    A plot that Optuna cannot draw is skipped, not fatal: the best parameters matter more.
    """
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    distinct = {p: {t.params.get(p) for t in complete} for p in (PARAM_LR, PARAM_BATCH)}
    both = [PARAM_LR, PARAM_BATCH]
    plots: dict[str, tuple[Callable[[], Any], str | None]] = {
        "optimization_history.png": (lambda: vis.plot_optimization_history(study), None),
        "param_importances.png": (
            lambda: vis.plot_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)
            ),
            None if len(complete) >= 2 else "needs >= 2 complete trials",
        ),
        "slice.png": (lambda: vis.plot_slice(study, params=both), None),
        "contour.png": (
            lambda: vis.plot_contour(study, params=both),
            None
            if all(len(v) >= 2 for v in distinct.values())
            else "needs >= 2 distinct values of each parameter",
        ),
    }
    status: dict[str, str] = {}
    for name, (draw, skip) in plots.items():
        if skip is not None:
            status[name] = skip
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _save_plot(draw(), out / name)
            status[name] = "ok"
        except Exception as exc:  # plotting is best effort, see the docstring
            status[name] = f"failed: {type(exc).__name__}: {exc}"
    return status


def write_report(
    study: optuna.Study, out: Path, seed: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """Write ``out/best_params.json`` and the plots atomically; returns (summary, plots)."""
    summary = summarize(study)
    with atomic_dir(Path(out)) as tmp:
        write_json(tmp / "best_params.json", summary)
        plots = write_plots(study, tmp, seed)
    return summary, plots
