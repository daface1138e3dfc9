"""``liverseg predict CT.nii.gz -o MASK.nii.gz``: segment one CT file with a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", type=Path, help="CT volume in HU (.nii or .nii.gz)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="mask to write (.nii.gz)")
    parser.add_argument(
        "--model",
        default="models",
        help="model folder (default: models/, the train stage's) or an MLflow URI such as "
        "models:/liver-unet@champion",
    )
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-largest-component", action="store_true")
    parser.add_argument(
        "--fill-holes",
        action="store_true",
        help="fill holes per axial slice (off by default, as evaluate.fill_holes: on the phantom "
        "it cost test Dice, see benchmarks/README.md)",
    )


def main(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from liverseg.data.volumes import load_volume, save_mask_like
    from liverseg.fsutil import check_output_path
    from liverseg.inference import PostProcessing, Segmenter

    check_output_path(args.output)  # before the model runs, not after
    volume = load_volume(args.ct, kind="image")
    seg = Segmenter.load(
        args.model,
        post=PostProcessing(
            threshold=args.threshold,
            largest_component=not args.no_largest_component,
            fill_holes=args.fill_holes,
        ),
        batch_size=args.batch_size,
    )
    with tqdm(total=volume.data.shape[2], unit="slice", desc="predict") as bar:
        mask = seg.segment_volume(volume, progress=bar.update)
    save_mask_like(mask, volume, args.output)
    ml = float(np.count_nonzero(mask)) * volume.voxel_volume_ml
    print(f"predict: {args.output}: liver volume {ml:.1f} mL ({int(mask.sum())} voxels)")
