"""`prepare` stage: NIfTI pairs -> model-ready slices per case, plus the patient-level splits.

The output folder's layout: :mod:`liverseg.data.prepared`.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from liverseg.data.layout import CasePaths, find_nifti_pairs
from liverseg.data.pool import map_in_processes
from liverseg.data.prepared import write_case, write_splits_and_meta
from liverseg.data.slices import context_offsets, prepare_volume
from liverseg.data.splits import make_splits
from liverseg.data.volumes import load_case
from liverseg.fsutil import atomic_dir
from liverseg.params import PrepareParams, as_flat_dict, load_section


def _prepare_case(item: tuple[int, CasePaths], params: PrepareParams) -> tuple:
    """The ``i``-th case's id, slices and meta.json row (in a worker process)."""
    i, pair = item
    case = load_case(pair.image, pair.mask, case_id=pair.case_id)
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
    return pair.case_id, img, msk, idx, row


def prepare(raw: Path, out: Path, params: PrepareParams) -> dict[str, Any]:
    """Window, resize and select slices of every case in ``raw`` (one process per CPU); write
    ``out`` atomically."""
    pairs = find_nifti_pairs(raw)
    # the preprocessing a model of these slices needs: the section's values and the crop
    meta: dict[str, Any] = {"params": {**as_flat_dict(params), "crop": "body"}, "cases": {}}
    counts: dict[str, int] = {}
    workers = max(1, min(len(pairs), os.cpu_count() or 1))
    with atomic_dir(out) as tmp:

        def keep(result: tuple) -> None:
            case_id, image, mask, idx, row = result
            write_case(tmp, case_id, image, mask, idx)
            counts[case_id] = int(idx.size)
            meta["cases"][case_id] = row

        map_in_processes(partial(_prepare_case, params=params), enumerate(pairs), workers, keep)
        splits = make_splits(
            counts,
            n_test=params.n_test,
            k_folds=params.k_folds,
            seed=params.seed,
            test_cases=params.test_cases,
        )
        write_splits_and_meta(tmp, splits, meta)
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
