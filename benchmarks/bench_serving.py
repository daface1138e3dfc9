"""Latency, payload size and throughput of the served liver model (``mlflow models serve``).

    python benchmarks/bench_serving.py --url http://127.0.0.1:5000
    python benchmarks/bench_serving.py --model-uri models:/liver-unet@champion   # starts a server

Both request forms are measured on synthetic CT (an abdomen-like phantom in HU, int16): one
512x512 slice (``{"inputs": ...}``) and one 512x512x129 volume (base64 ``.nii.gz`` in
``dataframe_split``). Latency is measured one request at a time after a warm-up request;
throughput with ``--clients`` threads posting back to back for ``--duration`` seconds each.
Prints a markdown table. Standard library and numpy/nibabel only.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

SPACING_MM = (0.75, 0.75, 2.5)  # a typical abdominal CT grid


def phantom_ct(size: int, n_slices: int, seed: int = 0) -> np.ndarray:
    """(size, size, n_slices) int16 HU: air, a body ellipse (40 HU), a liver-like blob (60 HU),
    a spine-like disc (700 HU) and noise; the liver spans the middle two thirds in z."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 <= 1
    liver = ((xx - 0.36) / 0.16) ** 2 + ((yy - 0.45) / 0.13) ** 2 <= 1
    spine = ((xx - 0.5) / 0.05) ** 2 + ((yy - 0.72) / 0.05) ** 2 <= 1
    z = np.arange(n_slices) / max(n_slices - 1, 1)
    in_liver = (z > 1 / 6) & (z < 5 / 6)
    ct = np.where(body, 40.0, -1000.0)[:, :, None] * np.ones(n_slices)
    ct[liver[:, :, None] & in_liver[None, None, :]] = 60.0
    ct[spine] = 700.0
    ct += rng.normal(0.0, 12.0, ct.shape)
    return np.clip(np.rint(ct), -1024, 3071).astype(np.int16)


def nifti_gz(ct: np.ndarray) -> bytes:
    img = nib.Nifti1Image(ct, np.diag([*SPACING_MM, 1.0]))
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=6)


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    response_bytes: int = 0
    first_error: str = ""
    wall: float = 0.0


def post(url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def timed(url: str, body: bytes, timeout: float, into: Result) -> None:
    t0 = time.perf_counter()
    try:
        status, data = post(url, body, timeout)
        json.loads(data)
    except (OSError, ValueError) as exc:
        status, data = -1, str(exc).encode()
    dt = time.perf_counter() - t0
    if status == 200:
        into.latencies.append(dt)
        into.response_bytes = len(data)
    else:
        into.errors += 1
        into.first_error = into.first_error or f"{status}: {data[-300:].decode(errors='replace')}"


def latency(url: str, body: bytes, repeats: int, timeout: float) -> Result:
    timed(url, body, timeout, Result())  # warm-up: graph tracing, first-call allocations
    res = Result()
    for _ in range(repeats):
        timed(url, body, timeout, res)
    return res


def throughput(url: str, body: bytes, clients: int, duration: float, timeout: float) -> Result:
    """Requests started during ``duration`` by ``clients`` threads; ``wall`` runs until the
    last one has answered, so that slow requests do not inflate the rate."""
    res = Result()
    lock = threading.Lock()
    start = time.monotonic()
    stop = start + duration

    def worker() -> None:
        mine = Result()
        while time.monotonic() < stop:
            timed(url, body, timeout, mine)
        with lock:
            res.latencies += mine.latencies
            res.errors += mine.errors
            res.first_error = res.first_error or mine.first_error

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res.wall = time.monotonic() - start
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


def start_server(model_uri: str, port: int, extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra_env)
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def wait_ready(base: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode} before /ping answered")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(1)
    raise SystemExit(f"{base}/ping did not answer within {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:5000")
    src.add_argument("--model-uri", help="start `mlflow models serve -m URI` for the run")
    p.add_argument("--size", type=int, default=512, help="in-plane size (default 512)")
    p.add_argument("--slices", type=int, default=129, help="slices of the volume (default 129)")
    p.add_argument("--slice-repeats", type=int, default=20)
    p.add_argument("--volume-repeats", type=int, default=5)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=30.0, help="seconds per throughput run")
    p.add_argument("--throughput-forms", default="slice,volume", help="comma list of slice, volume")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    args = p.parse_args()

    ct = phantom_ct(args.size, args.slices)
    mid = ct[:, :, args.slices // 2]
    slice_body = json.dumps({"inputs": [mid.tolist()]}).encode()
    volume_b64 = base64.b64encode(nifti_gz(ct)).decode("ascii")
    volume_body = json.dumps(
        {"dataframe_split": {"columns": ["nifti"], "data": [[volume_b64]]}}
    ).encode()
    bodies = {"slice": slice_body, "volume": volume_body}

    proc = None
    if args.model_uri:
        port = free_port()
        proc = start_server(args.model_uri, port, {})
        base = f"http://127.0.0.1:{port}"
    else:
        base = args.url.rstrip("/").removesuffix("/invocations")
    url = f"{base}/invocations"
    try:
        t0 = time.perf_counter()
        wait_ready(base, proc, 240.0)
        ready_s = time.perf_counter() - t0
        lat = {
            "slice": latency(url, slice_body, args.slice_repeats, args.timeout),
            "volume": latency(url, volume_body, args.volume_repeats, args.timeout),
        }
        forms = [f.strip() for f in args.throughput_forms.split(",") if f.strip()]
        thr = {
            f: throughput(url, bodies[f], args.clients, args.duration, args.timeout) for f in forms
        }
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)

    s, n = args.size, args.slices
    cols = {"slice": f"one {s}x{s} slice", "volume": f"one {s}x{s}x{n} volume"}
    print(
        f"\nServer {base}"
        + (f" (started for {args.model_uri}, ready in {ready_s:.0f} s)" if proc else "")
    )
    print(f"\n| measure | {cols['slice']} | {cols['volume']} |")
    print("|---|---|---|")
    print(f"| request body (JSON) | {mb(len(slice_body))} | {mb(len(volume_body))} |")
    resp = {k: mb(v.response_bytes) for k, v in lat.items()}
    print(f"| response body | {resp['slice']} | {resp['volume']} |")
    for q in (50, 95):
        print(
            f"| latency p{q} (1 client, {args.slice_repeats}/{args.volume_repeats} requests) | "
            f"{pct(lat['slice'].latencies, q):.3f} s | {pct(lat['volume'].latencies, q):.3f} s |"
        )
    row = []
    for f in ("slice", "volume"):
        if f not in thr:
            row.append("not run")
            continue
        r = thr[f]
        rate = len(r.latencies) / r.wall
        unit = rate * (1 if f == "slice" else n)
        row.append(
            f"{rate:.2f} req/s ({unit:.1f} slices/s), p50 {pct(r.latencies, 50):.2f} s, "
            f"errors {r.errors}"
        )
    print(f"| throughput ({args.clients} clients, {args.duration:.0f} s) | {row[0]} | {row[1]} |")
    errors = {k: v.first_error for k, v in {**lat, **thr}.items() if v.first_error}
    errs = sum(r.errors for r in lat.values())
    print(f"\nLatency-run errors: {errs}")
    for k, msg in errors.items():
        print(f"first {k} error: {msg}")


if __name__ == "__main__":
    main()
