"""The internal case layout: how a case's CT and liver mask are named on disk.

Every data set ends as a flat folder of NIfTI pairs ``ircad_eNN_orig.nii.gz`` (CT, int16 HU)
+ ``ircad_eNN_liver.nii.gz`` (uint8 0/1 liver mask), one pair per case, written by
:mod:`liverseg.data.ircad` or :mod:`liverseg.data.phantom` and read by ``prepare``,
``evaluate`` and the tests. The case id is ``eNN``: the patient number zero-padded to two
digits (``ircad_e1_*`` and ``3Dircadb1.1`` both become ``e01``), so that ids sort and name files
the same way whatever the source. A synthetic data set may hold more than one scan of a
patient's anatomy: draw ``k >= 1`` is case ``eNN-k`` (``ircad_e02-1_orig.nii.gz``), and the
splits keep every case of a patient together (:func:`patient_of`). :func:`find_nifti_pairs`
also reads the notebook's archive (``ircad_eN_orig.nii[.gz]``, any padding, in sub-folders).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from liverseg.errors import DataError

__all__ = ["CasePaths", "case_id_for", "find_nifti_pairs", "output_paths", "patient_of"]

_NIFTI_NAME = re.compile(r"ircad_e(\d+)(?:-([1-9]\d*))?_(orig|liver)\.nii(\.gz)?")


def case_id_for(number: int, draw: int = 0) -> str:
    """Case id of patient ``number`` (zero-padded so that ids sort like the patients), or of
    a synthetic data set's draw ``draw >= 1`` of that patient's anatomy."""
    return f"e{number:02d}-{draw}" if draw else f"e{number:02d}"


def patient_of(case_id: str) -> str:
    """The patient whose anatomy case ``case_id`` shows: ``e02-1`` -> ``e02``."""
    return case_id.split("-")[0]


def output_paths(out_dir: Path, case_id: str) -> tuple[Path, Path]:
    """Where the internal format keeps the CT and the liver mask of ``case_id``."""
    out_dir = Path(out_dir)
    return out_dir / f"ircad_{case_id}_orig.nii.gz", out_dir / f"ircad_{case_id}_liver.nii.gz"


@dataclass(frozen=True)
class CasePaths:
    """One patient's CT and liver mask files (``case_id`` like ``"e01"``)."""

    case_id: str
    image: Path
    mask: Path


def find_nifti_pairs(root: Path) -> list[CasePaths]:
    """Pair every ``ircad_eN_orig`` with its ``ircad_eN_liver`` below ``root``, by patient.

    The notebook's archive splits patients into ``train/`` and ``test/``; the project makes its
    own patient-level split, so folders are ignored and only the names count. A file without
    its partner, or a patient present twice, is an error rather than a silently smaller or
    ambiguous data set. Pairs are sorted by patient number (``e2`` before ``e10``), then draw.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: IRCAD NIfTI root is not a folder")
    found: dict[tuple[int, int], dict[str, Path]] = {}
    for path in sorted(root.rglob("*")):
        match = _NIFTI_NAME.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        key, role = (int(match.group(1)), int(match.group(2) or 0)), match.group(3)
        slot = found.setdefault(key, {})
        if role in slot:
            raise DataError(
                f"{path}: duplicate case {case_id_for(*key)}: also found as {slot[role]}"
            )
        slot[role] = path
    if not found:
        raise DataError(
            f"{root}: no IRCAD NIfTI pairs found (expected files named "
            "ircad_eN_orig.nii[.gz] and ircad_eN_liver.nii[.gz])"
        )
    pairs: list[CasePaths] = []
    for key in sorted(found):
        slot = found[key]
        if "orig" not in slot:
            raise DataError(f"{slot['liver']}: liver mask has no partner CT (ircad_eN_orig)")
        if "liver" not in slot:
            raise DataError(f"{slot['orig']}: CT has no partner liver mask (ircad_eN_liver)")
        pairs.append(CasePaths(case_id_for(*key), slot["orig"], slot["liver"]))
    return pairs
