"""`tune` stage: an Optuna study over learning rate and batch size (see :mod:`liverseg.tuning`).

Writes ``reports/tune/``: ``best_params.json`` (what ``train`` reads when ``train.use_tuned``)
and the study's plots, also logged to the MLflow run ``study-<name>`` of this invocation.

Parallel work, all through the study storage (``tune.storage`` or ``--storage``):

* ``--workers N``: this process starts ``N - 1`` extra worker processes on this machine, all
  optimise the same study, and it writes the report once they have ended;
* ``--worker-only``: optimise and write nothing; run one per machine against a shared
  PostgreSQL/MySQL database or journal file, then one plain ``liverseg tune`` writes the
  report (it runs only the trials still missing, none when the study is done).

SIGTERM is handled like Ctrl+C (:class:`liverseg.tuning.StopSignal`): the running trial is
recorded FAIL, its MLflow run KILLED, the extra workers are stopped the same way, and the
parent run ends KILLED (exit 130 / 143), so nothing stays RUNNING. After a SIGKILL, the next
``tune`` marks the RUNNING trials of the dead process FAIL at once (no heartbeat wait) and
reruns them (:func:`liverseg.tuning.fail_dead_trials`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from liverseg.data.splits import load_splits
from liverseg.errors import ParamsError
from liverseg.params import TrainParams, TuneParams, as_flat_dict, load_section
from liverseg.runguard import Interrupted

WORKER_STOP_TIMEOUT_S = 60  # a stopped worker first records its trial FAIL and ends its runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepared", type=Path, required=True, help="prepare stage output")
    parser.add_argument("--out", type=Path, default=None, help="report folder (reports/tune)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--workers", type=int, default=1, help="processes on this machine optimising the study"
    )
    parser.add_argument(
        "--worker-only",
        action="store_true",
        help="only run trials (no report): for extra workers, e.g. on other machines",
    )
    parser.add_argument("--storage", default=None, help="study storage URL, overrides tune.storage")
    parser.add_argument(
        "--worker-index",
        type=int,
        default=None,
        help="distinct per worker, seeds its sampler (default 0; the pid with --worker-only)",
    )
    parser.add_argument(
        "--parent-run-id", default=None, help=argparse.SUPPRESS
    )  # set for the workers that --workers starts: their trial runs nest under this run


def _worker_command(args: argparse.Namespace, index: int, parent_run_id: str) -> list[str]:
    cmd = [sys.executable, "-m", "liverseg.cli", "tune", "--prepared", str(args.prepared)]
    cmd += ["--params", str(args.params), "--workers", "1", "--worker-only"]
    cmd += ["--worker-index", str(index), "--parent-run-id", parent_run_id]
    if args.storage:
        cmd += ["--storage", args.storage]
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
            mlflow.log_image(im.convert("RGB"), key=f"study_{png.stem}", step=0)


def _study_description(name: str, tune: TuneParams, summary: dict[str, Any]) -> str:
    return (
        f"Optuna study `{name}` over learning rate [{tune.lr_min:g}, {tune.lr_max:g}] and "
        f"batch size {list(tune.batch_sizes)}: {tune.n_trials} trials of {tune.epochs} epochs "
        f"on fold(s) {list(tune.folds)}, median pruner. Best: trial {summary['trial_number']} "
        f"(val Dice {summary['value']:.4f}, lr {summary['learning_rate']:.3g}, batch "
        f"{summary['batch_size']}). Compare the `trial-N` runs on `objective_val_dice`; the "
        "study plots are under this run's images."
    )


def main(args: argparse.Namespace) -> None:
    tune: TuneParams = load_section("tune", args.params)
    train: TrainParams = load_section("train", args.params)
    if args.workers < 1:
        raise ParamsError(f"tune: --workers must be >= 1, got {args.workers}")
    if args.out is None and not args.worker_only:
        raise ParamsError("tune: --out is required (unless --worker-only)")
    url = args.storage or tune.storage
    index = args.worker_index
    if index is None:
        index = os.getpid() if args.worker_only else 0

    # TensorFlow is imported only after the extra workers have started (make_objective), so
    # their start-up overlaps this process's.
    import mlflow

    from liverseg import tuning
    from liverseg.training.setup import keras_session
    from liverseg.training.tracking import (
        NOTE_TAG,
        content_hash,
        dvc_out_hash,
        ensure_experiment,
        git_commit,
        log_dataset,
    )

    load_splits(args.prepared)
    data_hash = content_hash(args.prepared)
    inputs = tuning.study_inputs(data_hash, tune, train)
    name = tuning.study_name(data_hash, tune, train)
    study = tuning.create_study(
        tuning.open_storage(url), name, tune, worker_index=index, inputs=inputs
    )
    dead = tuning.fail_dead_trials(study)
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
        "role": "worker" if args.worker_only else "main",
        "study_name": name,
        "storage": tuning.redact(url),
        "git_commit": git_commit(),
        "data_sha256": data_hash,
    }
    try:
        with contextlib.ExitStack() as stack:
            stop = tuning.StopSignal()
            stack.enter_context(stop.installed())
            parent_id = args.parent_run_id
            if parent_id is None:
                run = stack.enter_context(
                    mlflow.start_run(experiment_id=exp_id, run_name=f"study-{name}", tags=tags)
                )
                parent_id = run.info.run_id
                mlflow.log_params(_parent_params(tune, tuning.redact(url), args.workers))
                dvc_md5 = dvc_out_hash(args.prepared)
                log_dataset(
                    args.prepared, data_hash if dvc_md5 == "unknown" else dvc_md5, "training"
                )
            procs: list[subprocess.Popen[bytes]] = []
            try:
                for i in range(1, args.workers):
                    procs.append(subprocess.Popen(_worker_command(args, index + i, parent_id)))
                keras_session(train.precision, tune.seed)
                objective = tuning.make_objective(
                    args.prepared,
                    tune,
                    train,
                    experiment_id=exp_id,
                    parent_run_id=parent_id,
                    stop=stop,
                )
                ran = tuning.optimize(study, objective, tune, stop)
                codes = [p.wait() for p in procs]
            except BaseException:
                _stop(procs)
                raise
            failed = [f"pid {p.pid} exit {c}" for p, c in zip(procs, codes, strict=True) if c]
            if failed:
                raise tuning.TuningError(f"study {name}: worker process(es) failed: {failed}")

            own_parent = args.parent_run_id is None
            if args.worker_only:
                counts = tuning.count_trials(study)
                if own_parent and counts["COMPLETE"]:
                    _log_best(tuning.summarize(study))
                print(f"tune: worker {index} ran {ran} trial(s) of study {name}; now {counts}")
                return
            summary, plots = tuning.write_report(study, args.out, seed=tune.seed)
            if own_parent:
                _log_best(summary)
                mlflow.log_artifacts(str(args.out), artifact_path="tune")
                _log_plot_images(args.out)
                mlflow.set_tag(NOTE_TAG, _study_description(name, tune, summary))
    except KeyboardInterrupt as exc:
        raise Interrupted(
            getattr(exc, "signum", signal.SIGINT),
            f"study {name}: its finished trials are kept in "
            f"{tuning.redact(url)}: run the same command again to resume",
        ) from exc
    skipped = {k: v for k, v in plots.items() if v != "ok"}
    print(
        f"tune: study {name}: best val Dice {summary['value']:.4f} (lr "
        f"{summary['learning_rate']:.2e}, batch {summary['batch_size']}) from trial "
        f"{summary['trial_number']}; {summary['n_complete']} complete, {summary['n_pruned']} "
        f"pruned, {summary['n_failed']} failed; this process ran {ran} trial(s)"
        + (f"; plots skipped: {skipped}" if skipped else "")
    )
