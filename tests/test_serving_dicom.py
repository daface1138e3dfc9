"""The served model's DICOM form and slice orientation, in process (the real server: see
test_serving.py's slow tests)."""

from __future__ import annotations

import base64
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from dicomfake import phantom_ijk, read_seg_mask, write_series
from liverseg.data.dicom import read_ct_series
from liverseg.data.volumes import from_canonical
from liverseg.inference import Segmenter
from liverseg.serving.forms import slice_orientation
from liverseg.serving.model import LiverSegModel


class RightHalfModel:
    """Probability 1 where the windowed CT > 0.5 in the half of the image at large first index
    (the patient's right in RAS): an answer that changes when the slices are mirrored."""

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        out = (x > 0.5).astype(np.float32)
        out[:, : x.shape[1] // 2] = 0.0
        return out


def served(model: object = None) -> LiverSegModel:
    """The pyfunc as the server runs it, around a stand-in network (no artifacts to load)."""
    seg = Segmenter(model or RightHalfModel(), window_hu=(-100, 400), image_size=32, batch_size=4)
    return LiverSegModel(seg, max_bytes=8 * 1024 * 1024)


def zipped(folder: Path) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def dicom_frame(payload: str) -> pd.DataFrame:
    return pd.DataFrame({"dicom_zip": [payload]})


@pytest.mark.parametrize(
    ("raw", "codes"),
    [(None, ("R", "A", "S")), ("las", ("L", "A", "S")), ("PRI", ("P", "R", "I"))],
)
def test_orientation_param(raw: str | None, codes: tuple[str, str, str]) -> None:
    params = None if raw is None else {"orientation": raw}
    assert slice_orientation(params) == codes


@pytest.mark.parametrize(
    ("raw", "match"),
    [("LLS", "one of L/R, A/P and S/I"), ("RA", "three axis codes"), ("RSA", "must be axial")],
)
def test_bad_orientation_is_refused(raw: str, match: str) -> None:
    with pytest.raises(MlflowException, match=match):
        served().predict(None, np.zeros((1, 8, 8)), params={"orientation": raw})


def test_slices_in_another_orientation_get_the_right_mask() -> None:
    # Two bright blocks, the larger on the patient's right (large x in RAS).
    ras = np.full((2, 40, 36), -50.0, np.float32)  # (N, H=x, W=y)
    ras[:, 26:38, 4:30] = 300.0
    ras[:, 3:9, 10:20] = 300.0
    las = ras[:, ::-1, :]  # the same slices as a L,A,S file stores them
    pyfunc = served()
    truth = pyfunc.predict(None, ras)
    assert truth[:, 26:38].any() and not truth[:, :20].any()
    # Sent as RAS (the default), mirrored slices put the "right" on the wrong side ...
    wrong = pyfunc.predict(None, las)
    assert not np.array_equal(wrong[:, ::-1, :], truth)
    # ... and with their orientation named, the masks line up with the slices as sent.
    right = pyfunc.predict(None, las, params={"orientation": "LAS"})
    np.testing.assert_array_equal(right[:, ::-1, :], truth)


def test_dicom_zip_answers_a_seg_on_the_series(tmp_path: Path) -> None:
    hu = phantom_ijk()
    hu[hu > 100] = 300.0  # the block lies at small i = the patient's right
    write_series(tmp_path / "ct", hu)
    answer = served().predict(None, dicom_frame(zipped(tmp_path / "ct")))
    record = answer.iloc[0]
    series = read_ct_series(tmp_path / "ct")
    seg_file = tmp_path / "mask.dcm"
    seg_file.write_bytes(base64.b64decode(record["mask_seg"]))
    expected = from_canonical(served().segmenter.segment_ras(series.volume.data), series.volume)
    assert expected.any()
    np.testing.assert_array_equal(read_seg_mask(seg_file, series.datasets), expected)
    assert record["series"] == series.info.uid
    assert record["liver_voxels"] == int(expected.sum())
    quality = record["quality"]
    assert quality["review"] is True and quality["agreement"] is None
    assert quality["centroid_offset_mm"] > 0

    as_nifti = served().predict(
        None, dicom_frame(zipped(tmp_path / "ct")), params={"mask_format": "nifti"}
    )
    assert "mask_nifti" in as_nifti.columns and "mask_seg" not in as_nifti.columns


def test_dicom_zip_errors_name_the_field(tmp_path: Path) -> None:
    hu = phantom_ijk()
    write_series(tmp_path / "two", hu, series_uid="1.2.3.1", prefix="a")
    write_series(tmp_path / "two", hu[:, :, :4], series_uid="1.2.3.2", prefix="b")
    pyfunc = served()
    with pytest.raises(MlflowException, match=r"^dicom_zip: 2 series found") as err:
        pyfunc.predict(None, dicom_frame(zipped(tmp_path / "two")))
    assert "/tmp" not in str(err.value) and "liverseg-dicom" not in str(err.value)
    one = pyfunc.predict(None, dicom_frame(zipped(tmp_path / "two")), params={"series": "1.2.3.2"})
    assert one.iloc[0]["series"] == "1.2.3.2"
    with pytest.raises(MlflowException, match="dicom_zip: not valid base64"):
        pyfunc.predict(None, dicom_frame("@@@"))
    with pytest.raises(MlflowException, match="dicom_zip: not a zip archive"):
        pyfunc.predict(None, dicom_frame(base64.b64encode(b"hello").decode()))
    with pytest.raises(MlflowException, match="mask_format must be one of"):
        pyfunc.predict(None, dicom_frame(zipped(tmp_path / "two")), params={"mask_format": "x"})
    big = base64.b64encode(bytes(9 * 1024 * 1024)).decode()
    with pytest.raises(MlflowException, match="request too large: the zip file"):
        pyfunc.predict(None, dicom_frame(big))
