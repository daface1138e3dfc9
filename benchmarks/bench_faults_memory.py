"""Peak memory of ``liverseg predict``: a 512x512x300 CT, and a header bomb it must refuse.

Each case runs ``liverseg predict`` in a fresh process and reads that process's peak resident
set size (``ru_maxrss`` from ``os.wait4``). Without ``--model``, an untrained model of the
default architecture (three-fold ensemble, depth 4, 8 base filters, 96x96 input) is built in a
temporary folder: memory does not depend on the weights.

    python benchmarks/bench_faults_memory.py [--model models]
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

# ru_maxrss of a child counts the RSS it inherited at fork (Linux keeps it across exec), so a
# child of a process that holds TensorFlow would report that too: measure through a small
# Python process that starts the command and writes the command's own peak RSS (KB) to argv[1].
RSS_LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); "
    "_, st, ru = os.wait4(p.pid, 0); open(sys.argv[1], 'w').write(str(ru.ru_maxrss)); "
    "sys.exit(os.waitstatus_to_exitcode(st))"
)


def default_model(folder: Path) -> Path:
    from liverseg.fsutil import write_json
    from liverseg.params import load_section
    from liverseg.training.crossval import ensemble
    from liverseg.training.fit import compile_unet

    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_section("train")
    prep = load_section("prepare")
    members = [compile_unet(prep.image_size, cfg.spec, 1e-3, seed=i) for i in range(prep.k_folds)]
    ensemble(members).save(folder / "model.keras")
    write_json(
        folder / "preprocessing.json",
        {"window": list(prep.window), "image_size": prep.image_size},
    )
    return folder


def ct(path: Path, shape: tuple[int, int, int]) -> Path:
    """A CT-like int16 volume: body ellipse of soft tissue in air, noise, a liver-ish blob."""
    x, y = np.mgrid[: shape[0], : shape[1]]
    cx, cy = shape[0] / 2, shape[1] / 2
    body = ((x - cx) / (0.42 * shape[0])) ** 2 + ((y - cy) / (0.32 * shape[1])) ** 2 <= 1
    liver = ((x - 0.4 * shape[0]) / (0.15 * shape[0])) ** 2 + ((y - cy) / (0.12 * shape[1])) ** 2
    sl = np.where(body, 40, -1000).astype(np.int16)
    sl[liver <= 1] = 110
    rng = np.random.default_rng(0)
    vol = np.repeat(sl[:, :, None], shape[2], axis=2)
    vol += rng.normal(0, 15, size=shape).astype(np.int16)
    img = nib.Nifti1Image(vol, np.diag([0.7, 0.7, 1.0, 1.0]))
    nib.save(img, str(path))
    return path


def header_bomb(path: Path, shape: tuple[int, int, int]) -> Path:
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header.set_data_shape(shape)
    path.write_bytes(gzip.compress(img.header.binaryblock + b"\0" * 68))
    return path


def predict(ct_path: Path, model: Path, out: Path) -> tuple[int, float, float, str]:
    """(exit code, peak RSS MB, seconds, last stderr line) of one ``liverseg predict``."""
    t0 = time.perf_counter()
    rss_file = out.with_name("maxrss")
    proc = subprocess.run(
        [sys.executable, "-c", RSS_LAUNCHER, str(rss_file)]
        + [sys.executable, "-m", "liverseg.cli", "predict", str(ct_path), "-o", str(out)]
        + ["--model", str(model)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    seconds = time.perf_counter() - t0
    last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "")
    return proc.returncode, int(rss_file.read_text()) / 1024, seconds, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = args.model or default_model(tmp / "model")
        cases = {
            "CT 512x512x300 (int16, 150 MB of voxels)": ct(tmp / "ct.nii.gz", (512, 512, 300)),
            "header bomb 2000^3 (1 KB file)": header_bomb(tmp / "bomb.nii.gz", (2000, 2000, 2000)),
        }
        for name, path in cases.items():
            code, rss, seconds, last = predict(path, model, tmp / "mask.nii.gz")
            print(f"{name}: exit {code}, peak RSS {rss:.0f} MB, {seconds:.1f} s")
            print(f"    {last}")


if __name__ == "__main__":
    main()
