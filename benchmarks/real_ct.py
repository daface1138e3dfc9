"""Score a model on real CT/mask pairs: Dice, HD95, NSD, volumes, agreement and the review flag.

    python benchmarks/real_ct.py [--model models] --pair CT.nii.gz MASK.nii.gz [--pair ...]
        [--dir FOLDER] [--tolerance MM ...] [--params params.yaml] [--csv out.csv]

``--model``: a model folder (default ``models/``, the train stage's) or an MLflow URI such as
``models:/liver-unet@champion`` (from the store of ``MLFLOW_TRACKING_URI``, as ``liverseg
predict``). ``--dir``: a folder of ``ircad_eNN_orig`` / ``ircad_eNN_liver`` pairs. Masks are on
their CT's grid, in any orientation (both are read to RAS). Each case is scored by the evaluate
stage's own code (:func:`liverseg.evaluation.holdout.score_case`) with the ``evaluate`` section of
``--params``: the same post-processing, NSD tolerances (or ``--tolerance``) and quality limits.
The ``agreement`` column (mean pairwise Dice of the fold models' masks) beside the Dice is what
the quality flag's threshold is calibrated from; the line under the table is their rank
correlation over the cases given.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from liverseg.cli import resolve_tracking_uri  # noqa: E402
from liverseg.data.layout import CasePaths, find_nifti_pairs  # noqa: E402
from liverseg.data.volumes import load_case  # noqa: E402
from liverseg.errors import LiversegError  # noqa: E402
from liverseg.evaluation.holdout import agreement_vs_dice, score_case  # noqa: E402
from liverseg.evaluation.metrics import nsd_key  # noqa: E402
from liverseg.params import load_section  # noqa: E402


def case_name(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def table(rows: list[dict], tolerances: tuple[float, ...]) -> str:
    """The rows as a markdown table."""
    nsd = [nsd_key(t) for t in tolerances]
    head = ["case", "Dice", "HD95 mm", *(f"NSD {t:g} mm" for t in tolerances)]
    head += ["pred mL", "true mL", "agreement", "review", "reasons", "notes", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        agreement = "-" if r["agreement"] is None else f"{r['agreement']:.4f}"
        cells = [r["case"], f"{r['dice']:.4f}", f"{r['hd95_mm']:.2f}"]
        cells += [f"{r[k]:.4f}" for k in nsd]
        cells += [f"{r['volume_pred_ml']:.1f}", f"{r['volume_true_ml']:.1f}", agreement]
        cells += ["yes" if r["review"] else "no", r["review_reasons"] or "-", r["notes"] or "-"]
        cells += [f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models", help="model folder or MLflow model URI")
    ap.add_argument(
        "--pair", nargs=2, action="append", default=[], type=Path, metavar=("CT", "MASK")
    )
    ap.add_argument("--dir", action="append", default=[], type=Path, help="ircad_eNN_* pairs")
    ap.add_argument("--tolerance", action="append", type=float, help="NSD tolerance, mm")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--csv", type=Path, help="also write the rows (full precision) here")
    args = ap.parse_args(argv)
    if not args.pair and not args.dir:
        ap.error("give at least one --pair CT MASK or --dir FOLDER")
    os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(
        os.environ.get("MLFLOW_TRACKING_URI"), dict(os.environ)
    )
    from liverseg.inference import PostProcessing, Segmenter

    try:
        cfg = load_section("evaluate", args.params)
        if args.tolerance:
            cfg = dataclasses.replace(cfg, nsd_tolerances_mm=tuple(args.tolerance))
        cases = [CasePaths(case_name(ct), ct, mask) for ct, mask in args.pair]
        for folder in args.dir:
            cases += find_nifti_pairs(folder)
        seg = Segmenter.load(
            args.model, post=PostProcessing.from_params(cfg), batch_size=cfg.batch_size
        )
        rows = []
        for c in cases:
            case = load_case(c.image, c.mask, case_id=c.case_id)
            rows.append({**score_case(seg, case, cfg)[0], "ct": str(c.image), "mask": str(c.mask)})
            print(f"real_ct: {c.case_id}: Dice {rows[-1]['dice']:.4f}", file=sys.stderr)
    except LiversegError as exc:  # bad input: one line naming the file
        sys.exit(f"real_ct: {exc}")
    print(f"model: {args.model}\n\n{table(rows, cfg.nsd_tolerances_mm)}\n")
    rank = agreement_vs_dice(rows)
    rho = "undefined" if rank["rho"] is None else f"{rank['rho']:.3f} (p {rank['p']:.3g})"
    print(f"agreement vs Dice: Spearman rho {rho}, n {rank['n']}")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
