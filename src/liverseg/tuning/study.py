"""The study: its storage (a ``tune.storage`` URL), name, pruner, creating or resuming it, and
its trials.

RDB storages get a heartbeat: a trial whose worker died is marked FAIL (its MLflow run ended)
by the next worker. The name hashes everything that defines the objective
(:func:`study_inputs`): changed inputs start a new study in the same storage; the same inputs
load it and run only the trials missing to ``tune.n_trials`` finished (COMPLETE + PRUNED)
ones, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from liverseg import runguard
from liverseg.errors import LiversegError, ParamsError
from liverseg.params import TrainParams, TuneParams, as_flat_dict
from liverseg.tuning.best_params import PARAM_BATCH, PARAM_LR
from liverseg.tuning.objective import end_stale_trial_run

# Bump when the objective's definition changes (what is measured, not its inputs): a new
# version starts new studies instead of mixing incomparable values into old ones.
OBJECTIVE_VERSION = 1
STUDY_PREFIX = "liverseg-"
NAME_HASH_CHARS = 12

# Two unpruned trials: the parameter-importance plot needs at least two complete trials, and a
# median over one trial prunes everything that is not better than a single random draw. More
# would leave little pruning in the few trials a CPU budget allows (params.yaml: 4).
MEDIAN_PRUNER_STARTUP_TRIALS = 2

# Trial user attribute: the number of the first trial of the trial's generation.
GENERATION_ATTR = "generation_first_trial"


class TuningError(LiversegError):
    """The study cannot be opened or has no usable result (the message says which study)."""


# SQLite lets one writer in at a time; the others wait up to this long instead of failing with
# "database is locked" (a trial writes a handful of rows per epoch, far below this).
SQLITE_BUSY_TIMEOUT_S = 60
# RDB storages: a trial whose heartbeat is older than the grace period (its process or machine
# died) is marked FAIL by the next worker that starts a trial.
HEARTBEAT_INTERVAL_S = 30
HEARTBEAT_GRACE_S = 120
# Workers starting together on a fresh database may race to create Optuna's tables.
STORAGE_OPEN_ATTEMPTS = 5
STORAGE_RETRY_S = 0.5

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
JOURNAL_PREFIX = "journal:"


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
    """The Optuna storage that ``url`` (``tune.storage``) names: ``sqlite:///PATH`` (one
    machine), ``postgresql://user:pw@host:port/db`` or ``mysql://...`` (many), ``journal:PATH``
    (many, on a shared file system where SQLite's locking is unreliable)."""
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
    # postgresql:// with the psycopg2 driver (which the project installs) when psycopg 3
    # (SQLAlchemy 2.1's default) is not installed
    if url.startswith("postgresql://"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
            url = "postgresql+psycopg2://" + url.removeprefix("postgresql://")
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

    def rdb_storage() -> optuna.storages.BaseStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=HEARTBEAT_GRACE_S,
                heartbeat_stale_trial_callback=end_stale_trial_run,
            )

    transient = (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)
    try:
        return runguard.retry(
            rdb_storage,
            attempts=STORAGE_OPEN_ATTEMPTS,
            delay_s=STORAGE_RETRY_S,
            when=lambda exc: isinstance(exc, transient),
        )
    except transient as exc:
        raise TuningError(
            f"tune.storage {redact(url)}: cannot open the study storage after "
            f"{STORAGE_OPEN_ATTEMPTS} attempts: {exc}"
        ) from exc


def study_inputs(data_hash: str, tune: TuneParams, train: TrainParams) -> dict[str, Any]:
    """Everything that defines the objective's values, as plain JSON-able data. Not included,
    on purpose: ``tune.n_trials`` and ``tune.timeout_s`` (raising them extends the same study),
    ``tune.storage``, the pruner's warm-up (decides which trials stop early, not what a
    finished trial measures), and the train section's own learning rate, batch size, epochs
    and patience (tuning replaces or does not use them)."""
    inputs: dict[str, Any] = {
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
    # A trial's value is its best epoch's Dice on every val_stride-th validation slice. Only a
    # stride above 1 enters the name: studies made before the stride existed (every slice)
    # keep theirs and resume.
    if train.val_stride != 1:
        inputs["val_stride"] = train.val_stride
    return inputs


def study_name(data_hash: str, tune: TuneParams, train: TrainParams) -> str:
    """``liverseg-<12 hex>``: a short hash of :func:`study_inputs`."""
    blob = json.dumps(study_inputs(data_hash, tune, train), sort_keys=True)
    return STUDY_PREFIX + hashlib.sha256(blob.encode()).hexdigest()[:NAME_HASH_CHARS]


def sampler_seed(seed: int, worker_index: int, n_existing: int) -> int:
    """The TPE sampler's seed: ``seed`` for a fresh study's first worker, else derived from all
    three, so that other workers and a resumed study do not draw the same first points again."""
    if worker_index == 0 and n_existing == 0:
        return seed
    return int(np.random.SeedSequence([seed, worker_index, n_existing]).generate_state(1)[0])


class _EarlierTrials:
    """``study`` with only its trials numbered below ``first``."""

    def __init__(self, study: optuna.Study, first: int) -> None:
        self._study = study
        self._first = first

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [t for t in trials if t.number < self._first]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class EarlierGenerationsPruner(optuna.pruners.BasePruner):
    """``inner``, shown only the trials of generations before the trial's own."""

    def __init__(self, inner: optuna.pruners.BasePruner) -> None:
        self.inner = inner

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        first = trial.user_attrs.get(GENERATION_ATTR)
        if first is None:
            return self.inner.prune(study, trial)
        return self.inner.prune(_EarlierTrials(study, int(first)), trial)  # type: ignore[arg-type]


def study_pruner(tune: TuneParams) -> optuna.pruners.BasePruner:
    """The median pruner (``tune.pruner_warmup_epochs`` warm-up steps), by generation."""
    return EarlierGenerationsPruner(
        optuna.pruners.MedianPruner(
            n_startup_trials=MEDIAN_PRUNER_STARTUP_TRIALS,
            n_warmup_steps=tune.pruner_warmup_epochs,
        )
    )


def create_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    tune: TuneParams,
    *,
    worker_index: int = 0,
    pruner: optuna.pruners.BasePruner | None = None,
    inputs: dict[str, Any] | None = None,
) -> optuna.Study:
    """Create or load the maximising study ``name`` (``pruner``: :func:`study_pruner`);
    ``inputs`` (:func:`study_inputs`) is stored as a study attribute the first time."""
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
        pruner=pruner or study_pruner(tune),
    )
    if inputs is not None and "inputs" not in study.user_attrs:
        study.set_user_attr("inputs", inputs)
    return study


def count_trials(study: optuna.Study) -> dict[str, int]:
    """Number of trials per state name."""
    trials = study.get_trials(deepcopy=False)
    return {s.name: sum(t.state == s for t in trials) for s in TrialState}


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards ``tune.n_trials`` (COMPLETE + PRUNED)."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def fail_trials(study: optuna.Study, numbers: Collection[int] | None = None) -> list[int]:
    """Tell FAIL (their MLflow runs KILLED) the RUNNING trials of ``numbers`` or, with None,
    those whose process is provably dead (no wait for the heartbeat); their numbers."""

    def chosen(t: FrozenTrial) -> bool:
        if numbers is not None:
            return t.number in numbers
        return runguard.is_dead(t.user_attrs.get("process") or {})

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    failed = [t for t in running if chosen(t)]
    for t in failed:
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        end_stale_trial_run(study, t)
    return [t.number for t in failed]
