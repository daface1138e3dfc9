"""Anatomical label maps: many overlapping structure masks of one patient, packed into bits.

The 3D-IRCADb-01 distribution ships, per patient, one DICOM mask series per structure
(``MASKS_DICOM/<structure>/image_K``, 0/1 or 0/255 on the patient's CT grid). Structures
overlap (tumours and vessels lie inside the liver), so they cannot share one integer label
volume. :func:`convert_ircad_masks` packs them into the bits of one ``uint32`` volume, every
voxel's membership kept exactly (a format conversion, which IRCAD's licence allows to be
redistributed), and writes:

  ircad_eNN_labels.nii.gz   uint32, bit b set where structure b is present (RAS affine)
  ircad_eNN_labels.json     {"structures": [name of bit 0, name of bit 1, ...], "source": ...}

:func:`load_labelmap` reads them back as a :class:`LabelMap` in canonical RAS order (see
:mod:`liverseg.data.volumes`), and :meth:`LabelMap.mask` gives one structure's mask by name.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from liverseg.data.dicom import read_series_folder
from liverseg.data.layout import case_id_for
from liverseg.data.volumes import load_volume, nifti_image, save_nifti
from liverseg.errors import DataError
from liverseg.fsutil import write_json

__all__ = ["LabelMap", "convert_ircad_masks", "find_labelmaps", "load_labelmap"]

log = logging.getLogger(__name__)

_MAX_STRUCTURES = 32
_NAME = re.compile(r"ircad_e(\d+)_labels\.nii\.gz")


@dataclass(frozen=True)
class LabelMap:
    """One patient's packed structures: ``bits`` (x, y, z) uint32 in RAS order, ``spacing`` (mm)
    and ``affine`` of that RAS grid, ``structures[b]`` the name of bit ``b``."""

    case_id: str
    bits: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    structures: tuple[str, ...]

    def mask(self, *names: str) -> np.ndarray:
        """Boolean union of the named structures (absent names contribute nothing)."""
        word = sum(1 << b for b, s in enumerate(self.structures) if s in names)
        return (self.bits & np.uint32(word)) != 0


def labelmap_paths(folder: Path, case_id: str) -> tuple[Path, Path]:
    return folder / f"ircad_{case_id}_labels.nii.gz", folder / f"ircad_{case_id}_labels.json"


def find_labelmaps(folder: Path) -> list[Path]:
    """The packed label maps in ``folder``, sorted by patient number."""
    found = sorted(
        (int(m.group(1)), p)
        for p in Path(folder).glob("ircad_e*_labels.nii.gz")
        if (m := _NAME.fullmatch(p.name))
    )
    if not found:
        raise DataError(f"{folder}: no label maps (ircad_eNN_labels.nii.gz)")
    return [p for _, p in found]


def load_labelmap(path: Path) -> LabelMap:
    """Read a packed label map and its sidecar; a missing sidecar or a bit without a name is a
    DataError naming the file."""
    path = Path(path)
    match = _NAME.fullmatch(path.name)
    if match is None:
        raise DataError(f"{path}: not a label map name (ircad_eNN_labels.nii.gz)")
    sidecar = path.with_name(path.name.replace(".nii.gz", ".json"))
    try:
        names = json.loads(sidecar.read_text())["structures"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{sidecar}: unreadable label map sidecar ({exc})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(
            f"{sidecar}: unreadable label map sidecar (structures: not a list of names)"
        )
    structures = tuple(names)
    vol = load_volume(path, kind="labels")
    bits = vol.data.astype(np.uint32, copy=False)
    if int(bits.max()) >> len(structures):
        raise DataError(f"{path}: bits set beyond the {len(structures)} named in {sidecar.name}")
    return LabelMap(case_id_for(int(match.group(1))), bits, vol.spacing, vol.affine, structures)


def convert_ircad_masks(masks_zip: Path, number: int, out_dir: Path) -> Path:
    """Pack ``3Dircadb1.<number>/MASKS_DICOM.zip`` into ``out_dir``; returns the NIfTI path."""
    masks: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(masks_zip) as zf:
            zf.extractall(tmp)  # our own trusted copy of IRCAD's file, not a user upload
        roots = [p for p in Path(tmp).rglob("MASKS_DICOM") if p.is_dir()]
        if len(roots) != 1:
            raise DataError(f"{masks_zip}: expected one MASKS_DICOM folder, found {len(roots)}")
        try:
            for folder in sorted(p for p in roots[0].iterdir() if p.is_dir()):
                series = read_series_folder(folder)
                # IRCAD's masks are 0/255, a few 0/1, and one (3Dircadb1.11 artery) 0/255 with
                # one voxel of 1: every non-zero voxel belongs to the structure.
                if not np.isin(series.hu, (0, 1, 255)).all():
                    raise DataError(f"{folder}: structure mask has values other than 0, 1 and 255")
                if not masks:
                    affine, first = series.affine, folder.name
                elif series.hu.shape != masks[first].shape or not np.allclose(
                    series.affine, affine
                ):
                    raise DataError(f"{folder}: not on the grid of {first}")
                masks[folder.name] = series.hu != 0
            if not masks:
                raise DataError(f"{roots[0]}: no structure series")
            if len(masks) > _MAX_STRUCTURES:
                raise DataError(
                    f"{roots[0]}: {len(masks)} structures, at most {_MAX_STRUCTURES} fit"
                )
        except DataError as exc:  # name the user's zip, not a temporary folder gone by now
            raise DataError(str(exc).replace(tmp, str(masks_zip))) from None
    if "liver" not in masks:
        raise DataError(f"{masks_zip}: has no liver structure")
    bits = np.zeros(masks["liver"].shape, np.uint32)
    for b, m in enumerate(masks.values()):
        bits[m] |= np.uint32(1 << b)
    canon = nib.as_closest_canonical(nib.Nifti1Image(bits, affine))
    nii, sidecar = labelmap_paths(Path(out_dir), case_id_for(number))
    save_nifti(nifti_image(np.asanyarray(canon.dataobj), canon.affine), nii)
    write_json(
        sidecar,
        {"structures": list(masks), "source": f"3D-IRCADb-01, 3Dircadb1.{number}/MASKS_DICOM"},
    )
    log.info("%s: %d structures -> %s", masks_zip, len(masks), nii)
    return nii


def main(argv: list[str] | None = None) -> None:
    """``python -m liverseg.data.labelmaps ROOT OUT``: convert every ``ROOT/3Dircadb1.N/
    MASKS_DICOM.zip`` of the official download into packed label maps in ``OUT``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    for zf in sorted(args.root.glob("3Dircadb1.*/MASKS_DICOM.zip")):
        convert_ircad_masks(zf, int(zf.parent.name.rsplit(".", 1)[1]), args.out)


if __name__ == "__main__":
    main()
