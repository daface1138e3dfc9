"""The team stack end to end, with real servers on 127.0.0.1 (``deploy/stack.py``).

PostgreSQL (MLflow's backend and auth store, the Optuna study), SeaweedFS's S3 gateway (MLflow
artifacts behind the tracking server's proxy, the DVC remote) and ``mlflow server`` with
basic-auth. Two ``liverseg tune --worker-only`` processes share the study, ``dvc repro`` writes
the report and trains, evaluates and registers against the server, ``dvc push`` / ``dvc pull``
move the data to a second clone where ``dvc repro`` does nothing, and the champion is served
from an empty folder that knows only the server's URL and an account.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import BIN, REPO, run, stop_group, tool_env

pytestmark = pytest.mark.slow

STACK = REPO / "deploy" / "stack.py"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


@dataclass
class Stack:
    folder: Path
    ports: dict[str, int]
    pids: dict[str, int]
    secrets: dict[str, str]
    worker: dict[str, str]  # env.sh: what a worker needs

    @property
    def url(self) -> str:
        return self.worker["MLFLOW_TRACKING_URI"]


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        out[key] = value.strip("'")
    return out


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # PostgreSQL runs as the postgres user when we are root: its folder must be reachable
    # (pytest's tmp_path is private to root).
    folder = Path(tempfile.mkdtemp(prefix="liverseg-stack-"))
    folder.chmod(0o711)
    secret = {
        "PGPASSWORD": secrets.token_urlsafe(16),
        "AWS_ACCESS_KEY_ID": "stacktest",
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(16),
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_urlsafe(16),
        "MLFLOW_TRACKING_USERNAME": "worker",
        "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(16),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(16),
    }
    cmd = [sys.executable, str(STACK), "up", "--dir", str(folder)]
    cmd += ["--pg-port", "0", "--s3-port", "0", "--mlflow-port", "0"]
    pids: dict[str, int] = {}
    try:
        proc = subprocess.run(
            cmd, env=tool_env(**secret), capture_output=True, text=True, timeout=400
        )
        if (folder / "stack.json").exists():
            pids = json.loads((folder / "stack.json").read_text())["pids"]
        logs = {p.name: p.read_text()[-3000:] for p in (folder / "logs").glob("*.log")}
        assert proc.returncode == 0, (proc.stdout, proc.stderr, logs)
        state = json.loads((folder / "stack.json").read_text())
        yield Stack(folder, state["ports"], pids, secret, _read_env(folder / "env.sh"))
    finally:
        down = subprocess.run(
            [sys.executable, str(STACK), "down", "--dir", str(folder)],
            capture_output=True,
            text=True,
            timeout=200,
        )
        left = [f"{name} {pid}" for name, pid in pids.items() if _alive(pid)]
        shutil.rmtree(folder, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert not left, f"still running after stack down: {left}"


def http(url: str, auth: tuple[str, str] | None = None, body: dict[str, Any] | None = None) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None)
    req.add_header("Content-Type", "application/json")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_services_take_their_secrets_from_the_environment(stack: Stack) -> None:
    for name, pid in stack.pids.items():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        for key, value in stack.secrets.items():
            if key != "MLFLOW_TRACKING_USERNAME":
                assert value not in cmdline, f"{key} on the command line of {name}"
    for name, port in stack.ports.items():
        assert _listening_hosts(port) == {"127.0.0.1"}, name


def _listening_hosts(port: int) -> set[str]:
    """The IPv4/IPv6 addresses a TCP port listens on (``/proc/net/tcp*``, state 0A)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                if len(addr) == 8:
                    hosts.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    hosts.add(addr)  # an IPv6 listener would be a failure anyway
    return hosts


def test_tracking_server_refuses_strangers(stack: Stack) -> None:
    search = f"{stack.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http(search) == 401
    assert http(search, ("worker", "wrong")) == 401
    user = stack.secrets["MLFLOW_TRACKING_USERNAME"]
    assert http(search, (user, stack.secrets["MLFLOW_TRACKING_PASSWORD"])) == 200


def test_a_changed_or_deleted_account_is_refused_at_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server trusts a checked credential for a while (stack.AUTH_CACHE_TTL_S): a password
    changed or an account deleted through its API must still stop working at once."""
    from mlflow.server import get_app_client

    search = f"{stack.url}/api/2.0/mlflow/experiments/search?max_results=1"
    old, new = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"])
    users = get_app_client("basic-auth", tracking_uri=stack.url)
    users.create_user("rotated", old)
    assert [http(search, ("rotated", old)) for _ in range(3)] == [200] * 3  # now cached
    users.update_user_password("rotated", new)
    assert http(search, ("rotated", old)) == 401
    assert http(search, ("rotated", new)) == 200
    users.delete_user("rotated")
    assert http(search, ("rotated", new)) == 401


def _tree_hashes(root: Path, *folders: str) -> dict[str, str]:
    out = {}
    for folder in folders:
        for f in sorted((root / folder).rglob("*")):
            if f.is_file():
                out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _uncached_outputs(repo: Path) -> list[str]:
    """The ``cache: false`` outputs of dvc.yaml: DVC leaves them to git."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    found = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind) or []:
                if isinstance(out, dict):
                    path, opts = next(iter(out.items()))
                    if (opts or {}).get("cache") is False:
                        found.append(path)
    return found


def _serve(folder: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (folder.parent / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/liver-unet@champion"]
        + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def test_two_workers_pipeline_remote_and_serving(
    stack: Stack, tiny_repo: Path, tmp_path: Path
) -> None:
    w = stack.worker
    worker_env = {
        k: w[k]
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    }
    s3_env = {k: w[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    pg_password = w["PGPASSWORD"]

    # --- one lab machine: the repository after a first `dvc repro`, pointed at the stack
    repo = tmp_path / "lab1"
    shutil.copytree(tiny_repo, repo, ignore=shutil.ignore_patterns("tmp"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tune"]["storage"] = w["OPTUNA_STORAGE"]  # no password: libpq reads PGPASSWORD
    # trials and folds in worker processes, as the project's default (the tiny repo's is 1)
    params["tune"]["processes"] = params["train"]["processes"] = "auto"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "remote", "add", "-d", "store", "s3://dvc/liverseg"], repo)
    run(["dvc", "remote", "modify", "store", "endpointurl", w["DVC_S3_ENDPOINT"]], repo)

    # --- two tuning workers on the shared study: one names the password in its storage URL
    # (it must never be logged), the other takes it from PGPASSWORD
    with_password = w["OPTUNA_STORAGE"].replace("liverseg@", f"liverseg:{pg_password}@")
    cmd = [str(BIN / "liverseg"), "tune", "--prepared", "data/prepared", "--worker-only"]
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    errs = [tmp_path / f"worker{i}.err" for i in range(2)]
    procs = []
    for i, (log, err) in enumerate(zip(logs, errs, strict=True)):
        extra = ["--storage", with_password] if i == 0 else []
        env = tool_env(**worker_env) if i == 0 else tool_env(**worker_env, PGPASSWORD=pg_password)
        with log.open("wb") as fh, err.open("wb") as fe:
            procs.append(subprocess.Popen([*cmd, *extra], cwd=repo, env=env, stdout=fh, stderr=fe))
    codes = [p.wait(timeout=400) for p in procs]
    assert codes == [0, 0], [err.read_text()[-3000:] for err in errs]
    logs += errs

    # --- the report, then train, evaluate and register, all logging to the server
    repro_env = {**worker_env, "PGPASSWORD": pg_password}
    out = run(["dvc", "repro", "--force-downstream"], repo, **repro_env).stdout
    for stage in ("tune", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out, out
    assert "Running stage 'ingest'" not in out and "Running stage 'prepare'" not in out
    assert "this process ran 0 trial(s)" in out, out  # the workers ran the study's trials

    import mlflow
    from mlflow import MlflowClient

    os.environ.update(worker_env)
    try:
        client = MlflowClient(tracking_uri=stack.url)
        exp = client.get_experiment_by_name("liverseg")
        assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")
        runs = client.search_runs([exp.experiment_id], max_results=500)
        names = [r.info.run_name for r in runs]
        assert names.count("cv") == 1 and "final" in names
        assert {"evaluate", "register", "fold-0", "fold-1"} <= set(names)
        studies = [r for r in runs if r.data.tags.get("kind") == "study"]
        assert sorted(r.data.tags["role"] for r in studies) == ["main", "worker", "worker"]
        trials = [r for r in runs if r.info.run_name.startswith("trial-")]
        assert len(trials) >= 2
        assert {r.info.status for r in runs} == {"FINISHED"}
        for r in runs:  # the study's password is nowhere in MLflow
            blob = json.dumps([r.data.params, r.data.tags])
            assert pg_password not in blob, r.info.run_name
        assert all(pg_password not in log.read_text() for log in logs)
        assert pg_password not in out
        for f in (repo / "reports").rglob("*"):
            assert not f.is_file() or pg_password.encode() not in f.read_bytes(), f
        champion = client.get_model_version_by_alias("liver-unet", "champion")
        assert champion.version == "1"
        # artifacts went through the server's proxy into the object store
        keys = _s3_keys(w["DVC_S3_ENDPOINT"], s3_env, "mlflow")
        assert any(k.endswith("/MLmodel") for k in keys), keys[:20]
        assert any("/tune/" in k and k.endswith(".png") for k in keys), keys[:20]

        # a read-only account may look but not register
        from mlflow.server import get_app_client

        os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"
        os.environ["MLFLOW_TRACKING_PASSWORD"] = stack.secrets["MLFLOW_AUTH_ADMIN_PASSWORD"]
        get_app_client("basic-auth", tracking_uri=stack.url).create_user(
            "viewer", "viewer-password-1"
        )
        viewer = ("viewer", "viewer-password-1")
        get = f"{stack.url}/api/2.0/mlflow/registered-models/get?name=liver-unet"
        assert http(get, viewer) == 200
        create = f"{stack.url}/api/2.0/mlflow/model-versions/create"
        body = {"name": "liver-unet", "source": champion.source, "run_id": champion.run_id}
        assert http(create, viewer, body) == 403
        assert http(create, None, body) == 401
    finally:
        for key in worker_env:
            os.environ.pop(key, None)
        mlflow.set_tracking_uri(None)

    # --- push, then a second machine: clone, pull, and nothing to reproduce
    for path in ["dvc.lock", "params.yaml", ".dvc/config", *_uncached_outputs(repo)]:
        run(["git", "add", "-f", path], repo)
    run([*GIT, "commit", "-qm", "pipeline on the team stack"], repo)
    run(["dvc", "push"], repo, **s3_env)
    clone = tmp_path / "lab2"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull"], clone, **s3_env)
    assert (clone / "dvc.lock").read_text() == (repo / "dvc.lock").read_text()
    cached = ("data", "models", "reports/evaluate/overlays")
    assert _tree_hashes(clone, *cached) == _tree_hashes(repo, *cached)
    again = run(["dvc", "repro"], clone).stdout
    assert "Running stage" not in again, again
    assert "up to date" in run(["dvc", "status"], clone).stdout
    assert (clone / "dvc.lock").read_text() == (repo / "dvc.lock").read_text()

    # --- serve the champion from an empty folder that knows only the server and an account
    empty = tmp_path / "serve" / "empty"
    empty.mkdir(parents=True)
    env = {
        "PATH": f"{BIN}{os.pathsep}/usr/bin:/bin",
        "HOME": str(empty),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **worker_env,
    }
    proc, url = _serve(empty, env)
    try:
        _wait_ping(url, proc, tmp_path / "serve" / "serve.log")
        hu = np.full((2, 40, 40), -75.0, np.float32)
        req = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": hu.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            masks = np.asarray(json.loads(r.read())["predictions"])
        assert masks.shape == (2, 40, 40) and set(np.unique(masks)) <= {0, 1}
    finally:
        stop_group(proc)


def _wait_ping(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise AssertionError(f"no /ping within 240 s:\n{log.read_text()[-4000:]}")


def _s3_keys(endpoint: str, creds: dict[str, str], bucket: str) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys
