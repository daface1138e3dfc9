"""Scans per minute: one `liverseg predict` per scan against one process for all of them.

    python benchmarks/bench_predict_many.py [--model models] [--scans 8] [--rounds 2]

The scans are the default phantom's cases (``ingest.phantom`` of params.yaml, seeded), written
as NIfTI to a temporary folder. Each round times, on the same scans and the same model:
  * one command per scan: ``liverseg predict CT -o MASK.nii.gz``, one after the other;
  * one process: ``liverseg predict FOLDER -o OUT_DIR`` (the many-scans form).
The two forms run alternately, so that load from other processes on the machine falls on both;
the masks of the two forms are compared voxel for voxel (they must be equal).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from liverseg.data.phantom import generate_case
from liverseg.params import PhantomParams

REPO = Path(__file__).resolve().parents[1]


def liverseg(*args: str) -> None:
    cmd = [sys.executable, "-m", "liverseg.cli", "predict", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models")
    ap.add_argument("--scans", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    phantom = yaml.safe_load((REPO / "params.yaml").read_text())["ingest"]["phantom"]
    params = PhantomParams(**{**phantom, "spacing": tuple(phantom["spacing"])})

    with tempfile.TemporaryDirectory(prefix="bench-predict-many-") as tmp:
        scans = Path(tmp) / "scans"
        scans.mkdir()
        for i in range(args.scans):
            hu, _, affine = generate_case(i, params)
            nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), scans / f"case{i:02d}.nii.gz")
        files = sorted(scans.iterdir())
        shape = nib.load(files[0]).shape
        per_scan, one_process = [], []
        for r in range(args.rounds):
            one_dir, many_dir = Path(tmp) / f"one{r}", Path(tmp) / f"many{r}"
            t0 = time.perf_counter()
            for f in files:
                liverseg(str(f), "-o", str(one_dir / f.name), "--model", args.model)
            per_scan.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            liverseg(str(scans), "-o", str(many_dir), "--model", args.model)
            one_process.append(time.perf_counter() - t0)
            for f in files:
                a = np.asanyarray(nib.load(one_dir / f.name).dataobj)
                b = np.asanyarray(nib.load(many_dir / f.name).dataobj)
                assert np.array_equal(a, b), f"{f.name}: the two forms disagree"
            print(
                f"round {r + 1}: per scan {per_scan[-1]:.1f} s, one process {one_process[-1]:.1f} s"
            )

    n = len(files)
    a, b = min(per_scan), min(one_process)
    size = "x".join(map(str, shape))
    print(f"\n{n} scans of {size}, model {args.model}, best of {args.rounds}")
    print("| form | wall (s) | scans per minute |")
    print("| --- | --- | --- |")
    print(f"| one `liverseg predict` per scan | {a:.1f} | {60 * n / a:.1f} |")
    print(f"| one process, `liverseg predict DIR -o OUT_DIR` | {b:.1f} | {60 * n / b:.1f} |")
    print(f"ratio (scans per minute, one process / per scan): {a / b:.2f}")


if __name__ == "__main__":
    main()
