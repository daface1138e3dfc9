"""`liverseg predict` on DICOM: SEG and NIfTI out, the quality JSON, ensemble members, maps.

The model is a real saved Keras ensemble of 1x1-convolution "threshold" networks (probability
~1 where the windowed CT exceeds a member's level), so the right answer is known exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import tool_env
from dicomfake import phantom_ijk, read_seg_mask, write_series
from liverseg.data.dicom import read_ct_series
from liverseg.data.volumes import from_canonical
from liverseg.inference import PostProcessing, Segmenter

WINDOW = (-100.0, 400.0)
# Windowed levels of the members: the body (40 HU -> 0.28) is liver for the first member only,
# the block (300 HU -> 0.8) for all three.
LEVELS = (0.2, 0.5, 0.6)


def threshold_net(level: float):
    import keras

    inp = keras.Input(shape=(None, None, 1))
    layer = keras.layers.Conv2D(1, 1, activation="sigmoid")
    out = layer(inp)
    model = keras.Model(inp, out)
    layer.set_weights([np.full((1, 1, 1, 1), 60.0, np.float32), np.array([-60.0 * level])])
    return model


def ensemble_dir(folder: Path, levels: tuple[float, ...] = LEVELS) -> Path:
    from liverseg.model.folder import save_model_dir
    from liverseg.training.crossval import ensemble

    save_model_dir(folder, ensemble([threshold_net(v) for v in levels]), list(WINDOW), 32)
    return folder


def ct_hu() -> np.ndarray:
    hu = phantom_ijk()  # (columns, rows, slices) = L, P, S; block at small i = patient's right
    hu[hu > 100] = 300.0
    return hu


def predict(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "liverseg.cli", "predict", *args],
        env=tool_env(),
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensemble_dir(tmp_path_factory.mktemp("m") / "models")


def test_members_leave_the_ensemble_mask_unchanged(models: Path, tmp_path: Path) -> None:
    write_series(tmp_path / "ct", ct_hu())
    hu = read_ct_series(tmp_path / "ct").volume.data
    seg = Segmenter.from_dir(models, batch_size=5)
    plain = seg.predict_ras(hu)
    full = seg.predict_ras(hu, probabilities=True, members=True)
    np.testing.assert_array_equal(full.mask, plain.mask)
    assert full.members is not None and full.members.shape == (3, *hu.shape)
    for k, level in enumerate(LEVELS):
        alone = Segmenter(threshold_net(level), window_hu=WINDOW, image_size=32, batch_size=5)
        np.testing.assert_array_equal(full.members[k], alone.predict_ras(hu).mask)
    assert full.probabilities is not None
    np.testing.assert_array_equal(full.probabilities >= PostProcessing().threshold, full.mask)
    # A single network has no members.
    single = Segmenter(threshold_net(0.5), window_hu=WINDOW, image_size=32)
    assert single.predict_ras(hu, members=True).members is None


# None: no FrameOfReferenceUID in the CT, as in the official 3D-IRCADb-01 series.
@pytest.mark.parametrize("frame_uid", ["1.2.826.0.1.3680043.8.498.2", None])
def test_predict_dicom_to_seg_and_nifti_agree(
    models: Path, tmp_path: Path, frame_uid: str | None
) -> None:
    write_series(tmp_path / "ct", ct_hu(), shuffle_seed=7, frame_uid=frame_uid)
    seg_out, nii_out = tmp_path / "liver.dcm", tmp_path / "liver_n.nii.gz"
    probs = tmp_path / "prob.nii.gz"
    a = predict(str(tmp_path / "ct"), "-o", str(seg_out), "--model", str(models))
    assert a.returncode == 0, a.stderr[-3000:]
    b = predict(
        str(tmp_path / "ct"), "-o", str(nii_out), "--model", str(models), "--probabilities",
        str(probs),
    )  # fmt: skip
    assert b.returncode == 0, b.stderr[-3000:]

    series = read_ct_series(tmp_path / "ct")
    nifti = nib.load(str(nii_out))
    np.testing.assert_allclose(nifti.affine, series.volume.source_affine)
    from_nifti = np.asanyarray(nifti.dataobj)
    from_seg = read_seg_mask(seg_out, series.datasets)
    np.testing.assert_array_equal(from_seg, from_nifti)
    # The mask is the in-process Segmenter's on the source grid, and nearly the 300 HU block
    # (i < 18, j 12..19, slices 2..9; resizing to the network's 32 x 32 and back blurs edges).
    vol = series.volume
    seg = Segmenter.from_dir(models)
    expected = from_canonical(seg.segment_ras(vol.data), vol)
    np.testing.assert_array_equal(from_nifti, expected)
    block = ct_hu() > 250
    assert 2 * (block & (expected == 1)).sum() / (block.sum() + expected.sum()) > 0.98

    prob = np.asanyarray(nib.load(str(probs)).dataobj)
    assert prob.dtype == np.float32 and prob.shape == expected.shape
    thresholded = from_canonical(seg.predict_ras(vol.data).mask, vol)
    np.testing.assert_array_equal(prob >= PostProcessing().threshold, thresholded)

    report = json.loads((tmp_path / "liver.quality.json").read_text())
    assert report["series"] == series.info.uid and report["format"] == "seg"
    assert report["n_members"] == 3
    assert report["agreement"] < 0.9  # one member takes the whole body
    assert not report["touches_first_slice"] and not report["touches_last_slice"]
    assert report["centroid_offset_mm"] > 0  # the block is on the patient's right
    assert report["review"] is True
    assert "REVIEW:" in a.stdout


def test_seg_output_needs_dicom_input(models: Path, tmp_path: Path) -> None:
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), str(ct))
    out = tmp_path / "liver.dcm"
    proc = predict(str(ct), "-o", str(out), "--model", str(models))
    assert proc.returncode == 2
    assert "ct.nii.gz: a DICOM SEG references its DICOM CT series" in proc.stderr
    assert not out.exists() and not (tmp_path / "liver.quality.json").exists()


def test_two_series_need_series_option(models: Path, tmp_path: Path) -> None:
    write_series(tmp_path / "s", ct_hu(), series_uid="1.2.3.1", prefix="a")
    write_series(tmp_path / "s", ct_hu()[:, :, :6], series_uid="1.2.3.2", prefix="b")
    out = tmp_path / "liver.dcm"
    proc = predict(str(tmp_path / "s"), "-o", str(out), "--model", str(models))
    assert proc.returncode == 2 and "choose one with --series" in proc.stderr
    assert not out.exists()
    ok = predict(str(tmp_path / "s"), "-o", str(out), "--model", str(models), "--series", "1.2.3.2")
    assert ok.returncode == 0, ok.stderr[-3000:]
    chosen = read_ct_series(tmp_path / "s", "1.2.3.2")
    assert read_seg_mask(out, chosen.datasets).shape == (40, 32, 6)


def test_describe_model_resolves_a_registry_alias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from liverseg.predict import describe_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model("liver-unet")
    for _ in range(2):
        client.create_model_version("liver-unet", source=str(tmp_path))
    client.set_registered_model_alias("liver-unet", "champion", "2")
    assert describe_model("models:/liver-unet@champion") == "liver-unet v2 (@champion)"
    assert describe_model("models:/liver-unet/1") == "liver-unet v1"
    assert describe_model("models") == "models"
