"""Basic auth's cost per request on the team stack: N ``log_metric`` calls as the worker account.

Against a stack that ``deploy/stack.py up --dir DIR`` started; prints the wall time per call and
the CPU seconds the MLflow server (its process and children) spent meanwhile::

    python deploy/stack.py up --dir /tmp/s --pg-port 0 --s3-port 0 --mlflow-port 0
    python benchmarks/bench_stack_auth.py /tmp/s --calls 100
    python deploy/stack.py down --dir /tmp/s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def server_cpu_s(pid: int) -> int:
    """CPU seconds (whole) of ``pid`` and its children, from ``ps -o times``."""
    out = subprocess.run(
        ["ps", "-o", "times=", "-p", str(pid), "--ppid", str(pid)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(x) for x in out.split())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, help="the stack's --dir (env.sh, stack.json)")
    p.add_argument("--calls", type=int, default=100)
    args = p.parse_args(argv)
    for line in (args.dir / "env.sh").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        os.environ[key] = value.strip("'")
    pid = int(json.loads((args.dir / "stack.json").read_text())["pids"]["mlflow"])

    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("bench-stack-auth")
    exp_id = exp.experiment_id if exp else client.create_experiment("bench-stack-auth")
    run_id = client.create_run(exp_id).info.run_id
    cpu0, t0 = server_cpu_s(pid), time.perf_counter()
    for i in range(args.calls):
        client.log_metric(run_id, "m", float(i), step=i)
    wall, cpu = time.perf_counter() - t0, server_cpu_s(pid) - cpu0
    client.set_terminated(run_id)
    print(
        json.dumps(
            {
                "calls": args.calls,
                "ms_per_call": round(1000 * wall / args.calls, 1),
                "server_cpu_s": cpu,
                "server_cpu_s_per_call": round(cpu / args.calls, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
