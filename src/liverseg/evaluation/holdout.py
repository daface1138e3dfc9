"""The evaluate stage's work on the held-out test patients: the Segmenter on each, 3-D metrics
in mm, the per-scan quality report, overlays, and the MLflow run under the training run.

See :mod:`liverseg.stages.evaluate` for what it writes, and :mod:`liverseg.evaluation.results`
for the files of metrics. Overlays come from RAS (X, Y) slices shown the radiological way
(patient's right on the image's left, anterior at the top): transposed, flipped on both axes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np

from liverseg import tracking
from liverseg.data.layout import find_nifti_pairs, patient_of
from liverseg.data.prepared import load_splits
from liverseg.data.volumes import Case, load_case
from liverseg.evaluation.metrics import nsd_key, volume_metrics
from liverseg.evaluation.quality import quality_report
from liverseg.evaluation.results import write_results
from liverseg.fsutil import atomic_dir
from liverseg.params import EvaluateParams, as_flat_dict

if TYPE_CHECKING:
    from liverseg.inference import Segmenter

# Progress lines go to this logger (the CLI sends it to stderr).
log = logging.getLogger("liverseg.progress")


def agreement_vs_dice(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Spearman's rank correlation of the ensemble agreement with the per-patient Dice.

    ``rho`` and ``p`` are None when it is undefined: fewer than 3 patients with an agreement
    (a single model has none), or a constant agreement or Dice.
    """
    from scipy.stats import spearmanr

    pairs = [(r["agreement"], r["dice"]) for r in rows if r["agreement"] is not None]
    a, d = np.array(pairs, dtype=float).reshape(-1, 2).T
    if len(pairs) >= 3 and np.ptp(a) > 0 and np.ptp(d) > 0:
        res = spearmanr(a, d)
        return {"n": len(pairs), "rho": float(res.statistic), "p": float(res.pvalue)}
    return {"n": len(pairs), "rho": None, "p": None}


def overlay(
    ct_hu: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    path: Path,
    title: str,
) -> None:
    """Write one axial slice with truth (green) and prediction (red) outlines to ``path``."""
    from matplotlib.figure import Figure  # without pyplot: no backend to choose, nothing to close

    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    ax.imshow(ct_hu.T[::-1, ::-1], cmap="gray", vmin=-200.0, vmax=300.0)
    for m, color, label in ((truth, "lime", "truth"), (pred, "red", "prediction")):
        if m.any():
            ax.contour(m.astype(float).T[::-1, ::-1], levels=[0.5], colors=color, linewidths=1)
            ax.plot([], [], color=color, label=label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def score_case(
    seg: Segmenter, case: Case, cfg: EvaluateParams
) -> tuple[dict[str, Any], np.ndarray]:
    """One case's row of the per-patient table (metrics, volumes, the quality report's agreement
    and review flag, seconds) and the predicted mask (RAS, uint8 0/1) it was computed from."""
    t0 = time.perf_counter()
    net = seg.predict_ras(case.image.data, members=True, slice_mm=case.image.spacing[2])
    pred = seg.postprocess(net.mask)
    seconds = time.perf_counter() - t0
    q = quality_report(
        pred, case.image.data, case.image.spacing, member_masks=net.members, limits=cfg.quality
    )
    vox_ml = case.image.voxel_volume_ml
    row = {
        "case": case.case_id,
        **volume_metrics(pred, case.mask.data, case.image.spacing, cfg.nsd_tolerances_mm),
        "volume_true_ml": float(case.mask.data.sum() * vox_ml),
        "volume_pred_ml": float(pred.sum() * vox_ml),
        "agreement": q["agreement"],
        "review": q["review"],
        "review_reasons": "; ".join(q["reasons"]),
        "notes": "; ".join(q["notes"]),
        "seconds": round(seconds, 3),
    }
    return row, pred


def evaluate(
    raw: Path, prepared: Path, model_dir: Path, out: Path, cfg: EvaluateParams
) -> dict[str, Any]:
    """Segment the test patients listed in ``prepared/splits.json``; write ``out``."""
    from liverseg.inference import PostProcessing, Segmenter

    test_ids = load_splits(prepared)["test"]
    pairs = {p.case_id: p for p in find_nifti_pairs(raw)}
    seg = Segmenter.load(model_dir, post=PostProcessing.from_params(cfg), batch_size=cfg.batch_size)
    metrics = ["dice", "iou", "voe", "rvd", "assd_mm", "hd95_mm"]
    metrics += [nsd_key(t) for t in cfg.nsd_tolerances_mm]
    rows: list[dict[str, Any]] = []
    with atomic_dir(out) as tmp:
        for cid in test_ids:
            case = load_case(pairs[cid].image, pairs[cid].mask, case_id=cid)
            row, pred = score_case(seg, case, cfg)
            rows.append(row)
            # overlays_per_patient slices spread over the liver (truth or prediction)
            z_liver = np.flatnonzero((case.mask.data | pred).any(axis=(0, 1)))
            n = cfg.overlays_per_patient
            picks = (
                np.linspace(z_liver[0], z_liver[-1], n + 2)[1:-1] if n < z_liver.size else z_liver
            )
            for z in sorted({int(round(p)) for p in picks}) if n else ():
                overlay(
                    case.image.data[:, :, z],
                    case.mask.data[:, :, z],
                    pred[:, :, z],
                    tmp / "overlays" / f"{cid}_z{z:03d}.png",
                    title=f"{cid} z={z}  Dice(3D)={row['dice']:.3f}",
                )
            log.info("evaluate: %s: Dice %.4f HD95 %.1f mm", cid, row["dice"], row["hd95_mm"])
        result: dict[str, Any] = {}
        for k in metrics:
            vals = np.array([r[k] for r in rows], dtype=float)
            result |= {f"{k}_mean": float(vals.mean()), f"{k}_std": float(vals.std())}
        result |= {
            "n_patients": len({patient_of(r["case"]) for r in rows}),
            "n_scans": len(rows),  # more than n_patients with synthetic draws (eNN-1, ...)
            "n_review": sum(bool(r["review"]) for r in rows),
            "agreement_vs_dice": agreement_vs_dice(rows),
            "per_patient": rows,
        }
        write_results(tmp, result)
    return result


# The figures a user sorts the `cv` runs by: copied onto the training parent run.
HEADLINE = ("test_dice_mean", "test_dice_std", "test_hd95_mm_mean", "test_assd_mm_mean")


def log_to_mlflow(
    result: dict[str, Any], out: Path, cfg: EvaluateParams, link: dict[str, str], raw: Path
) -> str:
    """An ``evaluate`` run nested under the training parent run of ``link`` (the train stage's
    ``run.json``), with the test data as its input and the overlays as images; the headline
    test figures also go onto the parent run so that the ``cv`` row of the runs table shows
    them."""
    from PIL import Image

    tracking.follow_moved_store()
    exp_id = link.get("experiment_id") or tracking.ensure_experiment(cfg.experiment)
    parent_id = link["parent_run_id"]
    tags = {
        "kind": "evaluate",
        "git_commit": tracking.git_commit(),
        tracking.NOTE_TAG: (
            f"Test Dice {result['dice_mean']:.4f} ± {result['dice_std']:.4f}, "
            f"HD95 {result['hd95_mm_mean']:.1f} mm, {result['n_scans']} scans of "
            f"{result['n_patients']} patients"
        ),
        # Nesting by tag: the training run is finished, and MLflow only nests under active runs.
        "mlflow.parentRunId": parent_id,
        "train_final_run_id": link.get("final_run_id", ""),
    }
    with mlflow.start_run(experiment_id=exp_id, run_name="evaluate", tags=tags) as run:
        tracking.log_params_flat(as_flat_dict(cfg))
        tracking.log_dataset(raw, tracking.dvc_out_hash(raw), context="test")
        test = {f"test_{k}": v for k, v in result.items() if isinstance(v, float)}
        test.update(tracking.headline_metrics({k: test[k] for k in HEADLINE if k in test}))
        mlflow.log_metrics(test)
        mlflow.log_metrics({f"test_dice_{r['case']}": r["dice"] for r in result["per_patient"]})
        if result["agreement_vs_dice"]["rho"] is not None:
            mlflow.log_metric("test_agreement_dice_spearman", result["agreement_vs_dice"]["rho"])
        # One image key per patient, its slices at steps 0, 1, ... from the bottom up: the UI's
        # step slider starts at 0, so slice indices as steps showed a blank panel. The slice
        # index stays in the artifact's name (evaluate/overlays/<case>_z<k>.png).
        steps: dict[str, int] = {}
        pngs = (out / "overlays").glob("*.png")
        for _, png in sorted((int(p.stem.rsplit("_z", 1)[1]), p) for p in pngs):
            case = png.stem.rsplit("_z", 1)[0]
            steps[case] = step = steps.get(case, -1) + 1
            with Image.open(png) as im:
                # synchronous: MLflow's asynchronous artifact queue would hold the exit for a
                # second (its thread polls once a second) to upload small files
                mlflow.log_image(
                    im.convert("RGB"), key=f"overlay_{case}", step=step, synchronous=True
                )
        mlflow.log_artifacts(str(out), artifact_path="evaluate")
        headline = {k: v for k, v in test.items() if k.removesuffix("_exact") in HEADLINE}
        mlflow.log_metrics(headline, step=0, run_id=parent_id, synchronous=True)
        return str(run.info.run_id)
