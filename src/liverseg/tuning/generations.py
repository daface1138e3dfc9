"""The one way trials run: ``tune.generation_size`` trials asked at a time, run in this process
or in worker processes (:mod:`liverseg.workers`), on this machine or (``--worker-only``) many.

A trial's parameters are drawn when it is asked, and the pruner compares it only with trials
of earlier generations (:class:`~liverseg.tuning.study.EarlierGenerationsPruner`), so the study
depends on its history, not on which trial finishes first: sequential or parallel, it comes
out the same. A trial ends COMPLETE, PRUNED, FAIL (diverged or out of memory: the study goes
on) or FAIL with its error raised. Trials left RUNNING (a dead worker, a stop) are told FAIL
when their generation ends; a stop is checked between trials and in their training.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from liverseg import runguard, stop
from liverseg.errors import LiversegError
from liverseg.params import TrainParams, TuneParams
from liverseg.tuning.best_params import PARAM_BATCH, PARAM_LR
from liverseg.tuning.objective import search_space_failures
from liverseg.tuning.study import (
    GENERATION_ATTR,
    count_finished,
    fail_trials,
    open_storage,
    study_pruner,
)
from liverseg.workers import Pool, processes_for, threads_per_process

log = logging.getLogger(__name__)


def run_trial(study: optuna.Study, objective: Any, number: int) -> str:
    """Run the asked trial ``number`` and tell its state; its state name."""
    # Optuna has no public way to reopen an asked trial by number in another process; its
    # storage API maps (study, number) to the trial id that optuna.Trial takes.
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    trial = optuna.Trial(study, trial_id)
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        study.tell(number, state=TrialState.PRUNED)
        return TrialState.PRUNED.name
    except search_space_failures() as exc:
        study.tell(number, state=TrialState.FAIL)
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.info(f"tune: trial {number} FAIL: {why}")
        return TrialState.FAIL.name
    except BaseException:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        raise
    study.tell(number, value)
    return TrialState.COMPLETE.name


@dataclass(frozen=True)
class TrialJob:
    """What a worker process needs to run trials of the study (picklable)."""

    prepared: Path
    tune: TuneParams
    train: TrainParams
    url: str
    study_name: str
    experiment_id: str
    parent_run_id: str


_WORKER: dict[str, Any] = {}  # a worker process' study and objective, made on its first trial


def _objective(job: TrialJob) -> Any:
    """Keras set up (this imports TensorFlow) and the objective of ``job``."""
    from liverseg.training.fit import keras_session
    from liverseg.tuning.objective import make_objective

    keras_session(job.train.precision, job.tune.seed)
    return make_objective(
        job.prepared,
        job.tune,
        job.train,
        experiment_id=job.experiment_id,
        parent_run_id=job.parent_run_id,
    )


def _trial_in_worker(job: TrialJob, number: int) -> str:
    if not _WORKER:
        _WORKER["objective"] = _objective(job)
        _WORKER["study"] = optuna.load_study(
            study_name=job.study_name, storage=open_storage(job.url), pruner=study_pruner(job.tune)
        )
    return run_trial(_WORKER["study"], _WORKER["objective"], number)


def optimize_in_generations(
    study: optuna.Study, tune: TuneParams, job: TrialJob, objective: Any = None
) -> int:
    """Run generations until the study has ``tune.n_trials`` finished trials, this call has
    started ``tune.n_trials`` (failed ones are run again, within that) or ``tune.timeout_s``
    has passed; the number of trials run. With one process per generation the trials run
    here (``objective``, by default ``job``'s), else in a :class:`liverseg.workers.Pool`
    started once, each worker making its objective from ``job``."""
    space = {  # the distributions that the objective suggests from
        PARAM_LR: FloatDistribution(tune.lr_min, tune.lr_max, log=True),
        PARAM_BATCH: CategoricalDistribution(list(tune.batch_sizes)),
    }
    # The same thread count for every generation: it decides a trial's arithmetic.
    processes = processes_for(tune.processes, tune.generation_size)
    threads = threads_per_process(processes)
    if processes <= 1 and objective is None:
        stop.check()  # before TensorFlow's import, which takes seconds
        objective = _objective(job)
    started, t0 = 0, time.monotonic()
    with contextlib.ExitStack() as stack:
        pool = None
        while (remaining := tune.n_trials - count_finished(study)) > 0 and started < tune.n_trials:
            stop.check()
            if time.monotonic() - t0 > tune.timeout_s:
                log.info(f"tune: tune.timeout_s ({tune.timeout_s:g} s) passed; no new generation")
                break
            size = min(tune.generation_size, remaining)
            trials: list[optuna.Trial] = []
            errors: dict[int, str] = {}
            try:
                with warnings.catch_warnings():
                    # (the asked trials' liveness is their process tag, not the heartbeat)
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    for _ in range(size):
                        trials.append(study.ask(space))
                for t in trials:
                    t.set_user_attr(GENERATION_ATTR, trials[0].number)
                    # until a worker takes it: who finds it RUNNING after a SIGKILL fails it
                    t.set_user_attr("process", runguard.process_tags())
                numbers = [t.number for t in trials]
                if processes > 1 and pool is None:  # started once, for the first generation
                    pool = stack.enter_context(
                        Pool(_trial_in_worker, job, processes, threads, tune.generation_size)
                    )
                if pool is None:
                    # (a stop is taken in a trial's training, once its MLflow run exists)
                    for n in numbers:
                        run_trial(study, objective, n)
                else:
                    log.info(
                        f"tune: trials {', '.join(map(str, numbers))} in "
                        f"{min(processes, size)} processes of {threads} CPU thread(s) each "
                        f"(tune.processes: {tune.processes})"
                    )
                    _, errors = pool.run(numbers)
            finally:
                fail_trials(study, [t.number for t in trials])
            started += size
            if errors:
                raise LiversegError("; ".join(f"trial {n}: {e}" for n, e in sorted(errors.items())))
    return started
