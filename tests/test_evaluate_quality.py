"""The evaluate stage's NSD, per-patient quality and agreement-vs-Dice correlation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from liverseg.data.layout import output_paths
from liverseg.data.volumes import save_pair
from liverseg.evaluation.holdout import agreement_vs_dice, evaluate
from liverseg.evaluation.metrics import volume_metrics
from liverseg.params import EvaluateParams, QualityParams
from test_predict_dicom import ensemble_dir


def rows(agreements: list[float | None], dices: list[float]) -> list[dict[str, object]]:
    return [{"agreement": a, "dice": d} for a, d in zip(agreements, dices, strict=True)]


@pytest.mark.parametrize(
    ("agreements", "dices", "rho"),
    [
        ([0.90, 0.95, 0.99], [0.80, 0.85, 0.90], 1.0),
        ([0.90, 0.95, 0.99], [0.90, 0.85, 0.80], -1.0),
        # ranks (1, 2, 3) vs (1, 3, 2): rho = 1 - 6 * (0 + 1 + 1) / (3 * 8) = 0.5
        ([0.90, 0.95, 0.99], [0.80, 0.90, 0.85], 0.5),
        # ranks (1, 2, 3, 4) vs (2, 1, 4, 3): rho = 1 - 6 * 4 / (4 * 15) = 0.6
        ([0.1, 0.2, 0.3, 0.4], [0.5, 0.4, 0.9, 0.8], 0.6),
    ],
)
def test_spearman_by_hand(agreements: list[float], dices: list[float], rho: float) -> None:
    got = agreement_vs_dice(rows(agreements, dices))  # type: ignore[arg-type]
    assert got["n"] == len(dices)
    assert got["rho"] == pytest.approx(rho)
    assert 0.0 <= got["p"] <= 1.0


@pytest.mark.parametrize(
    ("agreements", "dices", "n"),
    [
        ([0.9, 0.95], [0.8, 0.9], 2),  # too few
        ([None, None, None], [0.8, 0.9, 0.7], 0),  # a single model has no agreement
        ([0.9, 0.9, 0.9], [0.8, 0.9, 0.7], 3),  # constant: undefined
    ],
)
def test_spearman_undefined(agreements: list[float | None], dices: list[float], n: int) -> None:
    got = agreement_vs_dice(rows(agreements, dices))  # type: ignore[arg-type]
    assert got == {"n": n, "rho": None, "p": None}


def test_evaluate_reports_nsd_and_quality(tmp_path: Path) -> None:
    # Three "patients": a bright 300 HU liver block on the patient's right (large RAS x) of a
    # 40 HU body; the reference masks are the block, shifted by 0, 1 and 3 voxels along x.
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    affine = np.diag([4.0, 4.0, 6.0, 1.0])
    for n, shift in enumerate((0, 1, 3)):
        hu = np.full((40, 32, 12), -1000.0, np.float32)
        hu[4:36, 4:28, :] = 40.0
        hu[22:34, 8:24, 2:10] = 300.0
        truth = np.zeros(hu.shape, np.uint8)
        truth[22 - shift : 34 - shift, 8:24, 2:10] = 1
        save_pair(hu, truth, affine, *output_paths(raw, f"e0{n + 1}"))
    prepared.mkdir()
    (prepared / "splits.json").write_text(json.dumps({"test": ["e01", "e02", "e03"], "folds": []}))
    models = ensemble_dir(tmp_path / "models")
    cfg = EvaluateParams(
        overlays_per_patient=0,
        nsd_tolerances_mm=(1.0, 4.0),
        quality=QualityParams(min_volume_ml=10.0, max_volume_ml=100.0, min_agreement=0.9),
    )
    result = evaluate(raw, prepared, models, tmp_path / "out", cfg)

    assert result["n_patients"] == 3
    per = {r["case"]: r for r in result["per_patient"]}
    # The members (levels 0.2, 0.5, 0.6) take the body, the block, the block: the same on
    # every patient, so their agreement is constant and the correlation undefined.
    agreements = {round(r["agreement"], 9) for r in per.values()}
    assert len(agreements) == 1 and agreements.pop() < 0.9
    assert result["agreement_vs_dice"] == {"n": 3, "rho": None, "p": None}
    assert result["n_review"] == 3
    assert all("agree poorly" in r["review_reasons"] for r in per.values())
    # NSD as the metrics module computes it on the same masks, per patient and in the mean.
    pred = np.zeros((40, 32, 12), np.uint8)
    pred[22:34, 8:24, 2:10] = 1
    for n, shift in enumerate((0, 1, 3)):
        truth = np.roll(pred, -shift, axis=0)
        exp = volume_metrics(pred, truth, (4.0, 4.0, 6.0), (1.0, 4.0))
        row = per[f"e0{n + 1}"]
        assert row["nsd_1mm"] == pytest.approx(exp["nsd_1mm"])
        assert row["nsd_4mm"] == pytest.approx(exp["nsd_4mm"])
    assert per["e01"]["nsd_1mm"] == 1.0 and per["e02"]["nsd_4mm"] == 1.0
    assert per["e03"]["nsd_4mm"] < 1.0
    assert result["nsd_4mm_mean"] == pytest.approx(np.mean([r["nsd_4mm"] for r in per.values()]))
    csv_head = (tmp_path / "out" / "per_patient.csv").read_text().splitlines()[0]
    assert "nsd_1mm" in csv_head and "agreement" in csv_head and "review_reasons" in csv_head


@pytest.mark.slow
def test_pipeline_metrics_hold_nsd_and_quality(tiny_repo: Path) -> None:
    ev = json.loads((tiny_repo / "reports/evaluate/metrics.json").read_text())
    assert 0.0 <= ev["nsd_2.5mm_mean"] <= ev["nsd_5mm_mean"] <= 1.0  # params.yaml's tolerances
    for row in ev["per_patient"]:
        assert 0.0 <= row["agreement"] <= 1.0  # the tiny pipeline's ensemble has 2 members
        assert isinstance(row["review"], bool)
    assert ev["agreement_vs_dice"]["n"] == 2  # 2 test patients: too few for a correlation
