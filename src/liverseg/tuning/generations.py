"""The study in generations: the same trials on every machine, run in parallel or not.

The tune stage asks ``tune.generation_size`` trials at a time. Their parameters are drawn when
they are asked, by this process' sampler, from the trials of earlier generations; while they
run, the pruner also compares each only with trials of earlier generations
(:class:`EarlierGenerationsPruner`). So what a generation's trials are and which of them are
pruned depends on the study's history, not on which trial finishes first: the trials can run
one after the other or at once in worker processes (``tune.processes``, see
:mod:`liverseg.workers`) and the study comes out the same.

A worker runs a trial that this process asked (``optuna.Trial`` on its number) with the same
objective as a sequential run and tells its state as Optuna's own loop does: COMPLETE with the
value; PRUNED; FAIL for a diverging or out-of-memory trial (a result about the search space,
the study goes on); FAIL and the error for anything else. A trial left RUNNING by a worker
that died is told FAIL when its generation ends.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from liverseg import runguard
from liverseg.errors import LiversegError
from liverseg.params import TrainParams, TuneParams
from liverseg.tuning.objective import (
    PARAM_BATCH,
    PARAM_LR,
    end_stale_trial_run,
    search_space_failures,
)
from liverseg.tuning.stop import StopSignal, section

# Trial user attribute: the number of the first trial of the trial's generation.
GENERATION_ATTR = "generation_first_trial"


class TrialError(LiversegError):
    """A trial failed with an error that is not a result about the search space."""


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
        from liverseg.training.setup import keras_session
        from liverseg.tuning.objective import make_objective
        from liverseg.tuning.storage import open_storage
        from liverseg.tuning.study import study_pruner

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
    from liverseg.workers import processes_for

    return processes_for(tune.processes, tune.generation_size)


def optimize_in_generations(
    study: optuna.Study,
    tune: TuneParams,
    job: TrialJob,
    objective: Any,
    stop: StopSignal | None = None,
) -> int:
    """Run generations until the study has ``tune.n_trials`` finished trials (or
    ``tune.timeout_s`` has passed before a generation starts); the number of trials run.

    ``objective`` runs the trials in this process when :func:`generation_processes` is 1 (it
    may be None otherwise); else workers do, each making its own from ``job``."""
    from liverseg.tuning.study import count_finished
    from liverseg.workers import run_workers, threads_per_process

    space = search_space(tune)
    # One figure for every generation (a last, smaller one too): a trial's thread count
    # decides its arithmetic.
    processes = generation_processes(tune)
    threads = threads_per_process(processes)
    started, t0 = 0, time.monotonic()
    while (remaining := tune.n_trials - count_finished(study)) > 0:
        if time.monotonic() - t0 > tune.timeout_s:
            print(f"tune: tune.timeout_s ({tune.timeout_s:g} s) passed; no new generation")
            break
        size = min(tune.generation_size, remaining)
        trials: list[optuna.Trial] = []
        errors: dict[int, str] = {}
        try:
            # A stop requested in here is raised on leaving it: by then every asked trial is
            # in ``trials``, which the ``finally`` fails (none is left RUNNING).
            with section(stop, interruptible=False), warnings.catch_warnings():
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
            if processes <= 1:
                if objective is None:
                    raise ValueError("optimize_in_generations: no objective for this process")
                # As in study.optimize: only a trial's training may be interrupted at once; a
                # stop that comes while its result is told waits until the trial is stored.
                with section(stop, interruptible=False):
                    for n in numbers:
                        run_trial(study, objective, n)
            else:
                print(
                    f"tune: trials {', '.join(map(str, numbers))} in {min(processes, size)} "
                    f"processes of {threads} CPU thread(s) each (tune.processes: "
                    f"{tune.processes})",
                    flush=True,
                )
                _, errors = run_workers(_trial_in_worker, job, numbers, processes, threads)
        finally:
            _fail_unfinished(study, [t.number for t in trials])
        started += size
        if errors:
            raise TrialError("; ".join(f"trial {n}: {text}" for n, text in sorted(errors.items())))
        if stop is not None:
            stop.raise_if_requested()  # a stop ends no study as if it were finished
    return started


def _fail_unfinished(study: optuna.Study, numbers: list[int]) -> None:
    """Tell FAIL (and end KILLED the MLflow run of) the trials of ``numbers`` still RUNNING."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in numbers:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            end_stale_trial_run(study, t)
