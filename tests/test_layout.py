"""Tests of liverseg.data.layout: the case naming and the pairing of NIfTI files by patient."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverseg.data.layout import (
    CasePaths,
    case_id_for,
    find_nifti_pairs,
    output_paths,
    patient_of,
)
from liverseg.data.volumes import save_pair
from liverseg.errors import DataError


@pytest.mark.parametrize(
    ("number", "case_id"), [(1, "e01"), (9, "e09"), (10, "e10"), (123, "e123")]
)
def test_case_id_and_output_paths(tmp_path: Path, number: int, case_id: str) -> None:
    assert case_id_for(number) == case_id
    assert output_paths(tmp_path, case_id) == (
        tmp_path / f"ircad_{case_id}_orig.nii.gz",
        tmp_path / f"ircad_{case_id}_liver.nii.gz",
    )


def test_output_paths_are_found_again(tmp_path: Path) -> None:
    for number in (10, 2):
        nifti_pair(tmp_path, f"{number:02d}")
    assert find_nifti_pairs(tmp_path) == [
        CasePaths(case_id_for(n), *output_paths(tmp_path, case_id_for(n))) for n in (2, 10)
    ]


def test_synthetic_draws_are_cases_of_their_patient(tmp_path: Path) -> None:
    """A synthetic data set's draw k of patient NN: case ``eNN-k``, sorted after ``eNN``."""
    assert case_id_for(2, 1) == "e02-1" and patient_of("e02-1") == patient_of("e02") == "e02"
    for case in ("10", "02-1", "02", "02-12"):
        nifti_pair(tmp_path, case)
    assert [p.case_id for p in find_nifti_pairs(tmp_path)] == ["e02", "e02-1", "e02-12", "e10"]
    assert find_nifti_pairs(tmp_path)[1] == CasePaths("e02-1", *output_paths(tmp_path, "e02-1"))


# ---------------------------------------------------------------------------- NIfTI pairs
def nifti_pair(folder: Path, number: str, *, suffix: str = ".nii.gz", liver: int = 1) -> None:
    """A 4x4x3 CT/mask pair named like the notebook's archive (``number`` as in the name)."""
    folder.mkdir(parents=True, exist_ok=True)
    ct = np.arange(48, dtype=np.float64).reshape(4, 4, 3) - 20.0
    mask = np.zeros((4, 4, 3), dtype=np.uint8)
    mask[1:3, 1:3, 1] = 1
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    save_pair(
        ct,
        mask,
        affine,
        folder / f"ircad_e{number}_orig{suffix}",
        folder / f"ircad_e{number}_liver{suffix}",
    )
    if liver != 1:  # rewrite the mask with another liver value (e.g. 0/255)
        img = nib.Nifti1Image(mask * np.uint8(liver), affine)
        nib.save(img, folder / f"ircad_e{number}_liver{suffix}")


def test_find_pairs_nested_and_sorted(tmp_path: Path) -> None:
    nifti_pair(tmp_path / "ds" / "train", "10")
    nifti_pair(tmp_path / "ds" / "train", "2")
    nifti_pair(tmp_path / "ds" / "test", "1", suffix=".nii")
    (tmp_path / "ds" / "train" / "._ircad_e3_orig.nii.gz").write_bytes(b"mac litter")
    (tmp_path / "ds" / "notes.txt").write_text("not a volume")
    pairs = find_nifti_pairs(tmp_path / "ds")
    assert [p.case_id for p in pairs] == ["e01", "e02", "e10"]
    assert pairs[0] == CasePaths(
        "e01",
        tmp_path / "ds" / "test" / "ircad_e1_orig.nii",
        tmp_path / "ds" / "test" / "ircad_e1_liver.nii",
    )
    assert pairs[2].image == tmp_path / "ds" / "train" / "ircad_e10_orig.nii.gz"
    assert pairs[2].mask == tmp_path / "ds" / "train" / "ircad_e10_liver.nii.gz"


@pytest.mark.parametrize(
    ("orphan", "match"),
    [
        ("ircad_e4_orig.nii.gz", "ircad_e4_orig.nii.gz: CT has no partner"),
        ("ircad_e4_liver.nii", "ircad_e4_liver.nii: liver mask has no partner"),
    ],
)
def test_find_pairs_missing_partner(tmp_path: Path, orphan: str, match: str) -> None:
    nifti_pair(tmp_path / "train", "1")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / orphan).write_bytes(b"x")
    with pytest.raises(DataError, match=match):
        find_nifti_pairs(tmp_path)


@pytest.mark.parametrize("second_name", ["3", "03"])
def test_find_pairs_duplicate(tmp_path: Path, second_name: str) -> None:
    nifti_pair(tmp_path / "test", "3")
    nifti_pair(tmp_path / "train", second_name)
    with pytest.raises(
        DataError, match=r"duplicate case e03.*test/ircad_e3_liver\.nii\.gz"
    ) as info:
        find_nifti_pairs(tmp_path)
    assert f"train/ircad_e{second_name}_liver.nii.gz" in str(info.value)


def test_find_pairs_none(tmp_path: Path) -> None:
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "liver_1.nii.gz").write_bytes(b"x")
    with pytest.raises(DataError, match="data: no IRCAD NIfTI pairs found"):
        find_nifti_pairs(tmp_path / "data")
