"""``benchmarks/real_ct.py`` on pairs made here: a known ensemble of 1x1-convolution threshold
networks (test_predict_dicom) on a CT whose liver is a cube, so the prediction is the cube and
every figure of the table can be computed independently (or by hand)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import REPO, MlflowStore, tool_env
from liverseg.data.volumes import load_volume, save_pair
from liverseg.evaluation.metrics import dice, volume_metrics
from liverseg.evaluation.quality import quality_report
from liverseg.params import QualityParams
from test_predict_dicom import WINDOW, threshold_net

SCRIPT = REPO / "benchmarks" / "real_ct.py"
SPACING = (2.0, 2.0, 3.0)
N = 16  # in-plane size = the model's input size: no resampling, the cube comes back exactly
# Windowed: the cube (100 HU) 0.4, the block (20 HU) 0.24, the rest (-50 HU) 0.1. Member 0
# (level 0.2) segments cube and block, members 1 and 2 (level 0.3) the cube; their mean is the
# cube alone.
LEVELS = (0.2, 0.3, 0.3)
CUBE = (slice(8, 14), slice(5, 11), slice(3, 7))  # 6 x 6 x 4 voxels, on the patient's right
BLOCK = (slice(1, 4), slice(1, 4), slice(3, 5))  # 3 x 3 x 2 voxels, apart from the cube


def ras_volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT in HU, the cube, the block), RAS (x, y, z)."""
    hu = np.full((N, N, 10), -50.0)
    cube, block = np.zeros(hu.shape, np.uint8), np.zeros(hu.shape, np.uint8)
    cube[CUBE], block[BLOCK] = 1, 1
    hu[cube == 1], hu[block == 1] = 100.0, 20.0
    return hu, cube, block


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from liverseg.model.folder import save_model_dir
    from liverseg.training.crossval import ensemble

    folder = tmp_path_factory.mktemp("m") / "models"
    return save_model_dir(folder, ensemble([threshold_net(v) for v in LEVELS]), list(WINDOW), N)


def bench(*args: str | Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=tool_env(**env), capture_output=True, text=True)


def table_rows(stdout: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [
        dict(zip(head, (c.strip() for c in ln.strip("|").split("|")), strict=True))
        for ln in lines[2:]
    ]
    return {r["case"]: r for r in rows}


def test_table_and_csv_against_the_metrics(model: Path, tmp_path: Path) -> None:
    hu, cube, block = ras_volumes()
    shifted = np.roll(cube, -1, axis=0)  # one voxel towards the left: Dice 5/6 by hand
    affine = np.diag([*SPACING, 1.0])
    save_pair(hu, cube, affine, tmp_path / "same_ct.nii.gz", tmp_path / "same_mask.nii.gz")
    (tmp_path / "dir").mkdir()
    save_pair(
        hu,
        shifted,
        affine,
        *(tmp_path / "dir" / f"ircad_e07_{r}.nii.gz" for r in ("orig", "liver")),
    )
    # The shifted pair again, stored L,A,S (as IRCAD's files are): the same figures.
    las = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    las[0, 3] = SPACING[0] * (N - 1)
    for name, data in (("las_ct", hu.astype(np.int16)), ("las_mask", shifted)):
        nib.save(nib.Nifti1Image(np.flip(data, 0), las), str(tmp_path / f"{name}.nii.gz"))
    assert nib.aff2axcodes(load_volume(tmp_path / "las_ct.nii.gz").source_affine) == tuple("LAS")
    limits = {"min_volume_ml": 1.0, "max_volume_ml": 2.0, "min_agreement": 0.97, "body_hu": -500}
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"evaluate": {"nsd_tolerances_mm": [1.0, 2.0], "quality": limits}})
    )

    out = bench(
        "--model", model, "--params", params, "--csv", tmp_path / "out.csv",
        "--pair", tmp_path / "same_ct.nii.gz", tmp_path / "same_mask.nii.gz",
        "--pair", tmp_path / "las_ct.nii.gz", tmp_path / "las_mask.nii.gz",
        "--dir", tmp_path / "dir", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "out.csv", newline="") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    table = table_rows(out.stdout)
    assert list(rows) == list(table) == ["same_ct", "las_ct", "e07"]

    members = np.stack([cube | block, cube, cube]).astype(bool)
    d = dice(cube, cube | block)
    agreement = (2 * d + 1) / 3  # pairs (0,1), (0,2): d; (1,2): 1
    report = quality_report(cube, hu, SPACING, member_masks=members, limits=QualityParams(**limits))
    assert report["agreement"] == pytest.approx(agreement)
    assert report["review"]  # the agreement, 0.961, is below 0.97
    for case, truth in (("same_ct", cube), ("las_ct", shifted), ("e07", shifted)):
        row, cells = rows[case], table[case]
        m = volume_metrics(cube, truth, SPACING, [1.0, 2.0])
        expected = {
            **{k: m[k] for k in ("dice", "hd95_mm", "nsd_1mm", "nsd_2mm")},
            "volume_pred_ml": cube.sum() * np.prod(SPACING) / 1000,
            "volume_true_ml": truth.sum() * np.prod(SPACING) / 1000,
            "agreement": agreement,
        }
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, abs=1e-9), (case, key)
        assert float(cells["Dice"]) == pytest.approx(expected["dice"], abs=5e-5)
        assert float(cells["HD95 mm"]) == pytest.approx(expected["hd95_mm"], abs=5e-3)
        assert float(cells["NSD 2 mm"]) == pytest.approx(expected["nsd_2mm"], abs=5e-5)
        assert float(cells["agreement"]) == pytest.approx(agreement, abs=5e-5)
        assert row["review"] == "True" and cells["review"] == "yes"
        assert row["review_reasons"] == cells["reasons"] == "; ".join(report["reasons"])
        assert row["notes"] == "; ".join(report["notes"])
        assert cells["notes"] == (row["notes"] or "-")
    assert float(rows["same_ct"]["dice"]) == 1.0 and float(rows["same_ct"]["hd95_mm"]) == 0.0
    assert float(rows["e07"]["dice"]) == pytest.approx(5 / 6)
    assert "n 3" in out.stdout  # the rank correlation's line, over the three cases

    # --tolerance replaces the params' tolerances.
    out = bench(
        "--model",
        model,
        "--params",
        params,
        "--tolerance",
        "4",
        "--dir",
        tmp_path / "dir",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    cells = table_rows(out.stdout)["e07"]
    assert "NSD 1 mm" not in cells
    assert float(cells["NSD 4 mm"]) == pytest.approx(
        volume_metrics(cube, shifted, SPACING, [4.0])["nsd_4mm"], abs=5e-5
    )


def test_a_mask_on_another_grid_is_a_one_line_error(model: Path, tmp_path: Path) -> None:
    hu, cube, _ = ras_volumes()
    save_pair(hu, cube, np.diag([*SPACING, 1.0]), tmp_path / "ct.nii.gz", tmp_path / "m.nii.gz")
    save_pair(
        hu[:, :, :8], cube[:, :, :8], np.eye(4), tmp_path / "c2.nii.gz", tmp_path / "m2.nii.gz"
    )
    out = bench(
        "--model", model, "--params", REPO / "params.yaml",
        "--pair", tmp_path / "ct.nii.gz", tmp_path / "m2.nii.gz", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("real_ct: ") and "m2.nii.gz" in last and "does not match" in last


@pytest.mark.slow
def test_a_registry_uri_scores_like_its_folder(
    model: Path, mlflow_store: MlflowStore, tmp_path: Path
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from liverseg.inference import PostProcessing
    from liverseg.serving.model import log_pyfunc

    with mlflow.start_run(experiment_id=mlflow_store.experiment("t")):
        info = log_pyfunc(model, PostProcessing(), registered_model_name="liver-unet")
    MlflowClient().set_registered_model_alias(
        "liver-unet", "champion", info.registered_model_version
    )
    hu, cube, _ = ras_volumes()
    shifted = np.roll(cube, 1, axis=1)
    save_pair(hu, shifted, np.diag([*SPACING, 1.0]), tmp_path / "ct.nii.gz", tmp_path / "m.nii.gz")
    pair = ("--pair", tmp_path / "ct.nii.gz", tmp_path / "m.nii.gz")
    params = ("--params", REPO / "params.yaml")
    by_uri = bench(
        "--model",
        "models:/liver-unet@champion",
        *params,
        *pair,
        cwd=tmp_path,
        MLFLOW_TRACKING_URI=mlflow_store.uri,
    )
    assert by_uri.returncode == 0, by_uri.stderr[-3000:]
    row = table_rows(by_uri.stdout)["ct"]
    assert float(row["Dice"]) == pytest.approx(dice(cube, shifted), abs=5e-5)
    assert float(row["agreement"]) > 0  # the registered model is the ensemble, members and all
    by_folder = bench("--model", model, *params, *pair, cwd=tmp_path)
    assert by_folder.returncode == 0, by_folder.stderr[-3000:]
    assert {k: v for k, v in table_rows(by_folder.stdout)["ct"].items() if k != "s"} == {
        k: v for k, v in row.items() if k != "s"
    }


def test_flag_calibration_counts_what_each_threshold_flags(tmp_path: Path) -> None:
    """``benchmarks/flag_calibration.py`` over two tables of real_ct.py's columns: the rank
    correlation over both, and per threshold the scans the agreement alone flags in each band."""
    from scipy.stats import spearmanr

    # (dice, agreement, review): 2 below 0.88, 3 between, 2 above 0.93; and a single model's row
    rows = [
        (0.80, 0.85, True), (0.87, 0.905, True), (0.90, 0.89, True), (0.91, 0.92, False),
        (0.92, 0.915, False), (0.94, 0.93, False), (0.95, 0.895, True), (0.99, None, False),
    ]  # fmt: skip
    paths = []
    for i, part in enumerate((rows[:4], rows[4:])):
        paths.append(tmp_path / f"t{i}.csv")
        with paths[-1].open("w", newline="") as f:
            w = csv.DictWriter(f, ["case", "dice", "agreement", "review"])
            w.writeheader()
            for j, (d, a, r) in enumerate(part):
                w.writerow({"case": f"c{j}", "dice": d, "agreement": "" if a is None else a,
                            "review": r})  # fmt: skip
    script = REPO / "benchmarks" / "flag_calibration.py"
    out = subprocess.run(
        [sys.executable, str(script), *map(str, paths), "--thresholds", "0.9", "0.91"],
        env=tool_env(), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    scored = [(d, a) for d, a, _ in rows if a is not None]
    rho = spearmanr([a for _, a in scored], [d for d, _ in scored]).statistic
    assert f"n 7, Spearman rho of agreement and Dice {rho:.3f}" in out
    table = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:5]]
             for ln in out.splitlines() if ln.startswith("| ")}  # fmt: skip
    assert list(table)[0] == "flagged"
    assert table["flagged"] == ["below 0.88 (n 2)", "between (n 3)", "above 0.93 (n 2)"]
    assert table["agreement < 0.9"] == ["1", "1", "1"]
    assert table["agreement < 0.91"] == ["2", "1", "1"]
    assert table["the runs' flag, all reasons"] == ["2", "1", "1"]
    assert "agreement of the scans below 0.88: [0.85, 0.905]" in out


def test_predict_thresholds_as_the_model_was_registered(
    model: Path, mlflow_store: MlflowStore, tmp_path: Path
) -> None:
    """``liverseg predict --model models:/...`` post-processes as the version was registered
    (its postprocessing.json); a model folder has the defaults; the options override either.
    The block's probability is 0.32 (one member of three): kept at threshold 0.3, not at 0.55."""
    import mlflow

    from liverseg.inference import PostProcessing
    from liverseg.serving.model import log_pyfunc

    registered = PostProcessing(threshold=0.3, largest_component=False, fill_holes=False)
    with mlflow.start_run(experiment_id=mlflow_store.experiment("t")):
        log_pyfunc(model, registered, registered_model_name="liver-unet")
    hu, cube, block = ras_volumes()
    save_pair(hu, cube, np.diag([*SPACING, 1.0]), tmp_path / "ct.nii.gz", tmp_path / "m.nii.gz")

    def voxels(model_source: str | Path, *options: str) -> int:
        cmd = [sys.executable, "-m", "liverseg.cli", "predict", str(tmp_path / "ct.nii.gz")]
        cmd += ["-o", str(tmp_path / "out.nii.gz"), "--model", str(model_source), *options]
        env = tool_env(MLFLOW_TRACKING_URI=mlflow_store.uri)
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return int(np.asarray(nib.load(tmp_path / "out.nii.gz").dataobj).sum())

    both, alone = int(cube.sum() + block.sum()), int(cube.sum())
    assert voxels("models:/liver-unet/1") == both
    assert voxels(model) == alone
    assert voxels(model, "--threshold", "0.3", "--no-largest-component") == both
    assert voxels("models:/liver-unet/1", "--threshold", "0.55") == alone
