"""Segmenter and `liverseg predict`: any orientation in, a mask on the input's grid out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import tool_env
from liverseg.data.volumes import from_canonical, load_volume
from liverseg.inference import PostProcessing, Segmenter
from liverseg.model.folder import save_model_dir


class ThresholdModel:
    """A stand-in network with a known answer: probability 1 where the windowed CT > 0.5.

    It lets the tests check the Segmenter's geometry (reorientation, resizing, batching)
    exactly, independent of any training."""

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        return (x > 0.5).astype(np.float32)


def blob_volume(shape=(40, 36, 12)) -> tuple[np.ndarray, np.ndarray]:
    """A bright box (300 HU) in a dark body (-50 HU), and its mask."""
    hu = np.full(shape, -50.0, np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[24:36, 6:22, 3:9] = 1  # off-centre, so a flip or transpose would show
    hu[mask == 1] = 300.0
    return hu, mask


def seg(**post) -> Segmenter:
    return Segmenter(
        ThresholdModel(),
        window_hu=(-100, 400),
        image_size=32,
        post=PostProcessing(**post),
        batch_size=5,
    )


def test_segment_ras_recovers_the_box() -> None:
    hu, mask = blob_volume()
    out = seg().segment_ras(hu)
    assert out.shape == hu.shape and out.dtype == np.uint8
    inter = np.logical_and(out, mask).sum()
    assert 2 * inter / (out.sum() + mask.sum()) > 0.9


def test_a_body_crop_model_sees_only_the_bodys_square() -> None:
    hu = np.full((60, 50, 8), -1000.0, np.float32)
    hu[10:41, 5:36, :] = -50.0  # the body
    hu[18:30, 12:26, 2:6] = 300.0  # the organ
    hu[55:59, 45:49, :] = 300.0  # something bright apart from the body, outside its square
    truth = np.zeros(hu.shape, bool)
    truth[18:30, 12:26, 2:6] = True
    post = PostProcessing(largest_component=False)
    kw = {"window_hu": (-100, 400), "image_size": 32, "post": post}
    cropped = Segmenter(ThresholdModel(), crop="body", **kw).segment_ras(hu)  # type: ignore[arg-type]
    whole = Segmenter(ThresholdModel(), **kw).segment_ras(hu)  # type: ignore[arg-type]
    assert whole[55:59, 45:49].any() and not cropped[55:59, 45:49].any()
    assert 2 * (cropped & truth).sum() / (cropped.sum() + truth.sum()) > 0.9


def test_batching_does_not_change_the_result() -> None:
    hu, _ = blob_volume()
    a = seg().segment_ras(hu)
    s = seg()
    s.batch_size = 1
    np.testing.assert_array_equal(a, s.segment_ras(hu))


def test_largest_component_drops_a_distant_blob() -> None:
    hu, _ = blob_volume()
    hu[2:6, 28:34, 9:11] = 300.0  # a small second bright object
    with_cc = seg(largest_component=True).segment_ras(hu)
    without = seg(largest_component=False).segment_ras(hu)
    assert without[2:6, 28:34, 9:11].any() and not with_cc[2:6, 28:34, 9:11].any()


def test_segment_slices_shape() -> None:
    hu, mask = blob_volume()
    stack = np.moveaxis(hu, 2, 0)
    out = seg().segment_slices(stack)
    assert out.shape == stack.shape and set(np.unique(out)) <= {0, 1}


@pytest.mark.parametrize("codes", ["LPS", "LAS", "RAS"])
def test_volume_orientation_is_undone(tmp_path: Path, codes: str) -> None:
    hu, mask = blob_volume()
    # Store the RAS arrays flipped to the given orientation, with the matching affine.
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    data, m = hu, mask
    for axis, c in enumerate(codes):
        if c in "LPI":
            data, m = np.flip(data, axis), np.flip(m, axis)
            aff[axis, axis] *= -1
    nib.save(nib.Nifti1Image(data.astype(np.int16), aff), str(tmp_path / "ct.nii.gz"))
    vol = load_volume(tmp_path / "ct.nii.gz")
    native = from_canonical(seg().segment_ras(vol.data), vol)
    inter = np.logical_and(native, m).sum()
    assert 2 * inter / (native.sum() + m.sum()) > 0.9


def tiny_model_dir(folder: Path) -> Path:
    from liverseg.model.unet import build_unet
    from liverseg.params import ModelParams

    model = build_unet(32, ModelParams(depth=2, base_filters=4), seed=0)
    return save_model_dir(folder, model, window=(-100, 400), image_size=32)


def test_predict_cli_keeps_a_non_ras_affine(tmp_path: Path) -> None:
    hu, _ = blob_volume()
    aff = np.array(
        [[-0.8, 0, 0, 100.0], [0, -0.8, 0, 50.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]]
    )  # L,P,S
    ct = tmp_path / "ct.nii.gz"
    img = nib.Nifti1Image(hu.astype(np.int16), aff)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(ct))
    models = tiny_model_dir(tmp_path / "models")
    out = tmp_path / "mask.nii.gz"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "liverseg.cli",
            "predict",
            str(ct),
            "-o",
            str(out),
            "--model",
            str(models),
        ],
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "liver volume" in proc.stdout and "mL" in proc.stdout
    res = nib.load(str(out))
    np.testing.assert_allclose(res.affine, aff)
    assert nib.aff2axcodes(res.affine) == ("L", "P", "S")
    assert res.shape == hu.shape
    assert res.get_data_dtype() == np.uint8
    # The mask written equals the in-process Segmenter's mask mapped back to the file's grid.
    s = Segmenter.from_dir(models)
    vol = load_volume(ct)
    expected = from_canonical(s.segment_ras(vol.data), vol)
    np.testing.assert_array_equal(np.asanyarray(res.dataobj), expected)


def test_predict_cli_bad_input_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "liverseg.cli",
            "predict",
            str(bad),
            "-o",
            str(tmp_path / "m.nii.gz"),
            "--model",
            str(tmp_path),
        ],
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "broken.nii.gz" in proc.stderr
    assert not (tmp_path / "m.nii.gz").exists()
