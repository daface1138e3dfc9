"""`tune` stage: an Optuna study over learning rate and batch size (see :mod:`liverseg.tuning`).

Writes ``reports/tune/`` (``best_params.json``, what ``train`` reads when ``train.use_tuned``,
and the study's plots), also logged to the MLflow run ``study-<name>``. ``--workers N`` runs N
trials at a time in worker processes; ``--worker-only`` runs the same loop on a shared study
(PostgreSQL/MySQL, journal file) and writes nothing, then one plain ``liverseg tune`` writes
the report. A stop ends the running trials FAIL (their MLflow runs KILLED), keeps the finished
ones and writes no report; after a SIGKILL the next ``tune`` fails the dead process's RUNNING
trials at once and reruns them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
from pathlib import Path

from liverseg.errors import ParamsError
from liverseg.params import TrainParams, TuneParams, as_flat_dict, load_section


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepared", type=Path, required=True, help="prepare stage output")
    parser.add_argument("--out", type=Path, default=None, help="report folder (reports/tune)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--workers", type=int, default=None, help="trials at a time, in as many processes"
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


def main(args: argparse.Namespace) -> None:
    tune: TuneParams = load_section("tune", args.params)
    train: TrainParams = load_section("train", args.params)
    if args.workers is not None:
        if args.workers < 1:
            raise ParamsError(f"tune: --workers must be >= 1, got {args.workers}")
        size = max(tune.generation_size, args.workers)
        tune = dataclasses.replace(tune, processes=args.workers, generation_size=size)
    if args.out is None and not args.worker_only:
        raise ParamsError("tune: --out is required (unless --worker-only)")
    index = args.worker_index
    if index is None:
        index = os.getpid() if args.worker_only else 0
    run_study(
        args.prepared,
        tune,
        train,
        url=args.storage or tune.storage,
        out=None if args.worker_only else args.out,
        worker_index=index,
    )


def run_study(
    prepared: Path,
    tune: TuneParams,
    train: TrainParams,
    *,
    url: str,
    out: Path | None,
    worker_index: int = 0,
) -> None:
    """Optimise the study of ``prepared`` x ``tune`` x ``train``'s model spec in storage
    ``url`` under the MLflow run ``study-<name>``; then write the report to ``out`` and log it
    (``out`` None, a worker: only the best trial so far)."""
    import mlflow

    from liverseg import stop, tracking
    from liverseg.data.prepared import load_splits
    from liverseg.tuning import report
    from liverseg.tuning import study as studies
    from liverseg.tuning.generations import TrialJob, optimize_in_generations

    load_splits(prepared)
    data_hash = tracking.content_hash(prepared)
    name = studies.study_name(data_hash, tune, train)
    storage = studies.open_storage(url)
    stop.check()  # start-up takes seconds: a stop asked meanwhile ends it between its steps
    inputs = studies.study_inputs(data_hash, tune, train)
    study = studies.create_study(storage, name, tune, worker_index=worker_index, inputs=inputs)
    stop.check()
    if dead := studies.fail_trials(study):
        print(
            f"tune: study {name}: trial(s) {', '.join(map(str, dead))} of a dead process marked "
            "FAIL (their MLflow runs KILLED); they are run again",
            flush=True,
        )
    stop.check()
    exp_id = tracking.ensure_experiment(train.experiment)
    safe_url = studies.redact(url)
    tags = {
        "stage": "tune",
        "kind": "study",
        "role": "main" if out is not None else "worker",
        "study_name": name,
        "storage": safe_url,
        "git_commit": tracking.git_commit(),
        "data_sha256": data_hash,
    }
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name=f"study-{name}", tags=tags) as run:
            flat = {f"tune.{k}": v for k, v in as_flat_dict(tune).items()}
            mlflow.log_params({**flat, "tune.storage": safe_url})
            dvc_md5 = tracking.dvc_out_hash(prepared)
            tracking.log_dataset(
                prepared, data_hash if dvc_md5 == "unknown" else dvc_md5, "training"
            )
            job = TrialJob(prepared, tune, train, url, name, exp_id, run.info.run_id)
            ran = optimize_in_generations(study, tune, job)
            if out is None:
                counts = studies.count_trials(study)
                if counts["COMPLETE"]:
                    report.log_best(report.summarize(study))
                print(f"tune: worker {worker_index} ran {ran} trial(s) of study {name}; {counts}")
                return
            best, plots = report.write_report(study, out, seed=tune.seed)
            report.log_best(best)
            mlflow.log_artifacts(str(out), artifact_path="tune")
            report.log_plot_images(out)
            text = (
                f"best val Dice {best['value']:.4f} (lr {best['learning_rate']:.3g}, batch "
                f"{best['batch_size']}) from trial {best['trial_number']}"
            )
            mlflow.set_tag(tracking.NOTE_TAG, f"{tune.n_trials} trials; {text}")
    except KeyboardInterrupt as exc:
        raise stop.Interrupted(
            getattr(exc, "signum", signal.SIGINT),
            f"study {name}: its finished trials are kept in {safe_url}: run the same command "
            "again to resume",
        ) from exc
    skipped = {k: v for k, v in plots.items() if v != "ok"}
    print(
        f"tune: study {name}: {text}; {best['n_complete']} complete, {best['n_pruned']} pruned, "
        f"{best['n_failed']} failed; this process ran {ran} trial(s)"
        + (f"; plots skipped: {skipped}" if skipped else "")
    )
