"""Study identity and bookkeeping: which study a run belongs to, its pruner, creating or
resuming it, counting its trials and failing the trials of dead workers (it is run by
:mod:`liverseg.tuning.generations`).

Study identity: the study's name hashes everything that defines the objective (the prepared
data's content hash, search space, folds, epochs, seed and the train section's model, loss,
augmentation and precision). Changed inputs start a new study in the same storage; rerunning on
the same inputs loads the study and runs only the trials still missing to ``tune.n_trials``
finished (COMPLETE + PRUNED) ones, so an interrupted run resumes. Several processes, on one
machine or many, can optimise one study at once through a shared storage.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from liverseg import runguard
from liverseg.errors import LiversegError
from liverseg.params import TrainParams, TuneParams, as_flat_dict
from liverseg.tuning.best_params import PARAM_BATCH, PARAM_LR
from liverseg.tuning.objective import end_stale_trial_run

# Bump when the objective's definition changes (what is measured, not its inputs): a new
# version starts new studies instead of mixing incomparable values into old ones.
OBJECTIVE_VERSION = 1
STUDY_PREFIX = "liverseg-"
NAME_HASH_CHARS = 12

# Trials that count towards tune.n_trials: a failed trial is retried, not counted.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

# Two unpruned trials: the parameter-importance plot needs at least two complete trials, and a
# median over one trial prunes everything that is not better than a single random draw. More
# would leave little pruning in the few trials a CPU budget allows (params.yaml: 4).
MEDIAN_PRUNER_STARTUP_TRIALS = 2

# Trial user attribute: the number of the first trial of the trial's generation.
GENERATION_ATTR = "generation_first_trial"


class TuningError(LiversegError):
    """The study cannot be opened or has no usable result (the message says which study)."""


def study_inputs(data_hash: str, tune: TuneParams, train: TrainParams) -> dict[str, Any]:
    """Everything that defines the objective's values, as plain JSON-able data.

    Not included, on purpose: ``tune.n_trials`` and ``tune.timeout_s`` (raising them extends
    the same study), ``tune.storage`` (where the study lives), the pruner's warm-up (decides
    which trials stop early, not what a finished trial measures), and the train section's own
    learning rate, batch size, epochs and patience (tuning replaces or does not use them).
    """
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
    """The TPE sampler's seed for one worker joining a study that has ``n_existing`` trials.

    A fresh study's first worker uses ``seed`` itself. Any other worker, or a resumed study,
    gets a seed derived from all three, because a sampler re-seeded with ``seed`` would draw
    the same first (random start-up) points again: parallel workers would all evaluate the
    same learning rates, and a resumed study would repeat its first trials.
    """
    if worker_index == 0 and n_existing == 0:
        return seed
    return int(np.random.SeedSequence([seed, worker_index, n_existing]).generate_state(1)[0])


class _EarlierTrials:
    """``study`` as a pruner sees it: only trials numbered below ``first``."""

    def __init__(self, study: optuna.Study, first: int) -> None:
        self._study = study
        self._first = first

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [t for t in trials if t.number < self._first]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class EarlierGenerationsPruner(optuna.pruners.BasePruner):
    """``inner``, shown only the trials of earlier generations for a trial of a generation
    (one with :data:`GENERATION_ATTR`), and the whole study for any other trial."""

    def __init__(self, inner: optuna.pruners.BasePruner) -> None:
        self.inner = inner

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        first = trial.user_attrs.get(GENERATION_ATTR)
        if first is None:
            return self.inner.prune(study, trial)
        return self.inner.prune(_EarlierTrials(study, int(first)), trial)  # type: ignore[arg-type]


def study_pruner(tune: TuneParams) -> optuna.pruners.BasePruner:
    """The median pruner with ``tune.pruner_warmup_epochs`` warm-up steps, which compares a
    trial of a generation only with earlier generations' trials."""
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
    """Create or load (``load_if_exists``) the maximising study ``name`` in ``storage``.

    ``pruner`` defaults to :func:`study_pruner`;
    ``inputs`` (:func:`study_inputs`) is stored as a study attribute the first time.
    """
    if pruner is None:
        pruner = study_pruner(tune)
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
