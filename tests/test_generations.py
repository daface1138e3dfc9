"""The study in generations (liverseg.tuning.generations): what a generation's trials see, and
the same study however its trials are spread over worker processes."""

from __future__ import annotations

import signal
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from conftest import MlflowStore
from liverseg import stop, workers
from liverseg.params import TuneParams
from liverseg.stages.tune import run_study
from liverseg.tuning.generations import TrialJob, optimize_in_generations
from liverseg.tuning.study import GENERATION_ATTR, EarlierGenerationsPruner, study_pruner
from test_tune import TINY_TRAIN, tiny_tune, write_prepared

X = {"x": FloatDistribution(0.0, 1.0)}


def finished(value: float, first: int) -> optuna.trial.FrozenTrial:
    return create_trial(
        value=value,
        params={"x": value},
        distributions=X,
        intermediate_values={0: value},
        user_attrs={GENERATION_ATTR: first},
    )


def test_a_trial_is_pruned_against_earlier_generations_only() -> None:
    pruner = study_pruner(TuneParams(pruner_warmup_epochs=0))
    assert isinstance(pruner, EarlierGenerationsPruner)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for value in (0.4, 0.9):  # generation 0: trials 0 and 1
        study.add_trial(finished(value, first=0))
    study.add_trial(finished(0.1, first=2))  # generation 2 (trials 2, 3): trial 2 done first
    trial = study.ask()
    assert trial.number == 3
    trial.report(0.5, 0)
    # Whatever finished first in its own generation is not compared: median(0.4, 0.9) = 0.65.
    trial.set_user_attr(GENERATION_ATTR, 2)
    assert trial.should_prune()
    # A trial outside generations sees the whole study: median 0.4 < 0.5.
    other = study.ask()
    other.report(0.5, 0)
    assert not other.should_prune()


def test_a_stop_requested_between_trials_is_raised_not_taken_for_the_end(
    tmp_path: Path,
) -> None:
    """A stop asked while a trial runs or its result is stored stops the study with the
    interrupt that the stage reports (exit 143, "run the same command again"), not as a study
    that ended: CI saw tune exit 0 after one of 50 trials."""
    tune = tiny_tune(n_trials=50, generation_size=1, processes=1)
    job = TrialJob(tmp_path, tune, TINY_TRAIN, "sqlite://", "study", "0", "parent")
    study = optuna.create_study(direction="maximize")

    def objective(trial: optuna.Trial) -> float:
        stop.request(signal.SIGTERM)  # what the handler does
        return 0.5

    with pytest.raises(KeyboardInterrupt):
        optimize_in_generations(study, tune, job, objective)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_a_stop_while_a_generation_is_asked_fails_its_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop asked while the generation's trials are asked is raised after it; the asked
    trials end FAIL, none RUNNING (before, they stayed RUNNING until a later run found their
    process dead)."""
    tune = tiny_tune(n_trials=50, generation_size=2, processes=1)
    job = TrialJob(tmp_path, tune, TINY_TRAIN, "sqlite://", "study", "0", "parent")
    study = optuna.create_study(direction="maximize")
    ask = optuna.Study.ask

    def ask_then_signal(self: optuna.Study, *a: object, **k: object) -> optuna.Trial:
        trial = ask(self, *a, **k)
        stop.request(signal.SIGTERM)
        return trial

    def objective(trial: optuna.Trial) -> float:
        stop.check()  # the stop point of the trial's training, once its MLflow run exists
        pytest.fail("the trial went past its stop point")

    monkeypatch.setattr(optuna.Study, "ask", ask_then_signal)
    with pytest.raises(KeyboardInterrupt):
        optimize_in_generations(study, tune, job, objective)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]


def test_a_stop_while_a_result_is_told_keeps_the_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal that comes as a finished trial's value is told (Optuna's code, outside any
    training) waits until the trial is stored COMPLETE, then stops the study (before, it
    interrupted the tell and the finished trial was failed)."""
    tune = tiny_tune(n_trials=50, generation_size=1, processes=1)
    job = TrialJob(tmp_path, tune, TINY_TRAIN, "sqlite://", "study", "0", "parent")
    study = optuna.create_study(direction="maximize")
    tell = optuna.Study.tell

    def signal_then_tell(self: optuna.Study, *a: object, **k: object) -> object:
        stop.request(signal.SIGTERM)  # as if SIGTERM came here
        return tell(self, *a, **k)

    monkeypatch.setattr(optuna.Study, "tell", signal_then_tell)
    with pytest.raises(KeyboardInterrupt):
        optimize_in_generations(study, tune, job, lambda t: 0.5)
    assert [(t.state, t.value) for t in study.trials] == [(TrialState.COMPLETE, 0.5)]


@pytest.mark.slow
def test_the_study_is_the_same_in_two_or_three_worker_processes(
    tmp_path: Path, mlflow_store: MlflowStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two generations of three trials (the second pruned against the first), run by three
    workers (one trial each) and by two (one of them runs two trials, one compiled model):
    the same trials, values and states."""
    prepared = write_prepared(tmp_path / "prepared")
    # One CPU thread per worker in both runs whatever this machine has (a thread count
    # changes the order of floating-point sums, and so the values).
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 2)
    studies = []
    for processes in (3, 2):
        tune = tiny_tune(n_trials=6, generation_size=3, processes=processes, epochs=2)
        url = f"sqlite:///{tmp_path}/study-{processes}.db"
        run_study(
            prepared,
            tune,
            TINY_TRAIN,
            url=url,
            out=tmp_path / f"report-{processes}",
        )
        (summary,) = optuna.study.get_all_study_summaries(url)
        studies.append(optuna.load_study(study_name=summary.study_name, storage=url).trials)
    three, two = ([(t.params, t.state, t.intermediate_values, t.value) for t in s] for s in studies)
    assert len(three) == 6
    assert three == two
    assert {t.user_attrs[GENERATION_ATTR] for t in studies[0]} == {0, 3}
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in studies[0])
