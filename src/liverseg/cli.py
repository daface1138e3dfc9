"""The ``liverseg`` command: one sub-command per DVC stage, plus ``predict``.

Stage modules are imported only when their sub-command runs, so ``liverseg ingest`` does not
pay TensorFlow's import time.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback

from liverseg import runguard, show_progress, stop
from liverseg.errors import error_line

COMMANDS = {
    "ingest": ("liverseg.stages.ingest", "make the data set's NIfTI pairs (phantom or IRCAD)"),
    "prepare": ("liverseg.stages.prepare", "window, resize and select slices; patient splits"),
    "tune": ("liverseg.stages.tune", "Optuna study over learning rate and batch size"),
    "train": ("liverseg.stages.train", "k-fold cross-validation and the final model (MLflow)"),
    "evaluate": ("liverseg.stages.evaluate", "3D metrics on the held-out test patients"),
    "register": ("liverseg.stages.register", "register the model; move the champion alias"),
    "predict": ("liverseg.predict", "segment the liver of a CT (NIfTI, or a DICOM series)"),
}

# MLflow 3 refuses a plain ./mlruns file store; the project's local store is a SQLite database
# inside mlruns/ (artifacts beside it). Set here, in the entry point, never at import.
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
# Commands that track in MLflow: before they start, runs of dead processes are ended.
MLFLOW_COMMANDS = {"tune", "train", "evaluate", "register"}
DEBUG_ENV = "LIVERSEG_DEBUG"


def resolve_tracking_uri(uri: str | None, env: dict[str, str]) -> str:
    """``uri`` (default: the local store); a relative SQLite path is taken from ``DVC_ROOT``.

    ``dvc exp run --queue`` / ``--temp`` run the stages in a temporary copy of the repository
    and set ``DVC_ROOT`` to the original one, so every experiment's runs land in the
    repository's own store. In the repository itself the URI stays relative.
    """
    uri = uri or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    root = env.get("DVC_ROOT")
    relative = uri.startswith(prefix) and not uri.startswith(prefix + "/")
    if root and relative and os.path.realpath(root) != os.path.realpath(os.getcwd()):
        return prefix + os.path.join(os.path.realpath(root), uri[len(prefix) :])
    return uri


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to declare its arguments."""
    parser = argparse.ArgumentParser(prog="liverseg", description=__doc__)
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"print the traceback of an error (or set {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # MLflow draws a progress bar per artifact download (train loads every fold model from its
    # run): in a stage's log that is noise between the per-epoch lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(
        os.environ.get("MLFLOW_TRACKING_URI"), dict(os.environ)
    )
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    show_progress()
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    prog = f"liverseg {args.command}"
    previous = stop.install()
    try:
        return _run(args, prog, debug)
    finally:
        stop.restore(previous)


def _run(args: argparse.Namespace, prog: str, debug: bool) -> int:
    """The stage; on a stop (:mod:`liverseg.stop`) its runs end KILLED: 128 + the signal."""
    try:
        if args.command in MLFLOW_COMMANDS:
            for line in runguard.end_stale_runs():
                print(f"{prog}: {line}", file=sys.stderr)
            stop.check()  # (the store's first use may have created its tables: seconds)
        # A stop asked after the stage's last check comes too late: the stage has finished.
        importlib.import_module(args._module).main(args)
    except KeyboardInterrupt as exc:  # stop.Interrupted, or SIGINT before stop.install
        if debug:
            traceback.print_exc()
        signum = exc.signum if isinstance(exc, stop.Interrupted) else signal.SIGINT
        stop.request(signum)
        try:
            n = runguard.end_own_runs("KILLED")
            runs = f"; {n} MLflow run(s) ended KILLED" if n else ""
        except Exception as store_exc:  # the store itself failed: the next run ends them
            if debug:
                traceback.print_exc()
            runs = (
                f"; MLflow runs not ended ({error_line(store_exc) or type(store_exc).__name__}),"
                " the next run of a stage ends them as stale"
            )
        what = exc.message if isinstance(exc, stop.Interrupted) and exc.message else ""
        print(
            f"{prog}: interrupted by {signal.Signals(signum).name}{runs}; temporary outputs "
            f"removed{'; ' + what if what else ''}",
            file=sys.stderr,
        )
        return 128 + signum
    except Exception as exc:
        msg = error_line(exc)
        if msg is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
