"""The tune stage's work: one Optuna study optimised by this process (and its worker
processes), the MLflow run ``study-<name>`` above the trial runs, and the report.

See :mod:`liverseg.stages.tune` for the command line and the parallel set-ups.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liverseg.data.splits import load_splits
from liverseg.params import TrainParams, TuneParams, as_flat_dict
from liverseg.runguard import Interrupted
from liverseg.workers import WORKER_STOP_TIMEOUT_S


@dataclass(frozen=True)
class Workers:
    """Who optimises the study, and how this process takes part.

    ``count``: processes on this machine (this one starts ``count - 1`` workers);
    ``only``: run trials, write no report; ``index``: seeds this process's sampler (workers it
    starts get ``index + 1`` ...); ``parent_run_id``: the study run to nest trial runs under
    (set for the workers this process starts); ``params``/``storage_arg``: what the workers'
    command line passes on (the storage only if it was given on this one's).
    """

    params: Path
    count: int = 1
    only: bool = False
    index: int = 0
    parent_run_id: str | None = None
    storage_arg: str | None = None


def _worker_command(prepared: Path, workers: Workers, index: int, parent_run_id: str) -> list[str]:
    cmd = [sys.executable, "-m", "liverseg.cli", "tune", "--prepared", str(prepared)]
    cmd += ["--params", str(workers.params), "--workers", "1", "--worker-only"]
    cmd += ["--worker-index", str(index), "--parent-run-id", parent_run_id]
    if workers.storage_arg:
        cmd += ["--storage", workers.storage_arg]
    return cmd


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _parent_params(tune: TuneParams, storage: str, workers: int) -> dict[str, Any]:
    flat = {f"tune.{k}": v for k, v in as_flat_dict(tune).items() if k != "storage"}
    return {**flat, "tune.storage": storage, "workers": workers}


def _log_best(summary: dict[str, Any]) -> None:
    """The study's best trial and counts on the active (parent) MLflow run."""
    import mlflow

    mlflow.log_params(
        {
            "best_learning_rate": summary["learning_rate"],
            "best_batch_size": summary["batch_size"],
            "best_trial_number": summary["trial_number"],
        }
    )
    mlflow.log_metrics(
        {
            "best_value": summary["value"],
            "n_complete": summary["n_complete"],
            "n_pruned": summary["n_pruned"],
            "n_failed": summary["n_failed"],
        }
    )


def _log_plot_images(folder: Path) -> None:
    """The study's PNG plots as MLflow images of the active run (its chart view shows them)."""
    import mlflow
    from PIL import Image

    for png in sorted(folder.glob("*.png")):
        with Image.open(png) as im:
            # synchronous: see liverseg.evaluation.holdout.log_to_mlflow
            mlflow.log_image(im.convert("RGB"), key=f"study_{png.stem}", step=0, synchronous=True)


def _study_description(name: str, tune: TuneParams, summary: dict[str, Any]) -> str:
    return (
        f"{tune.n_trials} trials; best: trial {summary['trial_number']}, val Dice "
        f"{summary['value']:.4f} (lr {summary['learning_rate']:.3g}, batch "
        f"{summary['batch_size']})"
    )


def run_study(
    prepared: Path,
    tune: TuneParams,
    train: TrainParams,
    *,
    url: str,
    out: Path | None,
    workers: Workers,
) -> None:
    """Optimise the study of ``prepared`` x ``tune`` x ``train``'s model spec in storage
    ``url`` until it has ``tune.n_trials`` finished trials, then (unless ``workers.only``)
    write the report to ``out`` and log it on the study's MLflow run. Prints one line."""
    index = workers.index
    # TensorFlow is imported only after the extra workers have started (make_objective), so
    # their start-up overlaps this process's.
    import mlflow

    from liverseg.training.setup import keras_session
    from liverseg.training.tracking import (
        NOTE_TAG,
        content_hash,
        dvc_out_hash,
        ensure_experiment,
        git_commit,
        log_dataset,
    )
    from liverseg.tuning.generations import (
        TrialJob,
        generation_processes,
        optimize_in_generations,
    )
    from liverseg.tuning.objective import make_objective
    from liverseg.tuning.report import summarize, write_report
    from liverseg.tuning.stop import StopSignal
    from liverseg.tuning.storage import open_storage, redact
    from liverseg.tuning.study import (
        TuningError,
        count_trials,
        create_study,
        fail_dead_trials,
        optimize,
        study_inputs,
        study_name,
    )

    load_splits(prepared)
    data_hash = content_hash(prepared)
    inputs = study_inputs(data_hash, tune, train)
    name = study_name(data_hash, tune, train)
    study = create_study(open_storage(url), name, tune, worker_index=index, inputs=inputs)
    dead = fail_dead_trials(study)
    if dead:
        print(
            f"tune: study {name}: trial(s) {', '.join(map(str, dead))} of a dead process marked "
            "FAIL (their MLflow runs KILLED); they are run again",
            flush=True,
        )

    exp_id = ensure_experiment(train.experiment)
    tags = {
        "stage": "tune",
        "kind": "study",
        "role": "worker" if workers.only else "main",
        "study_name": name,
        "storage": redact(url),
        "git_commit": git_commit(),
        "data_sha256": data_hash,
    }
    try:
        with contextlib.ExitStack() as stack:
            stop = StopSignal()
            stack.enter_context(stop.installed())
            parent_id = workers.parent_run_id
            if parent_id is None:
                run = stack.enter_context(
                    mlflow.start_run(experiment_id=exp_id, run_name=f"study-{name}", tags=tags)
                )
                parent_id = run.info.run_id
                mlflow.log_params(_parent_params(tune, redact(url), workers.count))
                dvc_md5 = dvc_out_hash(prepared)
                log_dataset(prepared, data_hash if dvc_md5 == "unknown" else dvc_md5, "training")
            procs: list[subprocess.Popen[bytes]] = []
            try:
                for i in range(1, workers.count):
                    procs.append(
                        subprocess.Popen(_worker_command(prepared, workers, index + i, parent_id))
                    )
                generations = workers.count == 1 and not workers.only
                objective = None
                if not generations or generation_processes(tune) == 1:
                    # (worker processes set up their own Keras: this one need not import it)
                    keras_session(train.precision, tune.seed)
                    objective = make_objective(
                        prepared,
                        tune,
                        train,
                        experiment_id=exp_id,
                        parent_run_id=parent_id,
                        stop=stop,
                    )
                if generations:
                    job = TrialJob(prepared, tune, train, url, name, exp_id, parent_id)
                    ran = optimize_in_generations(study, tune, job, objective, stop)
                else:  # --workers/--worker-only: trials as the processes come for them
                    assert objective is not None
                    ran = optimize(study, objective, tune, stop)
                codes = [p.wait() for p in procs]
            except BaseException:
                _stop(procs)
                raise
            failed = [f"pid {p.pid} exit {c}" for p, c in zip(procs, codes, strict=True) if c]
            if failed:
                raise TuningError(f"study {name}: worker process(es) failed: {failed}")

            own_parent = workers.parent_run_id is None
            if workers.only:
                counts = count_trials(study)
                if own_parent and counts["COMPLETE"]:
                    _log_best(summarize(study))
                print(f"tune: worker {index} ran {ran} trial(s) of study {name}; now {counts}")
                return
            assert out is not None  # the stage requires --out unless --worker-only
            summary, plots = write_report(study, out, seed=tune.seed)
            if own_parent:
                _log_best(summary)
                mlflow.log_artifacts(str(out), artifact_path="tune")
                _log_plot_images(out)
                mlflow.set_tag(NOTE_TAG, _study_description(name, tune, summary))
    except KeyboardInterrupt as exc:
        raise Interrupted(
            getattr(exc, "signum", signal.SIGINT),
            f"study {name}: its finished trials are kept in "
            f"{redact(url)}: run the same command again to resume",
        ) from exc
    skipped = {k: v for k, v in plots.items() if v != "ok"}
    print(
        f"tune: study {name}: best val Dice {summary['value']:.4f} (lr "
        f"{summary['learning_rate']:.2e}, batch {summary['batch_size']}) from trial "
        f"{summary['trial_number']}; {summary['n_complete']} complete, {summary['n_pruned']} "
        f"pruned, {summary['n_failed']} failed; this process ran {ran} trial(s)"
        + (f"; plots skipped: {skipped}" if skipped else "")
    )
