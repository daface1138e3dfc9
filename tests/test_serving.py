"""Serving: the pyfunc's request decoding, the register stage's aliases, and a real
``mlflow models serve`` answering both request forms like the in-process Segmenter."""

from __future__ import annotations

import base64
import gzip
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from conftest import SERVED_LIMIT_MB as LIMIT_MB
from conftest import SERVED_MODEL as MODEL_NAME
from conftest import Server, Store, register_with, tracking_at
from liverseg.data.volumes import from_canonical
from liverseg.errors import DataError
from liverseg.evaluation.results import read_test_metrics
from liverseg.inference import PostProcessing, Segmenter
from liverseg.params import RegisterParams
from liverseg.registry import CHALLENGER, CHAMPION, decide
from liverseg.serving.client import (
    ServingError,
    invocations_url,
    post_json,
    segment_slices,
    segment_volume_file,
)
from liverseg.serving.forms import (
    MAX_REQUEST_ENV,
    max_request_bytes,
    slices_from_input,
    volume_from_payload,
)
from liverseg.stages.register import register

MB = 1024 * 1024
# A non-RAS grid (L, P, S), with an offset, so that a mask written back on the wrong grid shows.
LPS_AFFINE = np.array(
    [[-1.5, 0, 0, 30.0], [0, -1.5, 0, 20.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]], dtype=float
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def nifti_bytes(
    data: np.ndarray, affine: np.ndarray = LPS_AFFINE, gz: bool = True, version: int = 1
) -> bytes:
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    raw = cls(data, affine).to_bytes()
    return gzip.compress(raw) if gz else raw


def blob_ct(shape: tuple[int, ...] = (40, 48, 10)) -> np.ndarray:
    """Soft tissue (-75 HU) with an off-centre 100 HU box, as int16 (what scanners store)."""
    ct = np.full(shape, -75, np.int16)
    ct[6:22, 10:30, 2:8] = 100
    return ct


# ---------------------------------------------------------------------- request decoding (fast)
@pytest.mark.parametrize(
    ("model_input", "match"),
    [
        ([[1.0, 2.0], [3.0, 4.0]], r"expected shape \(N, H, W\), got shape \(2, 2\)"),
        (np.zeros((1, 2, 3, 4)), r"expected shape \(N, H, W\), got shape \(1, 2, 3, 4\)"),
        ([[["a", "b"]]], "expected numbers"),
        (np.array([[[True]]]), "expected numbers"),
        ([], "empty input"),
        (np.zeros((2, 0, 5)), "empty input"),
        ([[[np.nan, 1.0]]], "1 values are NaN or inf"),
        ([[[1e39, -np.inf, 0.0]]], "2 values are NaN or inf"),
        (np.zeros((1, 800, 800)), r"request too large: the slices array \(1, 800, 800\)"),
    ],
)
def test_bad_slices_are_refused(model_input: Any, match: str) -> None:
    with pytest.raises(DataError, match=match):
        slices_from_input(model_input, LIMIT_MB * MB)


def test_good_slices_become_float32() -> None:
    out = slices_from_input([[[1, 2], [3, 4]]], LIMIT_MB * MB)
    assert out.dtype == np.float32 and out.shape == (1, 2, 2)
    np.testing.assert_array_equal(out, [[[1, 2], [3, 4]]])


def _gzip_bomb(shape: tuple[int, int, int] = (256, 256, 12)) -> str:
    """Zeros: megabytes of voxels (3 MB as float32 by default) in a few kB of gzip."""
    return b64(nifti_bytes(np.zeros(shape, np.int16)))


def _pair_header() -> str:
    img = nib.Nifti1Pair(np.zeros((4, 4, 4), np.int16), np.eye(4))
    return b64(img.header.binaryblock + bytes(4 * 4 * 4 * 2))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (123, "expected a base64 string of a .nii/.nii.gz file, got int"),
        ("", "empty string"),
        ("@@ not base64 @@", "not valid base64"),
        (b64(b"hello world" * 40), r"not a NIfTI file \(header size field"),
        (b64(b"tiny"), "shorter than a NIfTI header"),
        (b64(b"\x1f\x8b" + b"garbage" * 10), "corrupt gzip data"),
        (b64(gzip.compress(b"x" * 1000)[:-12]), "truncated gzip data"),
        (b64(nifti_bytes(blob_ct(), gz=False)[:-100]), "truncated NIfTI"),
        (_pair_header(), r"\.hdr/\.img pair"),
        (b64(nifti_bytes(np.zeros((6, 6, 4, 2), np.int16))), "expected a 3-D volume, got 4-D"),
        (b64(nifti_bytes(np.full((4, 4, 4), np.nan, np.float32))), "64 NaN or inf voxels"),
        (_gzip_bomb(), r"request too large: the volume \(256, 256, 12\) as float32 is 3\.0 MB"),
        (_gzip_bomb((512, 512, 8)), "request too large: the NIfTI file after gunzip"),
    ],
)
def test_bad_volumes_are_refused(payload: Any, match: str) -> None:
    with pytest.raises(DataError, match=match):
        volume_from_payload(payload, LIMIT_MB * MB)


@pytest.mark.parametrize(("gz", "version"), [(True, 1), (False, 1), (True, 2)])
def test_volume_payload_keeps_the_file_grid(gz: bool, version: int) -> None:
    ct = blob_ct()
    text = b64(nifti_bytes(ct, gz=gz, version=version))
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # `base64` output
    vol = volume_from_payload(wrapped, LIMIT_MB * MB)
    np.testing.assert_allclose(vol.source_affine, LPS_AFFINE)
    # L, P -> R, A: the first two axes come back flipped.
    np.testing.assert_array_equal(vol.data, ct[::-1, ::-1, :].astype(np.float32))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 512 * MB), ("", 512 * MB), ("2", 2 * MB), ("0.5", MB // 2), (" 1 ", MB)],
)
def test_max_request_bytes(value: str | None, expected: int) -> None:
    env = {} if value is None else {MAX_REQUEST_ENV: value}
    assert max_request_bytes(env) == expected


@pytest.mark.parametrize("value", ["0", "-3", "ten", "nan", "inf"])
def test_max_request_bytes_refuses_bad_values(value: str) -> None:
    with pytest.raises(ValueError, match=MAX_REQUEST_ENV):
        max_request_bytes({MAX_REQUEST_ENV: value})


# -------------------------------------------------------------------------- alias rule (fast)
@pytest.mark.parametrize(
    ("new", "champion", "has_champion", "same_test", "expected"),
    [
        (0.80, None, False, True, CHAMPION),  # first version
        (0.90, 0.85, True, True, CHAMPION),  # better
        (0.85, 0.85, True, True, CHAMPION),  # equal: the newer model wins ties
        (0.84, 0.85, True, True, CHALLENGER),  # worse
        (0.99, None, True, True, CHALLENGER),  # champion of unknown quality is kept
        (0.99, 0.85, True, False, CHALLENGER),  # so is one tested on other patients
    ],
)
def test_decide(
    new: float, champion: float | None, has_champion: bool, same_test: bool, expected: str
) -> None:
    assert decide(new, champion, has_champion, same_test) == expected


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ('{"dice": 0.9}', "dice_mean: missing or not a number"),
        ('{"dice_mean": "0.9"}', "dice_mean: missing or not a number"),
        ('{"dice_mean": 1.5}', r"dice_mean: must be in \[0, 1\]"),
        ('{"dice_mean": NaN}', r"dice_mean: must be in \[0, 1\]"),
    ],
)
def test_read_test_metrics_refuses_bad_files(
    tmp_path: Path, content: str | None, match: str
) -> None:
    path = tmp_path / "metrics.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_test_metrics(path)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h:5000", "http://h:5000/invocations"),
        ("http://h:5000/", "http://h:5000/invocations"),
        ("http://h:5000/invocations", "http://h:5000/invocations"),
    ],
)
def test_invocations_url(url: str, expected: str) -> None:
    assert invocations_url(url) == expected


# ------------------------------------------------------------------------- fixtures (slow part)
# tiny_model, server and the served model's store are conftest's, shared with test_faults.
@pytest.fixture(scope="module")
def store(serving_store: Store) -> Iterator[Store]:
    """The served model's store, the tracking URI pointing at it (the register stage's way)."""
    with tracking_at(serving_store.uri):
        yield serving_store


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
    req = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"message": text}


def volume_body(payload: str, params: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"dataframe_split": {"columns": ["nifti"], "data": [[payload]]}}
    if params:
        body["params"] = params
    return json.dumps(body).encode()


def slices_body(stack: np.ndarray, params: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"inputs": stack.tolist()}
    if params:
        body["params"] = params
    return json.dumps(body).encode()


def local_segmenter(model: Path, **post: Any) -> Segmenter:
    return Segmenter.from_dir(model, post=PostProcessing(**post))


# --------------------------------------------------------------------------- the real server
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(3, 40, 56), (1, 512, 512)])
def test_slices_match_the_in_process_segmenter(
    server: Server, tiny_model: Path, shape: tuple[int, int, int]
) -> None:
    n, h, w = shape
    stack = np.full(shape, -75.0, np.float32)
    stack[:, h // 5 : h // 2, w // 3 : (4 * w) // 5] = 100.0
    stack[-1, :, : w // 4] = 0.5  # a fractional HU survives the JSON round trip
    status, answer = post(server.url, slices_body(stack))
    assert status == 200, answer
    got = np.asarray(answer["predictions"])
    expected = local_segmenter(tiny_model).segment_slices(stack)
    assert 0 < expected.sum() < expected.size  # the test model does find something
    assert got.shape == shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("gz", [True, False])
def test_volume_mask_is_on_the_input_grid(server: Server, tiny_model: Path, gz: bool) -> None:
    from liverseg.data.volumes import from_canonical, volume_from_image

    ct = blob_ct()
    status, answer = post(server.url, volume_body(b64(nifti_bytes(ct, gz=gz))))
    assert status == 200, answer
    record = answer["predictions"][0]
    mask_img = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(record["mask_nifti"])))
    vol = volume_from_image(nib.Nifti1Image(ct, LPS_AFFINE), kind="image")
    expected = from_canonical(local_segmenter(tiny_model).segment_ras(vol.data), vol)
    assert 0 < expected.sum() < expected.size
    assert mask_img.shape == ct.shape
    np.testing.assert_allclose(mask_img.affine, LPS_AFFINE)
    assert mask_img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(mask_img.dataobj), expected)
    assert record["liver_voxels"] == int(expected.sum())
    assert record["liver_volume_ml"] == pytest.approx(expected.sum() * 1.5 * 1.5 * 3.0 / 1000)


@pytest.mark.slow
def test_params_override_the_threshold(server: Server, tiny_model: Path) -> None:
    stack = np.moveaxis(blob_ct().astype(np.float32), 2, 0)
    status, answer = post(server.url, slices_body(stack, {"threshold": 0.2, "fill_holes": False}))
    assert status == 200, answer
    expected = local_segmenter(tiny_model, threshold=0.2, fill_holes=False).segment_slices(stack)
    default = local_segmenter(tiny_model).segment_slices(stack)
    assert expected.sum() != default.sum()  # the override makes a difference here
    np.testing.assert_array_equal(np.asarray(answer["predictions"]), expected)


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


BAD_REQUESTS = [
    (
        "wrong shape",
        _json({"inputs": [[1.0, 2.0], [3.0, 4.0]]}),
        400,
        r"expected shape \(N, H, W\)",
    ),
    ("wrong dtype", _json({"inputs": [[["a", "b"]]]}), 400, "expected numbers"),
    ("NaN", b'{"inputs": [[[NaN, 1.0]]]}', 400, "NaN or inf"),
    ("ragged", _json({"inputs": [[[1, 2], [3]]]}), 400, "inhomogeneous"),
    ("empty inputs", _json({"inputs": []}), 400, "empty input"),
    ("empty body", b"", 400, "valid JSON"),
    ("not JSON", b"{inputs: ", 400, "valid JSON"),
    ("not base64", volume_body("@@ not base64 @@"), 400, "not valid base64"),
    ("not NIfTI", volume_body(b64(b"hello world" * 40)), 400, "not a NIfTI file"),
    ("4-D volume", volume_body(b64(nifti_bytes(np.zeros((6, 6, 4, 2), np.int16)))), 400, "4-D"),
    (
        "nifti not a string",
        _json({"dataframe_split": {"columns": ["nifti"], "data": [[7]]}}),
        400,
        "expected a base64 string",
    ),
    (
        "no nifti column",
        _json({"dataframe_split": {"columns": ["ct"], "data": [["x"]]}}),
        400,
        "expected a 'nifti' column",
    ),
    (
        "two volumes",
        _json({"dataframe_split": {"columns": ["nifti"], "data": [["a"], ["b"]]}}),
        400,
        "send one volume per request, got 2",
    ),
    (
        "oversized slices",
        _json({"inputs": np.zeros((1, 800, 800), int).tolist()}),
        400,
        "request too large",
    ),
    ("oversized volume", volume_body(_gzip_bomb()), 400, "request too large"),
    (
        "bad threshold",
        slices_body(np.zeros((1, 4, 4)), {"threshold": 1.5}),
        400,
        "params: threshold: Input should be less than 1, got 1.5",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "status", "match"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(
    server: Server, body: bytes, status: int, match: str
) -> None:
    got, answer = post(server.url, body)
    assert got == status, answer
    assert re.search(match, answer["message"]), answer["message"][-500:]
    ok, good = post(server.url, slices_body(np.full((1, 8, 8), 100.0)))
    assert ok == 200 and np.asarray(good["predictions"]).shape == (1, 8, 8)
    assert server.proc.poll() is None


@pytest.mark.slow
def test_what_mlflow_does_to_the_projects_error_line(server: Server) -> None:
    """What docs/serving.md says MLflow 3.17's scoring server does with a refused request, so
    that the page changes when MLflow does. The model raises MlflowException
    (INVALID_PARAMETER_VALUE) with its one line: the server answers 400, the message opens
    with MLflow's echo of the parsed input and ends with the project's line, which the
    client keeps alone. A missing field never reaches the model: MLflow's own paragraph."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    values = [[-75.0, 100.0], [100.0, -75.0]]
    with pytest.raises(DataError) as own:
        slices_from_input(np.asarray(values), 1 << 30)
    got, answer = post(server.url, _json({"inputs": values}))
    assert got == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    echo, line = answer["message"].split("\nError: ")
    assert line == str(own.value) and "\n" not in line
    assert echo.startswith("Failed to predict data '[[") and "-75." in echo  # the input, back
    with pytest.raises(ServingError) as client_error:
        post_json(server.url, {"inputs": values})
    assert str(client_error.value).endswith(f"HTTP 400: {own.value}")
    assert "Failed to predict" not in str(client_error.value)

    body = _json({"slices": values})
    with pytest.raises(MlflowException) as paragraph:
        scoring_server.infer_and_parse_data(scoring_server._split_data_and_params(body)[0])
    got, answer = post(server.url, body)
    assert got == 400 and answer["error_code"] == "BAD_REQUEST", answer

    # the paragraph names the fields as a Python set, whose order differs between processes
    def unordered(msg: str) -> str:
        return re.sub(r"\{[^}]*\}", "{...}", msg)

    assert unordered(answer["message"]) == unordered(paragraph.value.message)
    assert "exactly one of the input fields" in answer["message"] and len(answer["message"]) > 500


@pytest.mark.slow
def test_wrong_content_type_is_refused(server: Server) -> None:
    got, answer = post(server.url, b"1,2,3", content_type="text/plain")
    assert got == 415 and "content types" in answer["message"]


@pytest.mark.slow
def test_python_client(server: Server, tiny_model: Path, tmp_path: Path) -> None:
    from liverseg.data.volumes import load_volume

    ct_path = tmp_path / "ct.nii.gz"
    ct_path.write_bytes(nifti_bytes(blob_ct()))
    ml = segment_volume_file(server.url, ct_path, tmp_path / "mask.nii")
    mask = nib.load(tmp_path / "mask.nii")
    vol = load_volume(ct_path)
    expected = from_canonical(local_segmenter(tiny_model).segment_ras(vol.data), vol)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)
    assert ml == pytest.approx(expected.sum() * vol.voxel_volume_ml)

    stack = np.moveaxis(blob_ct().astype(np.float32), 2, 0)
    np.testing.assert_array_equal(
        segment_slices(server.url + "/", stack), local_segmenter(tiny_model).segment_slices(stack)
    )
    with pytest.raises(ServingError, match=r"HTTP 400: slices: expected shape \(N, H, W\)"):
        post_json(server.url, {"inputs": [[0, 1], [2, 3]]})


@pytest.mark.slow
def test_python_client_dicom_and_orientation(
    server: Server, tiny_model: Path, tmp_path: Path
) -> None:
    from dicomfake import read_seg_mask, write_series
    from liverseg.data.dicom import read_ct_series
    from liverseg.serving.client import segment_dicom

    hu = blob_ct().astype(np.float32)  # as (columns, rows, slices) of the series
    write_series(tmp_path / "ct", hu, spacing=(1.5, 1.5, 3.0))
    answer = segment_dicom(server.url, tmp_path / "ct", tmp_path / "liver.dcm")
    series = read_ct_series(tmp_path / "ct")
    expected = from_canonical(
        local_segmenter(tiny_model).segment_ras(series.volume.data), series.volume
    )
    assert expected.any()
    np.testing.assert_array_equal(read_seg_mask(tmp_path / "liver.dcm", series.datasets), expected)
    assert answer["series"] == series.info.uid
    assert answer["liver_voxels"] == int(expected.sum())
    assert isinstance(answer["quality"]["review"], bool)

    # Slices as an L,A,S file stores them, with their orientation named: the RAS masks, mirrored.
    ras = np.moveaxis(blob_ct().astype(np.float32), 2, 0)
    las = np.ascontiguousarray(ras[:, ::-1, :])
    got = segment_slices(server.url, las, orientation="LAS")
    np.testing.assert_array_equal(got[:, ::-1, :], local_segmenter(tiny_model).segment_slices(ras))


# ------------------------------------------------------------------------- the aliases (slow)
@pytest.mark.slow
def test_aliases_follow_the_test_dice(server: Server, tiny_model: Path, store: Store) -> None:
    """v1 (0.90) is the champion (server fixture); then a worse, a better and an equal one."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store.uri)
    worse = register_with(store, tiny_model, 0.85, "v2")
    assert (worse["version"], worse["decision"], worse["aliases"]) == (
        "2",
        CHALLENGER,
        [CHALLENGER],
    )
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == "1"
    tags = client.get_model_version(MODEL_NAME, "2").tags
    assert tags["test_dice"] == "0.85" and tags["champion_dice_before"] == "0.9"
    assert tags["decision"] == CHALLENGER and tags["source_run_id"] == worse["source_run_id"]

    better = register_with(store, tiny_model, 0.95, "v3")
    assert (better["version"], better["decision"]) == ("3", CHAMPION)
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == "3"
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHALLENGER).version) == "2"

    equal = register_with(store, tiny_model, 0.95, "v4")
    assert equal["decision"] == CHAMPION and equal["metrics"]["champion_dice_before"] == 0.95

    # A champion without a test_dice tag (e.g. promoted by hand) is not displaced.
    client.delete_model_version_tag(MODEL_NAME, "4", "test_dice")
    unknown = register_with(store, tiny_model, 0.99, "v5")
    assert unknown["decision"] == CHALLENGER
    assert client.get_model_version(MODEL_NAME, "5").tags["champion_dice_before"] == "unknown"
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == "4"

    # Nor is a champion tested on other patients: two test sets' Dice do not compare.
    client.set_model_version_tag(MODEL_NAME, "4", "test_dice", "0.95")
    client.set_model_version_tag(MODEL_NAME, "4", "test_cases", "e01,e03,e14")
    other = register_with(store, tiny_model, 0.99, "v6")
    assert other["decision"] == CHALLENGER
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == "4"
    card = client.get_model_version(MODEL_NAME, "6").description
    assert "champion v4 was tested on other patients (e01,e03,e14)" in card

    report = json.loads((store.root / "register-v3" / "register.json").read_text())
    assert report == better
    assert report["model_uri"] == f"models:/{MODEL_NAME}/3"
    run = client.get_run(report["source_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == store.parent_run_id
    assert run.data.metrics["test_dice"] == 0.95


@pytest.mark.slow
def test_register_failures_leave_no_run_running(
    tiny_model: Path, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    import liverseg.serving.model

    bad_link = tmp_path / "run.json"
    bad_link.write_text(json.dumps({"parent_run_id": "0" * 32, "tracking_uri": "elsewhere"}))
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"dice_mean": 0.5}))
    cfg = RegisterParams(model_name=MODEL_NAME)
    with pytest.raises(DataError, match="is not a run of the tracking store"):
        register(tiny_model, metrics, bad_link, tmp_path / "out", cfg, PostProcessing())

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(liverseg.serving.model, "log_pyfunc", broken)
    with pytest.raises(OSError, match="disk full"):
        register(tiny_model, metrics, store.run_json, tmp_path / "out", cfg, PostProcessing())
    assert not (tmp_path / "out").exists()
    client = MlflowClient(tracking_uri=store.uri)
    runs = client.search_runs(
        [client.get_run(store.parent_run_id).info.experiment_id],
        filter_string="tags.kind = 'register'",
    )
    assert runs and all(r.info.status in ("FINISHED", "FAILED") for r in runs)
    assert any(r.info.status == "FAILED" for r in runs)
