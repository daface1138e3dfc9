"""The prepare stage's output folder (``data/prepared/``): the one module that writes and reads it.

  cases/<case_id>.npz  image (N, S, S) float32 in [0, 1] (with neighbours, prepare.context_mm:
                       (N, S, S, 3), the slice between them), mask (N, S, S) uint8 0/1,
                       slice_index (N,) int: the axial index k of each slice in the RAS volume
  splits.json          {"test": [...], "folds": [[...], ...], "seed", "n_test", "k_folds"}
  meta.json            {"params": {"window", "image_size", ...}, "cases": {id: {...}}}

Every reader names the file and the problem when it is missing or malformed (DataError).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from liverseg.errors import DataError
from liverseg.fsutil import read_stage_json, write_json

CASES_DIR = "cases"
SPLITS_FILE = "splits.json"
META_FILE = "meta.json"


def write_case(
    folder: Path, case_id: str, image: np.ndarray, mask: np.ndarray, slice_index: np.ndarray
) -> None:
    """``folder/cases/<case_id>.npz``."""
    (Path(folder) / CASES_DIR).mkdir(exist_ok=True)
    np.savez_compressed(
        Path(folder) / CASES_DIR / f"{case_id}.npz", image=image, mask=mask, slice_index=slice_index
    )


def write_splits_and_meta(folder: Path, splits: dict[str, Any], meta: dict[str, Any]) -> None:
    write_json(Path(folder) / SPLITS_FILE, splits)
    write_json(Path(folder) / META_FILE, meta)


def load_meta(prepared: Path) -> dict[str, Any]:
    """``meta.json``'s ``params``: the HU ``window`` [low, high] and ``image_size`` (among the
    prepare section's values)."""
    path = Path(prepared) / META_FILE
    meta = read_stage_json(path, "prepare")
    params = meta.get("params") if isinstance(meta, dict) else None
    if not isinstance(params, dict) or "window" not in params or "image_size" not in params:
        raise DataError(f"{path}: params.window and params.image_size: missing")
    return params


def load_splits(prepared: Path) -> dict[str, Any]:
    """``prepared/splits.json``, the prepare stage's patient splits; a missing or malformed file
    is a DataError naming it."""
    path = Path(prepared) / SPLITS_FILE
    splits = read_stage_json(path, "prepare")
    if not isinstance(splits, dict) or not isinstance(splits.get("folds"), list):
        raise DataError(f"{path}: has no 'folds' list (not a prepare stage output)")
    if not isinstance(splits.get("test"), list):
        raise DataError(f"{path}: has no 'test' list (not a prepare stage output)")
    return splits


def load_prepared(prepared_dir: Path, case_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Stack the prepared slices of ``case_ids`` into ``(N, H, W, C)`` float32 images and
    ``(N, H, W, 1)`` masks.

    Each ``prepared_dir/cases/<case_id>.npz`` holds ``image`` (n, H, W) or (n, H, W, C) float32
    in [0, 1] and ``mask`` (n, H, W) uint8; slices keep the order of ``case_ids`` then of the
    file.
    """
    if not case_ids:
        raise DataError(f"load_prepared: no case ids given for {prepared_dir}")
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for case_id in case_ids:
        path = Path(prepared_dir) / CASES_DIR / f"{case_id}.npz"
        if not path.is_file():
            raise DataError(f"{path}: prepared case file not found (run the prepare stage)")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = sorted({"image", "mask"} - set(data.files))
                if missing:
                    raise DataError(f"{path}: missing key(s) {missing} (has {sorted(data.files)})")
                image = np.asarray(data["image"])
                mask = np.asarray(data["mask"])
                if image.ndim == 3:
                    image = image[..., None]
        except DataError:
            raise
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npz file: {exc}") from exc
        if image.ndim != 4 or image.shape[:3] != mask.shape:
            raise DataError(
                f"{path}: image {image.shape} and mask {mask.shape} must be (n, H, W[, C]) and "
                "(n, H, W)"
            )
        if mask.size and (mask.min() < 0 or mask.max() > 1):
            raise DataError(
                f"{path}: mask values must be 0/1, got range [{mask.min()}, {mask.max()}]"
            )
        if images and image.shape[1:] != images[0].shape[1:]:
            raise DataError(
                f"{path}: slice shape {image.shape[1:]} differs from {images[0].shape[1:]} "
                f"of case {case_ids[0]}"
            )
        images.append(image)
        masks.append(mask)
    return (
        np.concatenate(images).astype(np.float32, copy=False),
        np.concatenate(masks)[..., None].astype(np.float32),
    )
