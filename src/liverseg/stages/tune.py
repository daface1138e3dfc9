"""`tune` stage: an Optuna study over learning rate and batch size (see :mod:`liverseg.tuning`).

Writes ``reports/tune/``: ``best_params.json`` (what ``train`` reads when ``train.use_tuned``)
and the study's plots, also logged to the MLflow run ``study-<name>`` of this invocation.

Parallel work, all through the study storage (``tune.storage`` or ``--storage``):

* ``--workers N``: this process starts ``N - 1`` extra worker processes on this machine, all
  optimise the same study, and it writes the report once they have ended;
* ``--worker-only``: optimise and write nothing; run one per machine against a shared
  PostgreSQL/MySQL database or journal file, then one plain ``liverseg tune`` writes the
  report (it runs only the trials still missing, none when the study is done).

SIGTERM is handled like Ctrl+C (:class:`liverseg.tuning.stop.StopSignal`): the running trial is
recorded FAIL, its MLflow run KILLED, the extra workers are stopped the same way, and the
parent run ends KILLED (exit 130 / 143), so nothing stays RUNNING. After a SIGKILL, the next
``tune`` marks the RUNNING trials of the dead process FAIL at once (no heartbeat wait) and
reruns them (:func:`liverseg.tuning.study.fail_dead_trials`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from liverseg.errors import ParamsError
from liverseg.params import TrainParams, TuneParams, load_section


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


def main(args: argparse.Namespace) -> None:
    tune: TuneParams = load_section("tune", args.params)
    train: TrainParams = load_section("train", args.params)
    if args.workers < 1:
        raise ParamsError(f"tune: --workers must be >= 1, got {args.workers}")
    if args.out is None and not args.worker_only:
        raise ParamsError("tune: --out is required (unless --worker-only)")
    index = args.worker_index
    if index is None:
        index = os.getpid() if args.worker_only else 0

    from liverseg.tuning.run import Workers, run_study

    run_study(
        args.prepared,
        tune,
        train,
        url=args.storage or tune.storage,
        out=args.out,
        workers=Workers(
            params=args.params,
            count=args.workers,
            only=args.worker_only,
            index=index,
            parent_run_id=args.parent_run_id,
            storage_arg=args.storage,
        ),
    )
