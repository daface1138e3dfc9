"""`liverseg predict IN... -o OUT_DIR`: many scans in one process, a summary row per scan.

The model is test_predict_dicom's saved ensemble of threshold networks, so each mask is checked
against the in-process Segmenter on the same volume.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import tool_env
from dicomfake import read_seg_mask, write_series
from liverseg.cli import main as cli_main
from liverseg.data.dicom import read_ct_series
from liverseg.data.volumes import from_canonical, load_volume
from liverseg.inference import Segmenter
from liverseg.predict import SUMMARY_COLUMNS, output_names, scans_of
from test_dicom_packaged import series_of
from test_predict_dicom import ct_hu, ensemble_dir


def predict(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "liverseg.cli", "predict", *args],
        env=tool_env(),
        capture_output=True,
        text=True,
    )


def summary(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == SUMMARY_COLUMNS
        return list(reader)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensemble_dir(tmp_path_factory.mktemp("m") / "models")


def test_a_folder_of_nifti_and_dicom_scans(models: Path, tmp_path: Path) -> None:
    """A folder with a NIfTI CT, a DICOM series without FrameOfReferenceUID, a zip of a series
    and a broken file, plus pydicom's CT_small given beside it: four masks, one error row, and
    a non-zero exit; the SEG form of the same series equals its NIfTI voxel for voxel."""
    scans = tmp_path / "scans"
    write_series(scans / "series_a", ct_hu(), frame_uid=None, shuffle_seed=3)
    zipped = tmp_path / "z"
    write_series(zipped, ct_hu()[:, :, :8], shuffle_seed=1)
    with zipfile.ZipFile(scans / "series_b.zip", "w") as zf:
        for f in sorted(zipped.iterdir()):
            zf.write(f, f"b/{f.name}")
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(ct_hu()[:, :, :6].astype(np.int16), affine), scans / "c.nii.gz")
    (scans / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    small = series_of("CT_small.dcm", tmp_path / "ct_small")

    out = tmp_path / "out"
    proc = predict(str(scans), str(small), "-o", str(out), "--model", str(models))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(f"1 of 5 scans failed (their errors: {out / 'summary.csv'})")
    )
    rows = summary(out)
    assert [Path(r["scan"]).name for r in rows] == [
        "broken.nii.gz", "c.nii.gz", "series_a", "series_b.zip", "ct_small"
    ]  # fmt: skip
    broken, *good = rows
    assert "broken.nii.gz" in broken["error"] and broken["output"] == ""
    assert "\n" not in broken["error"]

    seg = Segmenter.from_dir(models)
    volumes = [
        load_volume(scans / "c.nii.gz", kind="image"),
        read_ct_series(scans / "series_a").volume,
        read_ct_series(scans / "series_b.zip").volume,
        read_ct_series(small).volume,
    ]
    for row, vol, name in zip(
        good, volumes, ["c", "series_a", "series_b", "ct_small"], strict=True
    ):
        assert row["error"] == "" and row["output"] == str(out / f"{name}.nii.gz")
        mask = np.asanyarray(nib.load(row["output"]).dataobj)
        expected = seg.segment_ras(vol.data)
        np.testing.assert_array_equal(mask, from_canonical(expected, vol))
        report = json.loads((out / f"{name}.quality.json").read_text())
        assert float(row["volume_ml"]) == pytest.approx(report["liver_volume_ml"], abs=0.05)
        assert float(row["agreement"]) == pytest.approx(report["agreement"], abs=1e-4)
        assert row["review"] == str(report["review"])
        assert row["reasons"] == "; ".join(report["reasons"])
        assert row["notes"] == "; ".join(report["notes"])
    assert float(good[0]["volume_ml"]) > 0

    # The SEG form: the NIfTI file's row fails (a SEG needs DICOM), the series' SEG is its mask.
    seg_out = tmp_path / "seg"
    proc = predict(
        str(scans / "series_a"), str(scans / "c.nii.gz"), "-o", str(seg_out), "--format",
        "seg", "--model", str(models),
    )  # fmt: skip
    assert proc.returncode == 2
    series_row, nifti_row = summary(seg_out)
    assert "a DICOM SEG references its DICOM CT series" in nifti_row["error"]
    series = read_ct_series(scans / "series_a")
    from_seg = read_seg_mask(seg_out / "series_a.dcm", series.datasets)
    from_nifti = np.asanyarray(nib.load(out / "series_a.nii.gz").dataobj)
    np.testing.assert_array_equal(from_seg, from_nifti)
    assert series_row["volume_ml"] == good[1]["volume_ml"]


def test_scans_of_a_folder(tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    for name in ("image_0", "image_1", "README"):
        (series / name).write_bytes(b"")
    mixed = tmp_path / "mixed"
    (mixed / "s1").mkdir(parents=True)
    for name in ("b.nii.gz", "a.nii", "c.zip", "notes.txt", ".hidden.nii.gz"):
        (mixed / name).write_bytes(b"")
    one = tmp_path / "x.nii.gz"
    assert scans_of([series, mixed, one]) == [
        series, mixed / "a.nii", mixed / "b.nii.gz", mixed / "c.zip", mixed / "s1", one
    ]  # fmt: skip


def test_output_names_are_distinct(tmp_path: Path) -> None:
    scans = [
        tmp_path / "3Dircadb1.1" / "PATIENT_DICOM",
        tmp_path / "3Dircadb1.2" / "PATIENT_DICOM",
        tmp_path / "c" / "a.nii.gz",
        tmp_path / "c" / "a.zip",
        tmp_path / "c" / "b.nii",
    ]
    assert output_names(scans) == [
        "3Dircadb1.1_PATIENT_DICOM", "3Dircadb1.2_PATIENT_DICOM", "c_a", "c_a_2", "b"
    ]  # fmt: skip


def test_options_that_need_one_scan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    assert cli_main(["predict", str(a), str(b), "-o", str(tmp_path / "m.nii.gz")]) == 2
    assert "m.nii.gz: 2 scans need an output folder (-o DIR)" in capsys.readouterr().err
    assert cli_main(["predict", str(a), "-o", str(tmp_path / "o"), "--series", "1.2"]) == 2
    assert "--series applies to one scan" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
    assert not (tmp_path / "o").exists()
