"""NIfTI I/O: reorientation round trips and every bad input named with its file."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverseg.data.volumes import (
    MAX_VOXELS_ENV,
    TooLargeError,
    from_canonical,
    load_case,
    load_volume,
    nifti_from_bytes,
    save_mask_like,
    save_pair,
)
from liverseg.errors import DataError


def affine_for(codes: str, spacing=(0.7, 0.8, 2.5)) -> np.ndarray:
    """An affine whose voxel axes point along ``codes`` (e.g. "LAS") with the given spacing."""
    a = np.eye(4)
    for i, c in enumerate(codes):
        sign = -1.0 if c in "LPI" else 1.0
        a[i, i] = sign * spacing[i]
    a[:3, 3] = [10.0, -20.0, 30.0]
    return a


def write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.mark.parametrize("codes", ["RAS", "LAS", "LPS", "LPI"])
def test_loaded_arrays_are_ras_and_world_coordinates_agree(tmp_path: Path, codes: str) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, size=(6, 5, 4)).astype(np.int16)
    aff = affine_for(codes)
    vol = load_volume(write(tmp_path / "ct.nii.gz", data, aff))
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    # Each RAS voxel maps to the same world point as the stored voxel it came from.
    ijk_ras = np.array([1, 2, 3, 1])
    world = vol.affine @ ijk_ras
    ijk_src = np.rint(np.linalg.inv(aff) @ world).astype(int)[:3]
    assert vol.data[1, 2, 3] == data[tuple(ijk_src)]
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.5))


@pytest.mark.parametrize("codes", ["LAS", "LPS", "RAS"])
def test_mask_round_trip_to_input_grid(tmp_path: Path, codes: str) -> None:
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    aff = affine_for(codes)
    src = write(tmp_path / "ct.nii.gz", data, aff)
    vol = load_volume(src)
    mask_ras = (vol.data > 60).astype(np.uint8)
    out = save_mask_like(mask_ras, vol, tmp_path / "mask.nii.gz")
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, aff)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), (data > 60).astype(np.uint8))
    np.testing.assert_array_equal(from_canonical(vol.data, vol), data)


def test_save_pair_and_load_case(tmp_path: Path) -> None:
    hu = np.full((8, 8, 4), -50.0)
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[2:5, 2:5, 1:3] = 1
    save_pair(hu, mask, affine_for("RAS"), tmp_path / "a_orig.nii.gz", tmp_path / "a_liver.nii.gz")
    case = load_case(tmp_path / "a_orig.nii.gz", tmp_path / "a_liver.nii.gz", case_id="a")
    assert case.image.data.dtype == np.float32
    assert case.mask.data.dtype == np.uint8
    assert int(case.mask.data.sum()) == 18


def test_mask_0_255_is_mapped(tmp_path: Path) -> None:
    m = np.zeros((4, 4, 3), np.uint8)
    m[1, 1, 1] = 255
    vol = load_volume(write(tmp_path / "m.nii.gz", m, np.eye(4)), kind="mask")
    assert set(np.unique(vol.data).tolist()) == {0, 1}


# ---------------------------------------------------------------------------- bad inputs
def test_corrupt_gzip_names_file(tmp_path: Path) -> None:
    good = write(tmp_path / "ok.nii.gz", np.zeros((4, 4, 4), np.int16), np.eye(4))
    raw = good.read_bytes()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"bad\.nii\.gz.*(corrupt|unreadable)"):
        load_volume(bad)


def test_garbage_gzip_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "junk.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti at all" * 10))
    with pytest.raises(DataError, match=r"junk\.nii\.gz"):
        load_volume(bad)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.nii\.gz: file not found"):
        load_volume(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 4, 2)])
def test_wrong_dimensionality(tmp_path: Path, shape: tuple[int, ...]) -> None:
    p = write(tmp_path / "d.nii.gz", np.zeros(shape, np.int16), np.eye(4))
    with pytest.raises(DataError, match=r"d\.nii\.gz: expected a 3-D volume"):
        load_volume(p)


def test_4d_with_single_frame_is_accepted(tmp_path: Path) -> None:
    p = write(tmp_path / "d.nii.gz", np.zeros((4, 4, 4, 1), np.int16), np.eye(4))
    assert load_volume(p).data.shape == (4, 4, 4)


def test_nan_in_ct(tmp_path: Path) -> None:
    d = np.zeros((4, 4, 4), np.float32)
    d[1, 2, 3] = np.nan
    d[0, 0, 0] = np.inf
    p = write(tmp_path / "nan.nii.gz", d, np.eye(4))
    with pytest.raises(DataError, match=r"nan\.nii\.gz: 2 NaN or inf voxels"):
        load_volume(p)


def test_non_binary_mask(tmp_path: Path) -> None:
    m = np.zeros((4, 4, 4), np.uint8)
    m[0, 0, 0] = 2
    p = write(tmp_path / "m.nii.gz", m, np.eye(4))
    with pytest.raises(DataError, match=r"m\.nii\.gz: mask is not binary: values \{0, 2\}"):
        load_volume(p, kind="mask")


def _pair(tmp_path: Path, img_shape, mask_shape, mask_aff=None, mask_value=1):
    ct = write(tmp_path / "x_orig.nii.gz", np.zeros(img_shape, np.int16), np.eye(4))
    m = np.zeros(mask_shape, np.uint8)
    m.flat[0] = mask_value
    mk = write(tmp_path / "x_liver.nii.gz", m, np.eye(4) if mask_aff is None else mask_aff)
    return ct, mk


def test_shape_mismatch(tmp_path: Path) -> None:
    ct, mk = _pair(tmp_path, (4, 4, 4), (4, 4, 5))
    with pytest.raises(DataError, match=r"x_liver\.nii\.gz: mask shape .* does not match CT"):
        load_case(ct, mk, case_id="x")


def test_affine_mismatch(tmp_path: Path) -> None:
    ct, mk = _pair(tmp_path, (4, 4, 4), (4, 4, 4), mask_aff=np.diag([2.0, 1, 1, 1]))
    with pytest.raises(DataError, match=r"x_liver\.nii\.gz: mask affine differs"):
        load_case(ct, mk, case_id="x")


def test_empty_liver(tmp_path: Path) -> None:
    ct, mk = _pair(tmp_path, (4, 4, 4), (4, 4, 4), mask_value=0)
    with pytest.raises(DataError, match=r"x_liver\.nii\.gz: empty liver mask"):
        load_case(ct, mk, case_id="x")


# ---------------------------------------------------------------------- NIfTI from bytes
MB = 1024 * 1024


def image_bytes(data: np.ndarray, *, gz: bool = True, version: int = 1) -> bytes:
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    raw = cls(data, affine_for("LPS")).to_bytes()
    return gzip.compress(raw) if gz else raw


@pytest.mark.parametrize(("gz", "version"), [(True, 1), (False, 1), (True, 2), (False, 2)])
def test_nifti_from_bytes_round_trip(gz: bool, version: int) -> None:
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4) - 60
    img = nifti_from_bytes(image_bytes(data, gz=gz, version=version), MB, "upload")
    assert isinstance(img, nib.Nifti1Image if version == 1 else nib.Nifti2Image)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine_for("LPS"))


def _pair_header() -> bytes:
    img = nib.Nifti1Pair(np.zeros((4, 4, 4), np.int16), np.eye(4))
    return img.header.binaryblock + bytes(4 * 4 * 4 * 2)


def _bad_magic() -> bytes:
    raw = bytearray(image_bytes(np.zeros((2, 2, 2), np.int16), gz=False))
    raw[344:348] = b"xyz\x00"
    return bytes(raw)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"hello world" * 40, r"^upload: not a NIfTI file \(header size field \d+, expected 348"),
        (b"tiny", r"^upload: not a NIfTI file \(4 bytes, shorter than a NIfTI header\)"),
        (b"\x1f\x8b" + b"garbage" * 10, r"^upload: corrupt gzip data"),
        (gzip.compress(b"x" * 1000)[:-12], r"^upload: truncated gzip data"),
        (image_bytes(np.zeros((8, 8, 4), np.int16), gz=False)[:-100], r"^upload: truncated NIfTI"),
        (_pair_header(), r"^upload: a NIfTI \.hdr/\.img pair header"),
        (_bad_magic(), r"^upload: not a NIfTI-1 file \(bad magic b'xyz\\x00'\)"),
    ],
)
def test_nifti_from_bytes_refuses(data: bytes, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        nifti_from_bytes(data, MB, "upload")
    assert not isinstance(info.value, TooLargeError)


@pytest.mark.parametrize(
    ("shape", "what", "n_bytes"),
    [
        # 64 x 64 x 64 int16 = 512 kB as a file (fits), 1 MB as float32: over a 0.9 MB limit
        ((64, 64, 64), "the volume (64, 64, 64) as float32", 64**3 * 4),
        # 96 x 96 x 64 int16 = 1.1 MB after gunzip: over the limit before the header is read
        ((96, 96, 64), "the NIfTI file after gunzip", int(0.9 * MB) + 1),
    ],
)
def test_nifti_from_bytes_size_limit(shape: tuple[int, ...], what: str, n_bytes: int) -> None:
    limit = int(0.9 * MB)
    zeros = image_bytes(np.zeros(shape, np.int16))
    assert len(zeros) < 20_000  # a few kB of gzip: the limit is on what it unpacks to
    with pytest.raises(TooLargeError, match=rf"^upload: {re.escape(what)} is") as info:
        nifti_from_bytes(zeros, limit, "upload")
    assert (info.value.what, info.value.n_bytes, info.value.limit) == (what, n_bytes, limit)


def test_nifti_from_bytes_voxel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    img.header.set_data_shape((300, 300, 300))
    monkeypatch.setenv(MAX_VOXELS_ENV, str(200**3))
    with pytest.raises(DataError, match=r"^upload: header claims shape \(300, 300, 300\)"):
        nifti_from_bytes(gzip.compress(img.header.binaryblock + b"\0" * 68), 1 << 30, "upload")
