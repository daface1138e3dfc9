"""DICOM in, SEG out on real CT: each NIfTI pair is written as a DICOM CT series, segmented with
``liverseg predict SERIES -o liver.dcm`` (the real CLI), and the SEG, read back with highdicom,
is scored against the reference mask; the quality report is printed beside the Dice.

    python benchmarks/dicom_check.py --model models --render docs/seg_on_ct.png \\
        CASE=CT.nii.gz:MASK.nii.gz [CASE=CT:MASK ...]

The series writer is the tests' (``tests/dicomfake.py``): one file per axial slice, geometry
from the NIfTI affine, HU stored with RescaleIntercept -1024. ``--render`` draws the SEG's
frames over the CT of the first case (matplotlib) and writes a PNG.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dicomfake import write_series  # noqa: E402
from liverseg.data.dicom import read_ct_series  # noqa: E402
from liverseg.data.dicomseg import read_seg_mask  # noqa: E402
from liverseg.data.volumes import load_volume  # noqa: E402
from liverseg.evaluation.metrics import volume_metrics  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_dicom(ct: Path, folder: Path) -> None:
    """Write the CT (its RAS array, so that the series grid is the RAS grid) as a series."""
    vol = load_volume(ct)
    lps = LPS @ vol.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    write_series(
        folder,
        vol.data,
        spacing=tuple(float(s) for s in spacing),
        row_dir=lps[:3, 0] / spacing[0],
        col_dir=lps[:3, 1] / spacing[1],
        origin=lps[:3, 3],
        step=lps[:3, 2],
        description=ct.name,
    )


def radiological(ras_slice: np.ndarray) -> np.ndarray:
    """A RAS (x, y) slice as radiologists view it: anterior up, the patient's right on the
    image's left."""
    return np.flipud(ras_slice.T)[:, ::-1]


def render(ct: np.ndarray, seg: np.ndarray, ref: np.ndarray, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = np.flatnonzero(seg.any(axis=(0, 1)))
    picks = [int(zs[len(zs) // 4]), int(zs[len(zs) // 2]), int(zs[3 * len(zs) // 4])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, z in zip(axes, picks, strict=True):
        ax.imshow(radiological(ct[:, :, z]), cmap="gray", vmin=-160, vmax=240)
        shown = radiological(seg[:, :, z])
        ax.imshow(np.ma.masked_where(shown == 0, shown), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
        ax.contour(radiological(ref[:, :, z]), levels=[0.5], colors="cyan", linewidths=1)
        ax.set_title(f"slice {z}")
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", nargs="+", help="NAME=CT.nii.gz:MASK.nii.gz")
    parser.add_argument("--model", default="models")
    parser.add_argument("--render", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for n, spec in enumerate(args.cases):
        name, _, paths = spec.partition("=")
        ct_path, mask_path = (Path(p) for p in paths.split(":"))
        with tempfile.TemporaryDirectory(prefix="dicom-check-") as tmp:
            series_dir, seg_path = Path(tmp) / "ct", Path(tmp) / "liver.dcm"
            to_dicom(ct_path, series_dir)
            t0 = time.perf_counter()
            cmd = ["liverseg", "predict", str(series_dir), "-o", str(seg_path)]
            subprocess.run([*cmd, "--model", args.model], check=True, capture_output=True)
            seconds = time.perf_counter() - t0
            series = read_ct_series(series_dir)
            seg = read_seg_mask(seg_path, series.datasets)
            quality = json.loads((Path(tmp) / "liver.quality.json").read_text())
            dciodvfy = subprocess.run(["dciodvfy", str(seg_path)], capture_output=True, text=True)
            verdict = (dciodvfy.stdout + dciodvfy.stderr).strip().replace("\n", " | ")
        ref = load_volume(mask_path, kind="mask").data
        m = volume_metrics(seg, ref, series.volume.spacing, (1.0, 2.0))
        rows.append(
            {
                "case": name,
                "shape": list(seg.shape),
                "dice": round(m["dice"], 4),
                "nsd_1mm": round(m["nsd_1mm"], 4),
                "nsd_2mm": round(m["nsd_2mm"], 4),
                "hd95_mm": round(m["hd95_mm"], 1),
                "agreement": quality["agreement"],
                "review": quality["review"],
                "reasons": quality["reasons"],
                "seconds_predict_cli": round(seconds, 1),
                "dciodvfy": verdict,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if n == 0 and args.render is not None:
            render(
                series.volume.data,
                seg,
                ref,
                args.render,
                f"{name}: liverseg DICOM SEG (yellow) over its CT, reference mask (cyan contour); "
                f"Dice {m['dice']:.3f}",
            )


if __name__ == "__main__":
    main()
