"""`prepare` stage: NIfTI pairs -> model-ready slices per case, plus the patient-level splits.

The output folder's layout: :mod:`liverseg.data.prepared`.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from liverseg import stop
from liverseg.data.layout import find_nifti_pairs
from liverseg.data.prepared import write_case, write_splits_and_meta
from liverseg.data.slices import context_offsets, prepare_volume
from liverseg.data.splits import make_splits
from liverseg.data.volumes import load_case
from liverseg.fsutil import atomic_dir
from liverseg.params import PrepareParams, as_flat_dict, load_section


def _prepare_case(i: int, image: Path, mask: Path, case_id: str, params: PrepareParams) -> tuple:
    """One case's slices and its meta.json row (in a worker process)."""
    case = load_case(image, mask, case_id=case_id)
    # One generator per case (seed, case index): the slices drawn for one case do not change
    # when another case is added or removed.
    rng = np.random.default_rng([params.seed, i])
    # Neighbouring thin slices are near duplicates: keep about one per slice_gap_mm.
    step = max(1, round(params.slice_gap_mm / case.image.spacing[2]))
    img, msk, idx = prepare_volume(
        case.image.data,
        case.mask.data,
        window_hu=params.window,
        image_size=params.image_size,
        liver_free_fraction=params.liver_free_fraction,
        rng=rng,
        step=step,
        offsets=context_offsets(params.context_mm, case.image.spacing[2]),
    )
    row = {
        "shape": list(case.image.data.shape),
        "spacing_mm": [round(s, 4) for s in case.image.spacing],
        "slices_total": int(case.image.data.shape[2]),
        "slices_kept": int(idx.size),
        "liver_slices": int(msk.any(axis=(1, 2)).sum()),
    }
    return img, msk, idx, row


def prepare(raw: Path, out: Path, params: PrepareParams) -> dict[str, Any]:
    """Window, resize and select slices of every case in ``raw`` (one process per CPU); write
    ``out`` atomically."""
    pairs = find_nifti_pairs(raw)
    # the preprocessing a model of these slices needs: the section's values and the crop
    meta: dict[str, Any] = {"params": {**as_flat_dict(params), "crop": "body"}, "cases": {}}
    counts: dict[str, int] = {}
    workers = max(1, min(len(pairs), os.cpu_count() or 1))
    pool = ProcessPoolExecutor(workers)
    try:
        jobs = [
            pool.submit(_prepare_case, i, p.image, p.mask, p.case_id, params)
            for i, p in enumerate(pairs)
        ]
        with atomic_dir(out) as tmp:
            for pair, job in zip(pairs, jobs, strict=True):
                stop.check()
                image, mask, idx, row = job.result()
                write_case(tmp, pair.case_id, image, mask, idx)
                counts[pair.case_id] = int(idx.size)
                meta["cases"][pair.case_id] = row
            splits = make_splits(
                counts,
                n_test=params.n_test,
                k_folds=params.k_folds,
                seed=params.seed,
                test_cases=params.test_cases,
            )
            write_splits_and_meta(tmp, splits, meta)
    finally:  # on an error or a stop, the cases not started are dropped
        pool.shutdown(cancel_futures=True)
    return splits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw", type=Path, required=True, help="folder of NIfTI pairs (ingest)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))


def main(args: argparse.Namespace) -> None:
    params: PrepareParams = load_section("prepare", args.params)
    splits = prepare(args.raw, args.out, params)
    print(
        f"prepare: test {splits['test']}; folds " + "; ".join(",".join(f) for f in splits["folds"])
    )
