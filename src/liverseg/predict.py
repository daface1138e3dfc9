"""``liverseg predict IN [IN ...] -o OUT``: segment CT scans (NIfTI files, DICOM folders or zips).

One scan to one mask file (``-o liver.nii.gz`` or ``.dcm``), or many in one process (TensorFlow
starts and the model loads once) to a folder with ``summary.csv`` (docs/dicom.md). Beside each
mask, ``<mask>.quality.json``: the report of :mod:`liverseg.evaluation.quality`.
"""

from __future__ import annotations

import argparse
import csv
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from liverseg.errors import DataError, error_line

if TYPE_CHECKING:
    from liverseg.inference import Segmenter

FORMATS = ("nifti", "seg")
MASK_SUFFIXES = (".nii.gz", ".nii", ".dcm")
SUMMARY_FILE = "summary.csv"
SUMMARY_COLUMNS = (
    "scan", "output", "volume_ml", "agreement", "review", "reasons", "notes", "error"
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ct",
        type=Path,
        nargs="+",
        help="CT in HU: a NIfTI file (.nii/.nii.gz), or a DICOM series (a folder or a .zip); "
        "several, or a folder of them, with -o OUT_DIR",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="mask to write: .nii.gz (NIfTI) or .dcm (DICOM SEG, for DICOM input); or a folder "
        "for many scans (a mask and quality report per scan, and summary.csv)",
    )
    parser.add_argument("--format", choices=FORMATS, help="default: seg for .dcm, else nifti")
    parser.add_argument("--series", metavar="UID", help="the CT's SeriesInstanceUID, if several")
    parser.add_argument(
        "--probabilities", type=Path, help="also write the probability map (float32 NIfTI)"
    )
    parser.add_argument("--model", default="models", help="folder or models:/liver-unet@champion")
    # The post-processing options override the model's: a registered model's as evaluated
    # (its postprocessing.json), a model folder's the defaults (threshold 0.55).
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--no-largest-component", dest="largest_component", action="store_const", const=False
    )
    parser.add_argument("--fill-holes", action="store_const", const=True, help="per axial slice")


def _stem(path: Path, suffixes: tuple[str, ...]) -> str:
    name = Path(path).name
    return next((name[: -len(x)] for x in suffixes if name.lower().endswith(x)), name)


def describe_model(source: str) -> str:
    """The model's name for the SEG's algorithm identification: ``liver-unet v3`` for a
    registry URI (an alias is resolved to its version), else the folder or URI as given."""
    s = str(source)
    if not s.startswith("models:/"):
        return s
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    found = get_model_name_and_version(MlflowClient(), s)  # (model id,) for models:/m-<id>
    alias = f" (@{s.split('@', 1)[1]})" if "@" in s else ""
    return f"{found[0]} v{found[1]}{alias}" if len(found) == 2 else s


def main(args: argparse.Namespace) -> None:
    from liverseg.inference import PostProcessing, Segmenter

    options = {k: v for k in PostProcessing().to_dict() if (v := getattr(args, k)) is not None}
    PostProcessing().updated(options, "options")  # a bad option fails before any reading

    @functools.cache  # once, when the first CT has been read: a bad CT fails before TensorFlow
    def load() -> Segmenter:
        seg = Segmenter.load(args.model, batch_size=args.batch_size)
        seg.post = seg.post.updated(options, "options")
        return seg

    if args.output.name.lower().endswith(MASK_SUFFIXES):  # one scan to one mask file
        if len(args.ct) > 1:
            raise DataError(f"{args.output}: {len(args.ct)} scans need an output folder (-o DIR)")
        dcm = args.output.suffix.lower() == ".dcm"
        fmt = args.format or ("seg" if dcm else "nifti")
        row = predict_one(
            args.ct[0], args.output, fmt, load, args.model, args.series, args.probabilities
        )
        report = row["quality"]
        print(
            f"predict: {args.output}: liver volume {row['liver_volume_ml']:.1f} mL "
            f"({row['liver_voxels']} voxels)"
        )
        verdict = (
            "REVIEW: " + "; ".join(report["reasons"]) if report["review"] else "no flag raised"
        )
        print(f"predict: quality ({row['path']}): {verdict}")
        for note in report["notes"]:
            print(f"predict: note: {note}")
        return
    for option, value in (("--series", args.series), ("--probabilities", args.probabilities)):
        if value is not None:
            raise DataError(f"{option} applies to one scan (-o MASK), not to a folder of scans")
    predict_many(args, load)


def scans_of(inputs: list[Path]) -> list[Path]:
    """The scans the inputs stand for (see the module's docstring), in the order given."""
    scans: list[Path] = []
    for path in inputs:
        if not path.is_dir():
            scans.append(path)  # a NIfTI file or a zip; a missing path fails in its own row
            continue
        inner = [
            c
            for c in sorted(path.iterdir())
            if not c.name.startswith(".")
            and (c.is_dir() or c.name.lower().endswith((".nii", ".nii.gz", ".zip")))
        ]
        scans.extend(inner or [path])
    return scans


def output_names(scans: list[Path]) -> list[str]:
    """A distinct mask name per scan: its own name without suffix; where two scans share it
    (``3Dircadb1.1/PATIENT_DICOM``, ``3Dircadb1.2/PATIENT_DICOM``), the folder's name first."""
    names = [_stem(p, (".nii.gz", ".nii", ".zip")) for p in scans]
    names = [
        f"{p.resolve().parent.name}_{n}" if names.count(n) > 1 else n
        for p, n in zip(scans, names, strict=True)
    ]
    return [f"{n}_{k + 1}" if (k := names[:i].count(n)) else n for i, n in enumerate(names)]


def predict_many(args: argparse.Namespace, load: Callable[[], Segmenter]) -> None:
    """Every scan of ``args.ct`` into the folder ``args.output``, with ``summary.csv``."""
    from tqdm import tqdm

    from liverseg.fsutil import atomic_file

    fmt, out_dir = args.format or "nifti", args.output
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: not a folder (-o names a folder for several scans)")
    scans = scans_of(list(args.ct))
    if not scans:
        raise DataError(f"{' '.join(map(str, args.ct))}: no scans found")
    out_dir.mkdir(parents=True, exist_ok=True)
    load()  # once, before the first scan: a broken model stops here, in one line
    model_name = describe_model(args.model) if fmt == "seg" else ""  # once, not per scan
    rows = []
    for scan, name in tqdm(
        list(zip(scans, output_names(scans), strict=True)), unit="scan", desc="predict"
    ):
        output = out_dir / (name + (".dcm" if fmt == "seg" else ".nii.gz"))
        row: dict[str, Any] = {"scan": str(scan), "output": "", "error": ""}
        try:
            done = predict_one(scan, output, fmt, load, args.model, model_name=model_name)
        except Exception as exc:  # even a bug on one scan: the others still run, the row says what
            row["error"] = " ".join((error_line(exc) or f"{type(exc).__name__}: {exc}").split())
        else:
            report = done["quality"]
            agreement = report["agreement"]
            row.update(
                output=str(output),
                volume_ml=f"{done['liver_volume_ml']:.1f}",
                agreement="" if agreement is None else f"{agreement:.4f}",
                review=report["review"],
                reasons="; ".join(report["reasons"]),
                notes="; ".join(report["notes"]),
            )
        rows.append(row)
    summary = out_dir / SUMMARY_FILE
    with atomic_file(summary) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    failed = sum(1 for r in rows if r["error"])
    flagged = sum(1 for r in rows if r.get("review") is True)
    n = len(rows)
    print(f"predict: {n - failed} of {n} scans segmented, {flagged} for review: {summary}")
    if failed:
        raise DataError(f"{failed} of {n} scans failed (their errors: {summary})")


def predict_one(
    ct: Path,
    output: Path,
    fmt: str,
    load: Callable[[], Segmenter],
    model: str,
    series_uid: str | None = None,
    probabilities: Path | None = None,
    *,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Segment ``ct`` into ``output`` and ``<mask>.quality.json``; ``load`` is called once the
    CT is read; ``model_name``: the SEG's (default :func:`describe_model` of ``model``).
    :func:`liverseg.segment.segment_volume`'s answer, with the report's path as ``path``."""
    from tqdm import tqdm

    from liverseg.data.dicom import is_dicom_source, read_ct_series
    from liverseg.data.volumes import load_volume
    from liverseg.fsutil import check_output_path, write_json
    from liverseg.segment import segment_volume

    dicom = is_dicom_source(ct)
    if fmt == "seg" and not dicom:
        raise DataError(
            f"{ct}: a DICOM SEG references its DICOM CT series: give the series (a folder "
            "or .zip), or write NIfTI (-o MASK.nii.gz)"
        )
    if series_uid is not None and not dicom:
        raise DataError(f"{ct}: --series applies to a DICOM folder or zip, not to NIfTI")
    for out in (output, probabilities):
        if out is not None:
            check_output_path(out)  # before the model runs, not after
    series = read_ct_series(ct, series_uid) if dicom else None
    volume = series.volume if series is not None else load_volume(ct, kind="image")
    seg = load()
    one = model_name is None  # a scan of its own: its progress per slice
    with tqdm(total=volume.data.shape[2], unit="slice", desc="predict", disable=not one) as b:
        try:
            done = segment_volume(
                seg,
                volume,
                output,
                series=series if fmt == "seg" else None,
                model_name=(model_name or describe_model(model)) if fmt == "seg" else "",
                probabilities=probabilities,
                progress=b.update,
            )
        except DataError as exc:
            raise DataError(f"{ct}: {exc}") from exc
    done["path"] = output.with_name(_stem(output, MASK_SUFFIXES) + ".quality.json")
    uid = series.info.uid if series is not None else None
    info = {"ct": str(ct), "series": uid, "mask": str(output), "format": fmt, "model": model}
    write_json(done["path"], {**info, **done["quality"]})
    return done
