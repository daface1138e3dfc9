"""``liverseg predict CT -o MASK``: segment one CT (NIfTI file, DICOM folder or zip of one).

Beside the mask it writes ``<mask>.quality.json``: the quality report of
:mod:`liverseg.evaluation.quality` (liver volume, ensemble agreement, the liver cut off by the
scan, the liver on the patient's left, and ``review`` with its reasons).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from liverseg.errors import DataError

FORMATS = ("nifti", "seg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ct",
        type=Path,
        help="CT in HU: a NIfTI file (.nii/.nii.gz), or a DICOM series (a folder or a .zip)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="mask to write: .nii.gz (NIfTI) or .dcm (DICOM SEG, for DICOM input)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="mask format (default: seg for a .dcm output, else nifti)",
    )
    parser.add_argument(
        "--series",
        default=None,
        metavar="UID",
        help="SeriesInstanceUID of the CT when the DICOM folder holds several series",
    )
    parser.add_argument(
        "--probabilities",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the liver probability map (float32 NIfTI on the input's grid, before "
        "threshold and post-processing)",
    )
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


def output_format(output: Path, requested: str | None) -> str:
    """``requested``, or the format the output's name implies (``.dcm`` -> seg)."""
    if requested is not None:
        return requested
    return "seg" if Path(output).suffix.lower() == ".dcm" else "nifti"


def quality_path(output: Path) -> Path:
    """``liver.nii.gz`` -> ``liver.quality.json``; ``mask.dcm`` -> ``mask.quality.json``."""
    name = Path(output).name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return Path(output).with_name(name + ".quality.json")


def describe_model(source: str) -> str:
    """The model's name for the SEG's algorithm identification: ``liver-unet v3`` for a
    registry URI (an alias is resolved to its version), else the folder or URI as given."""
    s = str(source)
    if not s.startswith("models:/"):
        return s
    from mlflow import MlflowClient

    ref = s[len("models:/") :].strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = MlflowClient().get_model_version_by_alias(name, alias).version
        return f"{name} v{version} (@{alias})"
    name, _, version = ref.rpartition("/")
    return f"{name} v{version}" if name else s


def main(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from liverseg.data.dicom import is_dicom_source, read_ct_series
    from liverseg.data.volumes import (
        from_canonical,
        load_volume,
        save_mask_like,
        save_probabilities_like,
    )
    from liverseg.evaluation.quality import quality_report
    from liverseg.fsutil import check_output_path, write_json
    from liverseg.inference import PostProcessing, Segmenter

    fmt = output_format(args.output, args.format)
    dicom = is_dicom_source(args.ct)
    if fmt == "seg" and not dicom:
        raise DataError(
            f"{args.ct}: a DICOM SEG references its DICOM CT series: give the series (a folder "
            "or .zip), or write NIfTI (-o MASK.nii.gz)"
        )
    if args.series is not None and not dicom:
        raise DataError(f"{args.ct}: --series applies to a DICOM folder or zip, not to NIfTI")
    for out in (args.output, args.probabilities):
        if out is not None:
            check_output_path(out)  # before the model runs, not after
    series = read_ct_series(args.ct, args.series) if dicom else None
    volume = series.volume if series is not None else load_volume(args.ct, kind="image")
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
        pred = seg.predict_ras(
            volume.data, bar.update, probabilities=args.probabilities is not None, members=True
        )
    mask = seg.postprocess(pred.mask)
    report = quality_report(mask, volume.data, volume.spacing, member_masks=pred.members)
    if fmt == "seg":
        from liverseg.data.dicomseg import write_seg

        assert series is not None
        try:
            write_seg(
                from_canonical(mask, volume),
                series.datasets,
                args.output,
                model=describe_model(args.model),
            )
        except DataError as exc:
            raise DataError(f"{args.ct}: {exc}") from exc
    else:
        save_mask_like(mask, volume, args.output)
    if args.probabilities is not None:
        assert pred.probabilities is not None
        save_probabilities_like(pred.probabilities, volume, args.probabilities)
    qpath = quality_path(args.output)
    write_json(
        qpath,
        {
            "ct": str(args.ct),
            "series": series.info.uid if series is not None else None,
            "mask": str(args.output),
            "format": fmt,
            "model": str(args.model),
            **report,
        },
    )
    ml = float(np.count_nonzero(mask)) * volume.voxel_volume_ml
    print(f"predict: {args.output}: liver volume {ml:.1f} mL ({int(mask.sum())} voxels)")
    verdict = "REVIEW: " + "; ".join(report["reasons"]) if report["review"] else "no flag raised"
    print(f"predict: quality ({qpath}): {verdict}")
