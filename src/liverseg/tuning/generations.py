"""The one way trials run: the study in generations, the same trials on every machine, run in
parallel or not.

The tune stage asks ``tune.generation_size`` trials at a time. Their parameters are drawn when
they are asked, by this process' sampler, from the trials of earlier generations; while they
run, the pruner also compares each only with trials of earlier generations
(:class:`liverseg.tuning.study.EarlierGenerationsPruner`). So what a generation's trials are
and which of them are pruned depends on the study's history, not on which trial finishes
first: the trials can run one after the other or at once in worker processes
(``tune.processes``, see :mod:`liverseg.workers`) and the study comes out the same. A
``--worker-only`` process on another machine runs the same loop on the same study.

A worker runs a trial that this process asked (``optuna.Trial`` on its number) with the same
objective as a sequential run and tells its state as Optuna's own loop does: COMPLETE with the
value; PRUNED; FAIL for a diverging or out-of-memory trial (a result about the search space,
the study goes on); FAIL and the error for anything else. A trial left RUNNING by a worker
that died is told FAIL when its generation ends. A stop (:mod:`liverseg.stop`) is checked
between trials and in their training; the generation's unfinished trials end FAIL.
"""

from __future__ import annotations

import contextlib
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
from liverseg.tuning.objective import end_stale_trial_run, search_space_failures
from liverseg.tuning.storage import open_storage
from liverseg.tuning.study import GENERATION_ATTR, count_finished, study_pruner
from liverseg.workers import Pool, processes_for, threads_per_process


class TrialError(LiversegError):
    """A trial failed with an error that is not a result about the search space."""


def search_space(tune: TuneParams) -> dict[str, optuna.distributions.BaseDistribution]:
    """The distributions that :func:`liverseg.tuning.objective.make_objective` suggests from."""
    return {
        PARAM_LR: FloatDistribution(tune.lr_min, tune.lr_max, log=True),
        PARAM_BATCH: CategoricalDistribution(list(tune.batch_sizes)),
    }


def run_trial(study: optuna.Study, objective: Any, number: int) -> str:
    """Run the asked trial ``number`` with ``objective`` and tell its state; its state name.
    Errors other than :func:`~liverseg.tuning.objective.search_space_failures` are raised
    after the FAIL."""
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
        print(f"tune: trial {number} FAIL: {why}", flush=True)
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


def _trial_in_worker(job: TrialJob, number: int) -> str:
    if not _WORKER:
        from liverseg.training.fit import keras_session
        from liverseg.tuning.objective import make_objective

        keras_session(job.train.precision, job.tune.seed)
        _WORKER["study"] = optuna.load_study(
            study_name=job.study_name, storage=open_storage(job.url), pruner=study_pruner(job.tune)
        )
        _WORKER["objective"] = make_objective(
            job.prepared,
            job.tune,
            job.train,
            experiment_id=job.experiment_id,
            parent_run_id=job.parent_run_id,
        )
    return run_trial(_WORKER["study"], _WORKER["objective"], number)


def generation_processes(tune: TuneParams) -> int:
    """Worker processes per generation (``tune.processes``; 1: the trials run in this one)."""
    return processes_for(tune.processes, tune.generation_size)


def optimize_in_generations(
    study: optuna.Study, tune: TuneParams, job: TrialJob, objective: Any
) -> int:
    """Run generations until the study has ``tune.n_trials`` finished trials, this call has
    started ``tune.n_trials`` (failed trials are run again, within that) or ``tune.timeout_s``
    has passed before a generation starts; the number of trials run.

    ``objective`` runs the trials in this process when :func:`generation_processes` is 1 (it
    may be None otherwise); else a :class:`liverseg.workers.Pool`, started once, does, each
    worker making its own objective from ``job``."""
    space = search_space(tune)
    # One figure for every generation (a last, smaller one too): a trial's thread count
    # decides its arithmetic.
    processes = generation_processes(tune)
    threads = threads_per_process(processes)
    if processes <= 1 and objective is None:
        raise ValueError("optimize_in_generations: no objective for this process")
    started, t0 = 0, time.monotonic()
    with contextlib.ExitStack() as stack:
        pool = None
        while (remaining := tune.n_trials - count_finished(study)) > 0 and started < tune.n_trials:
            stop.check()
            if time.monotonic() - t0 > tune.timeout_s:
                print(f"tune: tune.timeout_s ({tune.timeout_s:g} s) passed; no new generation")
                break
            size = min(tune.generation_size, remaining)
            trials: list[optuna.Trial] = []
            errors: dict[int, str] = {}
            try:
                with warnings.catch_warnings():
                    # Optuna warns that an RDB storage's heartbeat is meant for Study.optimize:
                    # the asked trials' liveness is their process tag (study.fail_dead_trials).
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    for _ in range(size):
                        trials.append(study.ask(space))
                for t in trials:
                    t.set_user_attr(GENERATION_ATTR, trials[0].number)
                    # Until a worker takes it: whoever finds it RUNNING after a SIGKILL can
                    # fail it.
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
                    print(
                        f"tune: trials {', '.join(map(str, numbers))} in "
                        f"{min(processes, size)} processes of {threads} CPU thread(s) each "
                        f"(tune.processes: {tune.processes})",
                        flush=True,
                    )
                    _, errors = pool.run(numbers)
            finally:
                _fail_unfinished(study, [t.number for t in trials])
            started += size
            if errors:
                raise TrialError("; ".join(f"trial {n}: {e}" for n, e in sorted(errors.items())))
    return started


def _fail_unfinished(study: optuna.Study, numbers: list[int]) -> None:
    """Tell FAIL (and end KILLED the MLflow run of) the trials of ``numbers`` still RUNNING."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in numbers:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            end_stale_trial_run(study, t)
