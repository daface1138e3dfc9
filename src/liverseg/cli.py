"""The ``liverseg`` command: one sub-command per DVC stage, plus ``predict``.

Stage modules are imported only when their sub-command runs, so ``liverseg ingest`` does not
pay TensorFlow's import time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from liverseg import runguard
from liverseg.errors import LiversegError

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


def show_progress() -> None:
    """Send the library's progress lines (logger ``liverseg``, one per epoch) to stderr, where
    DVC shows them; the library itself stays quiet unless its caller does this."""
    logger = logging.getLogger("liverseg")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


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
        help=f"print the traceback of an error (or set {runguard.DEBUG_ENV}=1)",
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
    # Run as the program (the console script, ``python -m``): the process ends here, without
    # the interpreter's teardown (runguard.exit_without_teardown). Called with argv (tests):
    # returns the exit status.
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    show_progress()
    debug = args.debug or os.environ.get(runguard.DEBUG_ENV, "") not in ("", "0")
    prog = f"liverseg {args.command}"
    previous = runguard.install()
    try:
        code = _run(args, prog, debug)
    finally:
        runguard.restore(previous)
    # Under a profiler, debugger or coverage tool: a normal exit, after which it writes out.
    if as_program and sys.getprofile() is None and sys.gettrace() is None:
        runguard.exit_without_teardown(code)
    return code


def _run(args: argparse.Namespace, prog: str, debug: bool) -> int:
    try:
        if args.command in MLFLOW_COMMANDS:
            for line in runguard.end_stale_runs():
                print(f"{prog}: {line}", file=sys.stderr)
        importlib.import_module(args._module).main(args)
    except KeyboardInterrupt as exc:
        runguard.note_interrupt()
        runguard.hold()  # a second Ctrl+C must not cut the clean-up short
        if debug:
            traceback.print_exc()
        signum = exc.signum if isinstance(exc, runguard.Interrupted) else 2
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
        what = exc.message if isinstance(exc, runguard.Interrupted) and exc.message else ""
        print(
            f"{prog}: interrupted by {runguard.signal_name(signum)}{runs}; temporary outputs "
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


def error_line(exc: BaseException) -> str | None:
    """One line for an error a user can cause, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, LiversegError):
        return str(exc)
    if isinstance(exc, OSError):
        # ENOSPC, EACCES, EISDIR...: the path (fsutil names the output when the OS does not).
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        reason = exc.strerror or str(exc)
        return f"{where}: {reason}" if where else reason
    mlflow_exc = sys.modules.get("mlflow.exceptions")
    if mlflow_exc is not None and isinstance(exc, mlflow_exc.MlflowException):
        return f"MLflow: {str(exc.message).strip().splitlines()[0]}"
    return None


if __name__ == "__main__":
    sys.exit(main())
