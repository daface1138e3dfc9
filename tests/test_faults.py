"""Faults leave nothing RUNNING, nothing lost and nothing unbounded (issue 9).

Fast: the header bomb (CLI and the server's decoder), one-line errors with exit 2, a full disk
(an output file size limit), params that ``dvc repro`` rejects, the umask, stale runs and
trials of dead processes. Slow (real ``liverseg train``/``tune``/``dvc repro`` on a copy of
the tiny repository): SIGKILL and SIGTERM mid-fold and mid-trial, then reruns.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import run, tool_env
from liverseg import runguard
from liverseg.data.pool import map_in_processes
from liverseg.data.volumes import MAX_VOXELS_ENV, load_volume
from liverseg.errors import DataError, ParamsError
from liverseg.fsutil import atomic_dir, write_json
from liverseg.params import load_section
from liverseg.tuning.study import fail_trials

BOMB_SHAPE = (2000, 2000, 2000)
# What `liverseg predict` may use to refuse the bomb (Python, numpy, nibabel, scipy; no model).
BOMB_RSS_BOUND_MB = 400


def header_bomb(path: Path, shape: tuple[int, int, int] = BOMB_SHAPE) -> Path:
    """A ~1 KB .nii.gz whose header claims ``shape`` (the header bytes and a few zeros)."""
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header.set_data_shape(shape)
    raw = img.header.binaryblock + b"\0" * 4 + b"\0" * 64
    path.write_bytes(gzip.compress(raw))
    return path


# ru_maxrss of a child counts the RSS it inherited at fork (Linux keeps it across exec), so a
# child of a process that holds TensorFlow would report that too: measure through a small
# Python process that starts the command and writes the command's own peak RSS (KB) to argv[1].
RSS_LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); "
    "_, st, ru = os.wait4(p.pid, 0); open(sys.argv[1], 'w').write(str(ru.ru_maxrss)); "
    "sys.exit(os.waitstatus_to_exitcode(st))"
)


def liverseg(*args: str, cwd: Path, limits: dict[int, int] | None = None, **env: str):
    """Run ``liverseg`` in a subprocess; returns (exit code, stdout, stderr, peak RSS in MB)."""

    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over RLIMIT_FSIZE: EFBIG
        for res, value in (limits or {}).items():
            resource.setrlimit(res, (value, value))

    # Pipes, not files: RLIMIT_FSIZE applies to files, and the error must get through.
    rss_file = cwd / ".maxrss"
    proc = subprocess.run(
        [sys.executable, "-c", RSS_LAUNCHER, str(rss_file)]
        + [sys.executable, "-m", "liverseg.cli", *args],
        cwd=cwd,
        env=tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db", **env),
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        timeout=300,
    )
    rss_mb = int(rss_file.read_text()) / 1024
    rss_file.unlink()
    return proc.returncode, proc.stdout, proc.stderr, rss_mb


# TensorFlow's C++ start-up banner (absl logging before its own init), printed on import
# and MLflow's INFO log lines (creating a new store), none of them about the error
# and predict's progress bar (tqdm on stderr)
TF_NOISE = re.compile(
    r"^(WARNING: All log messages before absl|[IWE]\d{4} |\d{4}/\d\d/\d\d .* INFO |predict: +\d+%)"
)


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not TF_NOISE.match(ln)]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained model folder as the train stage writes it (model.keras + json)."""
    from liverseg.model.folder import save_model_dir
    from liverseg.params import ModelParams, TrainParams
    from liverseg.training.fit import compile_unet

    folder = tmp_path_factory.mktemp("model") / "model"
    cfg = TrainParams(model=ModelParams(depth=1, base_filters=2))
    save_model_dir(folder, compile_unet(16, cfg.spec, 1e-3, seed=0), [-100, 400], 16)
    return folder


def ct_file(path: Path, shape: tuple[int, int, int] = (24, 24, 12)) -> Path:
    rng = np.random.default_rng(0)
    data = rng.integers(-200, 300, size=shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0])), str(path))
    return path


# ------------------------------------------------------------------------------ header bomb
def test_header_bomb_is_refused_before_any_voxel_is_read(tmp_path: Path) -> None:
    bomb = header_bomb(tmp_path / "bomb.nii.gz")
    assert bomb.stat().st_size < 2000
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"bomb\.nii\.gz: header claims shape \(2000, 2000, 2000\)"):
        load_volume(bomb)
    assert time.perf_counter() - t0 < 5


def test_predict_refuses_the_header_bomb_in_bounded_memory(tmp_path: Path) -> None:
    bomb = header_bomb(tmp_path / "bomb.nii.gz")
    code, _, err, rss_mb = liverseg(
        "predict",
        str(bomb),
        "-o",
        str(tmp_path / "mask.nii.gz"),
        "--model",
        "nowhere",
        cwd=tmp_path,
    )
    line = one_line(err)
    assert code == 2
    assert "bomb.nii.gz" in line and "(2000, 2000, 2000)" in line and MAX_VOXELS_ENV in line
    assert rss_mb < BOMB_RSS_BOUND_MB, rss_mb
    assert not (tmp_path / "mask.nii.gz").exists()


def test_voxel_limit_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ct = ct_file(tmp_path / "ct.nii.gz")  # 24 * 24 * 12 = 6912 voxels
    monkeypatch.setenv(MAX_VOXELS_ENV, "6912")
    load_volume(ct)
    monkeypatch.setenv(MAX_VOXELS_ENV, "6911")
    with pytest.raises(DataError, match=r"ct\.nii\.gz: header claims shape \(24, 24, 12\)"):
        load_volume(ct)
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(DataError, match=f"{MAX_VOXELS_ENV}='lots'"):
        load_volume(ct)


def test_server_decoder_refuses_the_header_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    from liverseg.serving.forms import volume_from_payload

    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header.set_data_shape((300, 300, 300))  # 108 MB as float32: under the request limit
    payload = base64.b64encode(gzip.compress(img.header.binaryblock + b"\0" * 68)).decode()
    monkeypatch.setenv(MAX_VOXELS_ENV, str(200**3))
    with pytest.raises(DataError, match=r"nifti: header claims shape \(300, 300, 300\)"):
        volume_from_payload(payload, limit=1 << 30)


# ---------------------------------------------------------------------- one-line errors, exit 2
def test_predict_checks_the_output_before_the_model(tmp_path: Path) -> None:
    ct = ct_file(tmp_path / "ct.nii.gz")
    (tmp_path / "out.nii.gz").mkdir()  # (-o DIR without a mask suffix: the many-scans form)
    code, _, err, _ = liverseg(
        "predict", str(ct), "-o", "out.nii.gz", "--model", "nowhere", cwd=tmp_path
    )
    assert code == 2 and one_line(err).endswith("out.nii.gz: is a directory, not a file")
    (tmp_path / "file").write_text("x")
    code, _, err, _ = liverseg(
        "predict", str(ct), "-o", "file/mask.nii.gz", "--model", "nowhere", cwd=tmp_path
    )
    assert code == 2 and "file/mask.nii.gz: a parent is not a directory" in one_line(err)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("nowhere", "nowhere: not found (expected a train stage model folder)"),
        ("models:/liver-unet@champion", "models:/liver-unet@champion: does not resolve in"),
    ],
)
def test_predict_model_that_does_not_resolve(tmp_path: Path, model: str, message: str) -> None:
    ct = ct_file(tmp_path / "ct.nii.gz")
    code, _, err, _ = liverseg("predict", str(ct), "-o", "m.nii.gz", "--model", model, cwd=tmp_path)
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "m.nii.gz").exists()


def test_broken_model_folder(tmp_path: Path, model_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.keras").write_bytes(b"not a zip")
    ct = ct_file(tmp_path / "ct.nii.gz")
    code, _, err, _ = liverseg(
        "predict", str(ct), "-o", "m.nii.gz", "--model", "broken", cwd=tmp_path
    )
    assert code == 2 and "broken/model.keras: not a loadable Keras model" in one_line(err)


def test_debug_prints_the_traceback(tmp_path: Path) -> None:
    ct = ct_file(tmp_path / "ct.nii.gz")
    args = ("predict", str(ct), "-o", "m.nii.gz", "--model", "nowhere")
    code, _, err, _ = liverseg("--debug", *args, cwd=tmp_path)
    assert code == 2 and "Traceback" in err and "error: nowhere: not found" in err
    code, _, err, _ = liverseg(*args, cwd=tmp_path, LIVERSEG_DEBUG="1")
    assert code == 2 and "Traceback" in err


def test_ctrl_c_in_predict(tmp_path: Path, model_dir: Path) -> None:
    ct = ct_file(tmp_path / "ct.nii.gz", shape=(32, 32, 400))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "liverseg.cli", "predict", str(ct), "-o", str(out / "m.nii.gz")]
        + ["--model", str(model_dir), "--batch-size", "1"],
        env=tool_env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    seen = b""
    while b"predict: " not in seen:  # the progress bar: the model is running
        chunk = proc.stderr.read1(4096)  # type: ignore[attr-defined]
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    err = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    # (after the progress bar that Ctrl+C cut short, on its line)
    assert "liverseg predict: interrupted by SIGINT" in last, err[-3000:]
    assert "Traceback" not in err
    assert not out.exists() or list(out.iterdir()) == []


def test_predict_on_a_full_disk(tmp_path: Path, model_dir: Path) -> None:
    ct = ct_file(tmp_path / "ct.nii.gz", shape=(64, 64, 40))
    out = tmp_path / "out"
    # 200 bytes: the mask cannot be written (EFBIG, as ENOSPC would stop it)
    code, _, err, _ = liverseg(
        "predict",
        str(ct),
        "-o",
        str(out / "mask.nii.gz"),
        "--model",
        str(model_dir),
        cwd=tmp_path,
        limits={resource.RLIMIT_FSIZE: 200},
    )
    assert code == 2, err[-3000:]
    assert one_line(err).endswith("out/mask.nii.gz: File too large")
    assert list(out.iterdir()) == []  # no partial mask, no temporary file


def test_prepare_on_a_full_disk(tiny_raw: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_raw.parents[2] / "params.yaml", tmp_path / "params.yaml")
    code, _, err, _ = liverseg(
        "prepare",
        "--raw",
        str(tiny_raw),
        "--out",
        "data/prepared",
        cwd=tmp_path,
        limits={resource.RLIMIT_FSIZE: 4096},
    )
    assert code == 2, err[-3000:]
    line = one_line(err)
    assert "data/prepared" in line and "File too large" in line
    assert list((tmp_path / "data").iterdir()) == []  # no output, no temporary folder


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom data set of six tiny cases, made by the real ingest stage."""
    root = tmp_path_factory.mktemp("raw")
    params = {
        "ingest": {"dataset": "phantom", "phantom": {"n_cases": 6, "size": 32, "n_slices": 12}}
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run([sys.executable, "-m", "liverseg.cli", "ingest", "--out", "data/raw/phantom"], root)
    return root / "data" / "raw" / "phantom"


# ---------------------------------------------------------------------------------- params
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("prepar:\n  k_folds: 3\n", r"params: prepar: unknown section"),
        ("train:\n  epochs: 3\n  epochs: 4\n", r"params\.yaml:3: duplicate key 'epochs'"),
        ("train:\n  epochs: 3\ntrain:\n  epochs: 4\n", r"params\.yaml:3: duplicate key 'train'"),
    ],
)
def test_stage_cli_rejects_what_dvc_rejects(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=match):
        load_section("train", tmp_path / "params.yaml")


# ----------------------------------------------------------------------------------- umask
def test_outputs_honour_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            write_json(tmp / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "a.json").stat().st_mode) == 0o644


def test_leftovers_of_a_dead_process_are_removed(tmp_path: Path) -> None:
    pid = _dead_pid()
    left = tmp_path / f".out.tmp-{pid}-abc"
    left.mkdir()
    alive = tmp_path / f".out.tmp-{os.getppid()}-abc"
    alive.mkdir()
    with atomic_dir(tmp_path / "out"):
        pass
    assert not left.exists() and alive.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------- stale runs and trials
def test_stale_runs_of_dead_processes_are_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("x")
    with mlflow.start_run(experiment_id=exp, run_name="mine") as mine:
        # the plugin registered in pyproject.toml tags every run with its process
        assert mine.info.run_id
    tags = MlflowClient().get_run(mine.info.run_id).data.tags
    assert tags[runguard.PID_TAG] == str(os.getpid())
    client = MlflowClient()
    pid = _dead_pid()
    dead = client.create_run(exp, run_name="dead", tags=runguard.process_tags(pid))
    live = client.create_run(exp, run_name="live", tags=runguard.process_tags(os.getppid()))
    other = {**runguard.process_tags(pid), runguard.HOST_TAG: "elsewhere"}
    remote = client.create_run(exp, run_name="remote", tags=other)
    lines = runguard.end_stale_runs()
    assert lines == [f"ended 1 stale RUNNING MLflow run(s) of dead process {pid} as KILLED: dead"]
    status = [client.get_run(r.info.run_id).info.status for r in (dead, live, remote)]
    assert status == ["KILLED", "RUNNING", "RUNNING"]


def test_dead_trials_are_failed(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/o.db", study_name="s")
    dead = study.ask()
    dead.set_user_attr("process", runguard.process_tags(_dead_pid()))
    live = study.ask()
    live.set_user_attr("process", runguard.process_tags(os.getppid()))
    assert fail_trials(study) == [dead.number]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING]


# ------------------------------------------------------------------ slow: real kills, reruns
def running(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT name, status FROM runs WHERE status = 'RUNNING'").fetchall()
    return [(str(n), str(s)) for n, s in rows]


def wait_for_run(db: Path, name: str, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Until ``proc`` has a RUNNING MLflow run ``name``."""
    deadline = time.monotonic() + timeout
    while name not in {n for n, _ in running(db)}:
        assert proc.poll() is None and time.monotonic() < deadline, f"no {name} run"
        time.sleep(0.2)


def start(repo: Path, *cmd: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "liverseg.cli", *cmd],
        cwd=repo,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float = 240) -> list[str]:
    """Read ``proc``'s stderr (where the progress lines go) until a line contains ``text``;
    the lines read."""
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return seen
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError(f"{text!r} never came:\n{''.join(seen)}\n{proc.stdout.read()}")  # type: ignore[union-attr]


TRAIN = (
    "train",
    "--prepared",
    "data/prepared",
    "--tuned",
    "reports/tune/best_params.json",
    "--model-dir",
    "models",
    "--reports",
    "reports/train",
)


def set_train_param(repo: Path, key: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def processes_named(prefix: str, cwd: Path) -> list[int]:
    """PIDs of this machine's live processes whose name starts with ``prefix`` and whose
    working directory is ``cwd`` (other sessions on the machine may run workers too)."""
    pids = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_file.read_text()
            here = (stat_file.parent / "cwd").resolve(strict=True) == cwd.resolve()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        state = text.rsplit(")", 1)[1].split()[0]
        if name.startswith(prefix) and state != "Z" and here:
            pids.append(int(stat_file.parent.name))
    return pids


@pytest.mark.slow
def test_killed_train_resumes_from_its_finished_folds(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    set_train_param(repo, "processes", 1)  # one fold after the other, in the stage's process
    db = repo / "mlruns" / "mlflow.db"
    model_before = (repo / "models" / "model.keras").read_bytes()
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("liverseg")
    assert exp is not None
    runs_before = {r.info.run_id for r in client.search_runs([exp.experiment_id])}

    # 1. SIGKILL in fold 1: the runs stay RUNNING, the old model stays
    proc = start(repo, *TRAIN)
    wait_for_line(proc, "train: fold 0: best val Dice")
    wait_for_run(db, "fold-1", proc)
    proc.kill()
    proc.wait()
    assert {n for n, _ in running(db)} == {"cv", "fold-1"}
    assert (repo / "models" / "model.keras").read_bytes() == model_before

    # 2. rerun: the dead process's runs end KILLED, fold 0 is reused; SIGTERM in fold 1
    proc = start(repo, *TRAIN)
    seen = wait_for_line(proc, "train: fold 0: reused finished run")
    wait_for_run(db, "fold-1", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 143, err[-3000:]
    assert "ended 2 stale RUNNING MLflow run(s) of dead process" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("liverseg train: interrupted by SIGTERM;") and "KILLED" in last
    assert "Traceback" not in err
    assert running(db) == []
    assert not list((repo / "reports").glob(".train.tmp-*"))
    assert (repo / "models" / "model.keras").read_bytes() == model_before

    # 3. rerun to the end: fold 0 reused again, one fold-0 run for this key, none RUNNING
    res = run([sys.executable, "-m", "liverseg.cli", *TRAIN], repo)
    assert "fold 0: reused finished run" in res.stderr and "fold 1: best val Dice" in res.stderr
    assert running(db) == []
    parent = json.loads((repo / "reports" / "train" / "run.json").read_text())["parent_run_id"]
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    names = sorted(r.info.run_name for r in kids)
    assert names == ["final", "fold-0", "fold-1"]
    fold0 = next(r for r in kids if r.info.run_name == "fold-0")
    key = fold0.data.tags["fold_key"]
    same = client.search_runs([exp.experiment_id], f"tags.fold_key = '{key}'")
    # one fold-0 run for the three invocations (the tiny repository's own train made another)
    assert [r.info.run_id for r in same if r.info.run_id not in runs_before] == [fold0.info.run_id]
    assert fold0.data.tags["resumed_from_parent"] != parent


@pytest.mark.slow
def test_fold_workers_faults_end_every_run(tiny_repo: Path, tmp_path: Path) -> None:
    """Folds in worker processes (params.yaml's ``auto``): a killed stage takes its workers
    with it and their fold runs end KILLED; SIGTERM stops them cleanly; a worker's error
    names the fold and the file; then a rerun trains to the end."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    db = repo / "mlruns" / "mlflow.db"
    model_before = (repo / "models" / "model.keras").read_bytes()
    set_train_param(repo, "processes", "auto")  # (the project's default; the tiny repo's is 1)

    # 1. SIGKILL the stage while its two fold workers train: the workers get SIGTERM from
    # the kernel (parent death) and end their fold runs KILLED; only the dead stage's own
    # cv run stays RUNNING (the next command ends it)
    proc = start(repo, *TRAIN)
    wait_for_run(db, "fold-0", proc)
    wait_for_run(db, "fold-1", proc)
    assert len(processes_named("liverseg-worker", repo)) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while processes_named("liverseg-worker", repo) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_named("liverseg-worker", repo) == []
    assert running(db) == [("cv", "RUNNING")]
    assert (repo / "models" / "model.keras").read_bytes() == model_before

    # 2. SIGTERM: the stage stops its workers, every run ends KILLED, exit 143, one line
    proc = start(repo, *TRAIN)
    wait_for_run(db, "fold-0", proc)
    wait_for_run(db, "fold-1", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("liverseg train: interrupted by SIGTERM;") and "KILLED" in last
    assert "Traceback" not in err
    assert running(db) == []
    assert processes_named("liverseg-worker", repo) == []
    assert (repo / "models" / "model.keras").read_bytes() == model_before

    # 3. a worker's error: a corrupt prepared case (every fold trains or validates on it)
    # fails the folds with the file named, no run stays RUNNING and the old outputs stay
    splits = json.loads((repo / "data" / "prepared" / "splits.json").read_text())
    victim = repo / "data" / "prepared" / "cases" / f"{splits['folds'][1][0]}.npz"
    saved = victim.read_bytes()
    victim.write_bytes(b"not an npz file")
    res = subprocess.run(
        [sys.executable, "-m", "liverseg.cli", *TRAIN],
        cwd=repo,
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("liverseg train: error: fold 0: ") and victim.name in last
    assert "; fold 1: " in last and "Traceback" not in res.stderr
    assert running(db) == []
    assert (repo / "models" / "model.keras").read_bytes() == model_before
    victim.write_bytes(saved)

    # 4. rerun to the end: both folds trained by workers, no RUNNING run, a new model
    res = run([sys.executable, "-m", "liverseg.cli", *TRAIN], repo)
    assert "in 2 processes of" in res.stderr
    assert running(db) == []
    metrics = json.loads((repo / "reports" / "train" / "metrics.json").read_text())
    assert [f["fold"] for f in metrics["folds"]] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, "auto"])
def test_killed_tune_trial_is_failed_and_rerun(
    tiny_repo: Path, tmp_path: Path, processes: int | str
) -> None:
    """SIGKILL of ``tune`` while a trial trains: in the stage's process (``processes: 1``) the
    trial stays RUNNING and the next run fails it as a dead process'; in a worker (``auto``)
    the worker gets SIGTERM from the kernel and fails the trial itself. Either way the next
    run ends the dead process' MLflow runs, reruns the trial and keeps the finished ones."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tune"]["n_trials"] += 1  # one trial more than the finished study has
    params["tune"]["processes"] = processes
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    optuna_db = repo / "optuna" / "optuna.db"
    mlflow_db = repo / "mlruns" / "mlflow.db"
    cmd = ("tune", "--prepared", "data/prepared", "--out", "reports/tune")

    def trials(state: str) -> list[int]:
        with sqlite3.connect(optuna_db) as c:
            q = "SELECT number FROM trials WHERE state = ? ORDER BY number"
            return [int(n) for (n,) in c.execute(q, (state,)).fetchall()]

    done_before = trials("COMPLETE") + trials("PRUNED")

    def training() -> bool:  # a RUNNING trial with its MLflow run: it is training
        with sqlite3.connect(optuna_db) as c:
            q = (
                "SELECT count(*) FROM trials t JOIN trial_user_attributes a USING (trial_id) "
                "WHERE t.state = 'RUNNING' AND a.key = 'mlflow_run_id'"
            )
            return bool(c.execute(q).fetchone()[0])

    proc = start(repo, *cmd)
    deadline = time.monotonic() + 120
    while not training():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    if processes == 1:
        (killed,) = trials("RUNNING")
        assert running(mlflow_db)  # the trial and its study run
    else:
        deadline = time.monotonic() + 60
        while processes_named("liverseg-worker", repo) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_named("liverseg-worker", repo) == []
        assert trials("RUNNING") == []
        (killed,) = trials("FAIL")
        # the worker ended its trial's run KILLED; the dead stage's study run is left
        assert [name.startswith("study-") for name, _ in running(mlflow_db)] == [True]

    res = run([sys.executable, "-m", "liverseg.cli", *cmd], repo)
    if processes == 1:
        assert f"trial(s) {killed} of a dead process marked FAIL" in res.stdout
    assert "stale RUNNING MLflow run(s) of dead process" in res.stderr
    assert trials("RUNNING") == [] and running(mlflow_db) == []
    assert trials("FAIL") == [killed]
    done_after = trials("COMPLETE") + trials("PRUNED")
    assert set(done_before) < set(done_after)  # earlier trials kept, one more finished
    assert len(done_after) == len(done_before) + 1
    best = json.loads((repo / "reports" / "tune" / "best_params.json").read_text())
    assert best["n_failed"] == 1


@pytest.mark.slow
def test_failed_stage_keeps_the_last_good_outputs(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    keep = ["models/model.keras", "reports/train/run.json", "reports/train/metrics.json"]
    before = {p: (repo / p).read_bytes() for p in keep}
    text = (repo / "params.yaml").read_text()
    params = yaml.safe_load(text)
    params["train"]["epochs"] = -1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(
        ["dvc", "repro", "train"], cwd=repo, env=tool_env(), capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "train.epochs: must be >= 1" in proc.stdout + proc.stderr
    assert {p: (repo / p).read_bytes() for p in keep} == before
    (repo / "params.yaml").write_text(text)
    status = run(["dvc", "status"], repo).stdout
    assert "up to date" in status or status.strip() == "", status


# ------------------------------------------------------------------------------ model server
def test_server_log_has_no_traceback_for_a_client_that_hung_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from starlette.requests import ClientDisconnect

    from liverseg.serving.model import quiet_client_disconnects

    log = logging.getLogger("test.uvicorn.error")
    quiet_client_disconnects(log.name)
    quiet_client_disconnects(log.name)  # once is enough
    assert len(log.filters) == 1

    def raised(exc: BaseException) -> BaseException:
        try:
            raise exc
        except BaseException as e:
            return e

    wrapped = raised(BaseExceptionGroup("task group", [raised(ClientDisconnect())]))
    with caplog.at_level(logging.INFO, logger=log.name):
        for exc in (raised(ClientDisconnect()), wrapped, raised(BrokenPipeError(32, "pipe"))):
            log.error("Exception in ASGI application\n", exc_info=exc)
        log.error("Exception in ASGI application\n", exc_info=raised(ValueError("a bug")))
    text = caplog.text
    assert text.count("client disconnected before the response was sent") == 3
    assert text.count("Traceback") == 1 and "ValueError: a bug" in text


# A real `mlflow models serve` of a tiny registered model (conftest's, shared with test_serving).
from conftest import Server  # noqa: E402
from test_serving import post, volume_body  # noqa: E402


def _peak_rss_mb(pgid: int) -> float:
    """The largest VmHWM (peak RSS) among the live processes of process group ``pgid``."""
    peak = 0.0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if os.getpgid(int(status.parent.name)) != pgid:
                continue
            hwm = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        except (OSError, ProcessLookupError):
            continue
        if hwm:
            peak = max(peak, int(hwm.group(1)) / 1024)
    return peak


@pytest.mark.slow
def test_server_refuses_the_header_bomb_and_a_hung_up_client_leaves_one_line(
    server: Server,
    tmp_path: Path,
) -> None:
    before = _peak_rss_mb(server.proc.pid)
    bomb = base64.b64encode(header_bomb(tmp_path / "bomb.nii.gz").read_bytes()).decode()
    status, body = post(server.url, volume_body(bomb))
    assert status == 400, body
    assert "(2000, 2000, 2000)" in json.dumps(body)
    assert _peak_rss_mb(server.proc.pid) < before + 100  # no voxel was allocated

    mark = server.log.stat().st_size
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:  # a body that never comes whole
        s.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100000\r\n\r\n{"inputs": ['
        )
        time.sleep(0.5)
    deadline = time.monotonic() + 30
    while "client disconnected" not in server.log.read_bytes()[mark:].decode(errors="replace"):
        assert time.monotonic() < deadline, server.log.read_bytes()[mark:].decode()[-3000:]
        time.sleep(0.5)
    log = server.log.read_bytes()[mark:].decode(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    status, _ = post(server.url, volume_body(bomb))
    assert status == 400  # still serving


# ---------------------------------------------------------------------------------- stop points
def test_a_signal_is_recorded_and_raised_at_the_next_stop_point() -> None:
    """The handler only records the request (nothing is raised in whatever code runs when it
    lands); :func:`liverseg.stop.check` raises it, with the first signal's number."""
    from liverseg import stop

    stop.check()  # nothing asked: nothing raised
    previous = stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal does not replace the first
        time.sleep(0.05)  # the handlers have run here, without raising
        assert stop.requested() == signal.SIGTERM
        with pytest.raises(stop.Interrupted) as info:
            stop.check()
        assert info.value.signum == signal.SIGTERM
    finally:
        stop.restore(previous)


def test_a_stop_keeps_the_last_output(tmp_path: Path) -> None:
    """A stop asked while a stage writes its output: the old output stays, no temporary."""
    from liverseg import stop

    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(stop.Interrupted), atomic_dir(final) as tmp:
        (tmp / "new").write_text("new")
        stop.request(signal.SIGTERM)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in final.iterdir()] == ["old"]


def _item(arg: tuple[Path, int]) -> int:
    """A data worker's item (liverseg.data.pool): items 0 and 1 are quick, the rest take 2 s;
    each leaves a file when it starts and when it ends. Item 99 fails."""
    folder, i = arg
    (folder / f"start-{i}").touch()
    if i == 99:
        raise ValueError("item 99 is broken")
    time.sleep(0.2 if i < 2 else 2)
    (folder / f"end-{i}").touch()
    return i


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_stop_drops_the_data_items_not_started(tmp_path: Path) -> None:
    """A stop asked while the data stages' pool runs: the items running end, no item after
    them starts."""
    from liverseg import stop

    seen: list[int] = []

    def each(i: int) -> None:
        seen.append(i)
        if i == 1:
            stop.request(signal.SIGTERM)

    with pytest.raises(stop.Interrupted):
        map_in_processes(_item, [(tmp_path, i) for i in range(10)], 2, each)
    assert seen == [0, 1]  # in order
    # items 2 and 3 were handed out when 0 and 1 ended (a loaded machine may see the stop
    # before they start); 4-9 never are
    files = _files(tmp_path)
    assert {"start-0", "start-1", "end-0", "end-1"} <= files
    assert files <= {f"{e}-{i}" for e in ("start", "end") for i in range(4)}


def test_a_data_items_error_ends_the_map(tmp_path: Path) -> None:
    """An item's error is raised before the items after it are handed out."""
    with pytest.raises(ValueError, match="item 99 is broken"):
        map_in_processes(_item, [(tmp_path, i) for i in (5, 99, 6, 7)], 2, print)
    assert "start-99" in _files(tmp_path) and _files(tmp_path) <= {"start-5", "end-5", "start-99"}


def test_training_stops_at_its_next_batch() -> None:
    """A stop asked during training ends ``fit`` at the next batch (Keras' own loop), not at
    the end of the training: here after the first of 20 epochs."""
    import keras

    from liverseg import stop
    from liverseg.params import ModelParams, TrainParams
    from liverseg.training.fit import fit

    rng = np.random.default_rng(0)
    x = rng.random((8, 16, 16, 1), dtype=np.float32)
    y = (x > 0.5).astype(np.float32)
    spec = TrainParams(model=ModelParams(depth=1, base_filters=2)).spec
    epochs: list[int] = []
    ask = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: (epochs.append(e), stop.request(signal.SIGTERM))
    )
    with pytest.raises(stop.Interrupted):
        fit(
            (x, y),
            None,
            spec,
            learning_rate=1e-3,
            batch_size=4,
            epochs=20,
            seed=0,
            callbacks=[ask],
        )
    assert epochs == [0]
