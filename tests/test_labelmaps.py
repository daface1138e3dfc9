"""IRCAD's per-structure DICOM masks packed into the bits of one label map, and read back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import tool_env
from dicomfake import write_series
from liverseg.data.labelmaps import convert_ircad_masks, find_labelmaps, load_labelmap
from liverseg.errors import DataError

SHAPE = (12, 10, 6)  # DICOM columns, rows, slices
SPACING = (0.8, 0.7, 2.5)  # mm along columns (i), rows (j), slices
ORIGIN = (-100.0, -80.0, 40.0)  # LPS of the first slice's first pixel


def structures() -> dict[str, np.ndarray]:
    """Overlapping structures as IRCAD stores them (0/255; bone 0/1, as a few IRCAD masks)."""
    s = {name: np.zeros(SHAPE, np.int64) for name in ("skin", "liver", "livertumor01", "bone")}
    ii, jj = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    s["skin"][((ii - 5.5) / 6) ** 2 + ((jj - 4.5) / 5) ** 2 <= 1] = 255
    s["liver"][1:7, 2:7, 1:5] = 255
    s["livertumor01"][2:4, 3:5, 2:4] = 255  # inside the liver
    s["bone"][8:10, 6:9, :] = 1
    s["portalvein"] = np.zeros(SHAPE, np.int64)
    s["portalvein"][5:9, 4, 1:5] = 255  # half inside the liver, half out
    return s


def write_masks_zip(case_dir: Path, masks: dict[str, np.ndarray], **geometry) -> Path:
    """``case_dir/MASKS_DICOM.zip`` holding ``MASKS_DICOM/<structure>/image_K``, as IRCAD's."""
    staging = case_dir.parent / f".{case_dir.name}-staging"
    for name, values in masks.items():
        kw = {"spacing": SPACING, "origin": ORIGIN, **geometry.get(name, {})}
        write_series(staging / "MASKS_DICOM" / name, values, bits=8, prefix="image", **kw)
    case_dir.mkdir(parents=True)
    shutil.make_archive(
        str(case_dir / "MASKS_DICOM"), "zip", root_dir=staging, base_dir="MASKS_DICOM"
    )
    shutil.rmtree(staging)
    return case_dir / "MASKS_DICOM.zip"


def test_every_structure_round_trips_through_the_bits(tmp_path: Path) -> None:
    masks = structures()
    zf = write_masks_zip(tmp_path / "3Dircadb1.7", masks)
    nii = convert_ircad_masks(zf, 7, tmp_path / "out")
    assert nii == tmp_path / "out" / "ircad_e07_labels.nii.gz"
    assert np.asarray(nib.load(nii).dataobj).dtype == np.uint32
    sidecar = json.loads((tmp_path / "out" / "ircad_e07_labels.json").read_text())
    assert sorted(sidecar["structures"]) == sorted(masks)

    lm = load_labelmap(nii)
    assert lm.case_id == "e07"
    assert sorted(lm.structures) == sorted(masks)
    assert lm.spacing == pytest.approx(SPACING)
    # Axial DICOM: columns run to the patient's left and rows posterior (LPS), so RAS order
    # reverses both; the first RAS voxel is the DICOM's last column of its last row.
    for name, values in masks.items():
        np.testing.assert_array_equal(lm.mask(name), (values != 0)[::-1, ::-1, :], err_msg=name)
    lps = np.array(ORIGIN) + [(SHAPE[0] - 1) * SPACING[0], (SHAPE[1] - 1) * SPACING[1], 0]
    np.testing.assert_allclose(lm.affine[:3, 3], [-lps[0], -lps[1], lps[2]], atol=1e-4)
    # overlaps are kept: the tumour is liver and tumour at once; a union is a union
    tumour = lm.mask("livertumor01")
    assert tumour.any() and (lm.mask("liver") & tumour).sum() == tumour.sum()
    np.testing.assert_array_equal(lm.mask("liver", "bone"), lm.mask("liver") | lm.mask("bone"))
    assert not lm.mask("spleen").any()  # absent names contribute nothing
    assert find_labelmaps(tmp_path / "out") == [nii]


def _expect_conversion_error(tmp_path: Path, masks: dict, match: str, **geometry) -> None:
    zf = write_masks_zip(tmp_path / "3Dircadb1.3", masks, **geometry)
    with pytest.raises(DataError, match=match) as info:
        convert_ircad_masks(zf, 3, tmp_path / "out")
    # the user's file is named, not a temporary folder that is gone when the error is read
    assert str(zf) in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_structure_on_another_grid(tmp_path: Path) -> None:
    # structures are read in name order: bone is the reference grid, skin comes last
    shifted = {"skin": {"origin": (ORIGIN[0] + 5.0, ORIGIN[1], ORIGIN[2])}}
    _expect_conversion_error(
        tmp_path,
        structures(),
        r"MASKS_DICOM\.zip/MASKS_DICOM/skin: not on the grid of bone",
        **shifted,
    )


def test_structure_with_fewer_slices(tmp_path: Path) -> None:
    masks = structures()
    masks["skin"] = masks["skin"][:, :, :4]
    _expect_conversion_error(tmp_path, masks, r"MASKS_DICOM/skin: not on the grid of bone")


def test_values_other_than_0_1_255(tmp_path: Path) -> None:
    masks = structures()
    masks["livertumor01"][0, 0, 0] = 7
    _expect_conversion_error(
        tmp_path, masks, r"MASKS_DICOM/livertumor01: structure mask has values other than"
    )


def test_no_liver(tmp_path: Path) -> None:
    masks = structures()
    del masks["liver"]
    _expect_conversion_error(tmp_path, masks, "has no liver structure")


def test_zip_without_masks_folder(tmp_path: Path) -> None:
    (tmp_path / "3Dircadb1.4").mkdir()
    zf = tmp_path / "3Dircadb1.4" / "MASKS_DICOM.zip"
    shutil.make_archive(str(zf.with_suffix("")), "zip", root_dir=tmp_path / "3Dircadb1.4")
    with pytest.raises(DataError, match=r"MASKS_DICOM\.zip: expected one MASKS_DICOM folder"):
        convert_ircad_masks(zf, 4, tmp_path / "out")


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    return convert_ircad_masks(
        write_masks_zip(tmp_path / "3Dircadb1.5", structures()), 5, tmp_path / "out"
    )


@pytest.mark.parametrize(
    ("sidecar", "match"),
    [
        (None, "unreadable label map sidecar"),
        ("{not json", "unreadable label map sidecar"),
        ('{"source": "x"}', "unreadable label map sidecar"),
        ('{"structures": 5}', "unreadable label map sidecar"),
        ('{"structures": "liverbone"}', "unreadable label map sidecar"),
        ('{"structures": ["liver", 3]}', "unreadable label map sidecar"),
    ],
)
def test_missing_or_broken_sidecar(packed: Path, sidecar: str | None, match: str) -> None:
    path = packed.with_name("ircad_e05_labels.json")
    if sidecar is None:
        path.unlink()
    else:
        path.write_text(sidecar)
    with pytest.raises(DataError, match=match) as info:
        load_labelmap(packed)
    assert str(path) in str(info.value)


def test_bits_beyond_the_named_structures(packed: Path) -> None:
    path = packed.with_name("ircad_e05_labels.json")
    names = json.loads(path.read_text())["structures"]
    path.write_text(json.dumps({"structures": names[:-1]}))  # the last bit loses its name
    with pytest.raises(DataError, match=f"{packed}: bits set beyond the {len(names) - 1} named"):
        load_labelmap(packed)
    path.write_text(json.dumps({"structures": names}))
    assert load_labelmap(packed).structures == tuple(names)


def test_labels_must_be_integers(packed: Path) -> None:
    img = nib.load(packed)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.float32), img.affine), packed)
    with pytest.raises(DataError, match=f"{packed}: label volume of type float32"):
        load_labelmap(packed)


def test_not_a_label_map_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a label map name"):
        load_labelmap(tmp_path / "patient7.nii.gz")
    with pytest.raises(DataError, match="no label maps"):
        find_labelmaps(tmp_path)


def test_module_entry_converts_a_download_folder(tmp_path: Path) -> None:
    root = tmp_path / "3Dircadb1"
    masks = structures()
    write_masks_zip(root / "3Dircadb1.12", masks)
    del masks["bone"]
    write_masks_zip(root / "3Dircadb1.2", masks)
    (root / "3Dircadb1.2" / "PATIENT_DICOM.zip").write_bytes(b"")  # the CT is not read
    out = tmp_path / "maps"
    subprocess.run(
        [sys.executable, "-m", "liverseg.data.labelmaps", str(root), str(out)],
        check=True,
        env=tool_env(),
        capture_output=True,
    )
    found = find_labelmaps(out)
    assert [p.name for p in found] == ["ircad_e02_labels.nii.gz", "ircad_e12_labels.nii.gz"]
    e02, e12 = (load_labelmap(p) for p in found)
    assert "bone" not in e02.structures and "bone" in e12.structures
    np.testing.assert_array_equal(e02.mask("liver"), e12.mask("liver"))
