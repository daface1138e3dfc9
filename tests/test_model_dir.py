"""The model folder and the post-processing: one writer/reader pair each, and clear errors."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tool_env
from liverseg.errors import DataError
from liverseg.inference import PostProcessing, Segmenter
from liverseg.model.folder import MODEL_FILE, PREPROCESSING_FILE, save_model_dir
from liverseg.params import EvaluateParams


def one_conv_model():  # type: ignore[no-untyped-def]
    """A 1x1 convolution with fixed weights: a known network, built in milliseconds."""
    import keras

    inputs = keras.Input((16, 16, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.full((1, 1, 1, 1), 40.0, np.float32), np.array([-12.0], np.float32)])
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "models"
    return save_model_dir(folder, one_conv_model(), window=(-100, 400), image_size=16)


def test_save_model_dir_round_trips(model_dir: Path) -> None:
    assert sorted(p.name for p in model_dir.iterdir()) == [MODEL_FILE, PREPROCESSING_FILE]
    assert json.loads((model_dir / PREPROCESSING_FILE).read_text()) == {
        "window": [-100, 400],
        "image_size": 16,
        "context_mm": 0.0,
        "crop": "none",
    }
    seg = Segmenter.from_dir(model_dir)
    assert (seg.window_hu, seg.image_size, seg.crop) == ((-100.0, 400.0), 16, "none")
    # sigmoid(40 * x - 12) >= 0.5 where the windowed value x >= 0.3, i.e. HU >= 50
    hu = np.full((16, 16, 3), 0.0, np.float32)
    hu[4:12, 4:12, :] = 100.0
    expected = (hu >= 50).astype(np.uint8)
    np.testing.assert_array_equal(seg.segment_ras(hu), expected)


def test_save_model_dir_leaves_the_old_folder_on_failure(model_dir: Path, tmp_path: Path) -> None:
    folder = save_model_dir(tmp_path / "models", one_conv_model(), (-100, 400), 16)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    class Unsaveable:
        def save(self, path: Path) -> None:
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        save_model_dir(folder, Unsaveable(), (-100, 400), 16)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def _broken(tmp_path: Path, model_dir: Path, case: str) -> tuple[Path, str]:
    """A broken model folder and the message its loading must give."""
    folder = tmp_path / "models"
    if case == "absent":
        return folder, r"models: not found \(expected a train stage model folder\)"
    folder.mkdir()
    if case == "empty":
        return folder, r"models: no model\.keras and no preprocessing\.json"
    (folder / MODEL_FILE).write_bytes((model_dir / MODEL_FILE).read_bytes())
    if case == "no preprocessing":
        return folder, r"models: no preprocessing\.json \(expected a train stage model folder\)"
    if case == "bad preprocessing":
        (folder / PREPROCESSING_FILE).write_text('{"window": [-100], "image_size": 16}')
        return folder, r"preprocessing\.json: not a preprocessing\.json of the train stage"
    if case == "bad crop":
        (folder / PREPROCESSING_FILE).write_text(
            '{"window": [-100, 400], "image_size": 16, "crop": "lungs"}'
        )
        return folder, r"preprocessing\.json: not a preprocessing\.json .*'lungs'"
    (folder / PREPROCESSING_FILE).write_text('{"window": [-100, 400], "image_size": 16}')
    (folder / MODEL_FILE).write_bytes(b"not a zip")
    return folder, r"model\.keras: not a loadable Keras model"


@pytest.mark.parametrize(
    "case", ["absent", "empty", "no preprocessing", "bad preprocessing", "bad crop", "bad model"]
)
def test_a_broken_model_folder_is_a_data_error(tmp_path: Path, model_dir: Path, case: str) -> None:
    folder, match = _broken(tmp_path, model_dir, case)
    with pytest.raises(DataError, match=match):
        Segmenter.load(folder)


def test_predict_with_an_empty_model_folder_is_one_line(tmp_path: Path) -> None:
    import nibabel as nib

    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), str(ct))
    (tmp_path / "empty").mkdir()
    out = tmp_path / "mask.nii.gz"
    cmd = [sys.executable, "-m", "liverseg.cli", "predict", str(ct), "-o", str(out)]
    proc = subprocess.run(
        [*cmd, "--model", str(tmp_path / "empty")], env=tool_env(), capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"liverseg predict: error: {tmp_path / 'empty'}: no model.keras and no "
        "preprocessing.json (expected a train stage model folder)"
    ]
    assert not out.exists()


# ----------------------------------------------------------------------------- post-processing
def test_post_processing_round_trip() -> None:
    post = PostProcessing(threshold=0.3, largest_component=False, fill_holes=True)
    assert post.to_dict() == {"threshold": 0.3, "largest_component": False, "fill_holes": True}
    assert PostProcessing.from_dict(json.loads(json.dumps(post.to_dict())), "f.json") == post
    ev = EvaluateParams(threshold=0.4, largest_component=False, fill_holes=True, batch_size=2)
    assert PostProcessing.from_params(ev) == PostProcessing(0.4, False, True)
    assert post.updated({"threshold": 0.7, "orientation": "LAS"}, "params") == PostProcessing(
        0.7, False, True
    )
    # predict on a model folder post-processes as evaluate does by default
    assert PostProcessing() == PostProcessing.from_params(EvaluateParams())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([0.5], r"^post\.json: expected a JSON object, got list$"),
        ({"threshold": 0.5, "fill_holes": False}, r"missing key\(s\) \['largest_component'\]"),
        (
            {"threshold": 0.5, "largest_component": True, "fill_holes": False, "x": 1},
            r"^post\.json: x: Unexpected keyword argument, got 1$",
        ),
        (
            {"threshold": "0.5", "largest_component": True, "fill_holes": False},
            "threshold: Input should be a valid number, got '0.5'",
        ),
        (
            {"threshold": 1.0, "largest_component": True, "fill_holes": False},
            "threshold: Input should be less than 1, got 1.0",
        ),
        (
            {"threshold": 0.5, "largest_component": 1, "fill_holes": False},
            "largest_component: Input should be a valid boolean, got 1",
        ),
    ],
)
def test_post_processing_refuses_bad_dicts(data: object, match: str) -> None:
    with pytest.raises(DataError, match=match):
        PostProcessing.from_dict(data, "post.json")


def test_predict_refuses_a_threshold_outside_0_1_before_reading(tmp_path: Path) -> None:
    import argparse

    from liverseg import predict

    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    args = parser.parse_args(
        ["absent.nii.gz", "-o", str(tmp_path / "m.nii.gz"), "--threshold", "2"]
    )
    with pytest.raises(DataError, match=r"^options: threshold: Input should be less than 1, got 2"):
        predict.main(args)
