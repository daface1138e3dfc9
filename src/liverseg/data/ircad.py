"""Turn every layout of the real 3D-IRCADb-01 data into the project's one internal format:
the NIfTI pairs of :mod:`liverseg.data.layout`, written by ``volumes.save_pair``.

Source layouts:

* ``nifti``: the notebook's archive, ``ircad_eN_orig.nii[.gz]`` / ``ircad_eN_liver.nii[.gz]``
  anywhere below a root (e.g. in ``train/`` and ``test/``), see
  :func:`~liverseg.data.layout.find_nifti_pairs`.
* ``dicom``: the official 3D-IRCADb-01 tree, ``3Dircadb1.N/PATIENT_DICOM/image_K`` (CT) and
  ``3Dircadb1.N/MASKS_DICOM/liver/image_K`` (liver mask, 0/255), see
  :func:`convert_dicom_tree`. The official download packs ``PATIENT_DICOM`` and
  ``MASKS_DICOM`` as inner zips: :func:`unpack_archive` unpacks them in place, within the one
  size budget of the whole download.

:func:`ingest_ircad` is the whole path from ``ingest.ircad`` (a URL or local archive, or an
unpacked folder) to the internal format.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from liverseg.data.dicom import read_series_folder
from liverseg.data.download import fetch, safe_extract_zip
from liverseg.data.layout import case_id_for, find_nifti_pairs, output_paths
from liverseg.data.volumes import binary_mask, check_pair, load_case, save_pair
from liverseg.errors import DataError
from liverseg.fsutil import atomic_dir

if TYPE_CHECKING:
    from liverseg.params import IrcadParams

__all__ = [
    "collect_cases",
    "convert_dicom_tree",
    "ingest_ircad",
    "unpack_archive",
]

log = logging.getLogger(__name__)

_CASE_DIR = re.compile(r"3Dircadb1\.(\d+)")
_CT_DIR = "PATIENT_DICOM"
_MASKS_DIR = "MASKS_DICOM"
_LIVER_DIR = "liver"
# The official archive zips each series again inside each patient folder
# (3Dircadb1.N/PATIENT_DICOM.zip, 3Dircadb1.N/MASKS_DICOM.zip).
_INNER_ZIPS = "*_DICOM.zip"


# --------------------------------------------------------------------------- DICOM tree
def _require_dir(path: Path) -> Path:
    if path.is_dir():
        return path
    packed = path.with_name(path.name + ".zip")
    if packed.is_file():
        raise DataError(f"{packed}: series is still zipped: unpack it to {path.name}/ first")
    raise DataError(f"{path}: expected DICOM series folder is missing")


def convert_dicom_tree(root: Path, out_dir: Path) -> list[str]:
    """Convert every ``3Dircadb1.N`` patient below ``root`` to a NIfTI pair in ``out_dir``.

    The CT and the liver mask must share one grid (shape and affine): a mask on another grid
    would silently label the wrong voxels. An empty liver mask is refused as well, since every
    IRCAD patient has a liver and an empty one means a wrong folder. Returns the case ids
    (``eNN``) sorted.
    """
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise DataError(f"{root}: IRCAD DICOM root is not a folder")
    matched = sorted(
        p for p in root.rglob("3Dircadb1.*") if p.is_dir() and _CASE_DIR.fullmatch(p.name)
    )
    # An archive unpacked into a folder of its own name gives 3Dircadb1.1/3Dircadb1.1/...:
    # the outer folder is only a wrapper.
    leaves = [p for p in matched if not any(q != p and q.is_relative_to(p) for q in matched)]
    cases: dict[int, Path] = {}
    for folder in leaves:
        number = int(folder.name.rsplit(".", 1)[1])  # 3Dircadb1.N, as _CASE_DIR matched
        if number in cases:
            raise DataError(
                f"{folder}: duplicate case {case_id_for(number)}: also found as {cases[number]}"
            )
        cases[number] = folder
    if not cases:
        raise DataError(f"{root}: no 3Dircadb1.N patient folders found")
    out_dir.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    for number, folder in sorted(cases.items()):
        ct_dir = _require_dir(folder / _CT_DIR)
        mask_dir = _require_dir(_require_dir(folder / _MASKS_DIR) / _LIVER_DIR)
        ct = read_series_folder(ct_dir)
        mask_series = read_series_folder(mask_dir)
        check_pair(ct.hu, ct.affine, mask_series.hu, mask_series.affine, ct_dir, mask_dir)
        # IRCAD stores 0/255 (some writers 0/1). Rescaled values come first; a mask written
        # with a CT-like RescaleIntercept still has 0/255 stored.
        try:
            mask = binary_mask(mask_series.hu, str(mask_dir))
        except DataError:
            mask = binary_mask(mask_series.stored, str(mask_dir))
        if not mask.any():
            raise DataError(f"{mask_dir}: empty liver mask (no voxel is liver)")
        case_id = case_id_for(number)
        image_path, mask_path = output_paths(out_dir, case_id)
        save_pair(ct.hu, mask, ct.affine, image_path, mask_path)
        ids.append(case_id)
    return ids


# ------------------------------------------------------------------------------ dispatcher
def collect_cases(root: Path, layout: str, out_dir: Path) -> list[str]:
    """Bring the IRCAD data below ``root`` into the internal format in ``out_dir``.

    ``layout`` is ``"nifti"`` or ``"dicom"``. NIfTI pairs are loaded and validated with
    :func:`~liverseg.data.volumes.load_case` (shape/affine match, binary non-empty mask) and
    rewritten with ``save_pair`` rather than copied, so that every source ends as int16 CT +
    0/1 uint8 mask with one affine, whatever dtype, scaling or 0/255 coding it came with.
    Returns the case ids sorted.
    """
    root, out_dir = Path(root), Path(out_dir)
    if layout == "dicom":
        return convert_dicom_tree(root, out_dir)
    if layout != "nifti":
        raise ValueError(f"layout must be 'nifti' or 'dicom', not {layout!r}")
    pairs = find_nifti_pairs(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        case = load_case(pair.image, pair.mask, case_id=pair.case_id)
        image_path, mask_path = output_paths(out_dir, pair.case_id)
        save_pair(case.image.data, case.mask.data, case.image.affine, image_path, mask_path)
    return [pair.case_id for pair in pairs]


# ------------------------------------------------------------------------------ download
def unpack_archive(archive: Path, target: Path, *, max_bytes: int, inner_zips: bool) -> None:
    """Unpack ``archive`` into ``target`` with :func:`~liverseg.data.download.safe_extract_zip`,
    then, with ``inner_zips``, every ``*_DICOM.zip`` it holds in place (a zip's folder
    ``PATIENT_DICOM/`` lands beside the zip, which is removed). An ``archive`` that is a folder
    (the official archive unpacked once by hand) is copied instead, and left as it was.

    One budget for the whole archive: ``max_bytes`` bounds the bytes unpacked in total, the
    outer archive's entries (the inner zips among them) plus every inner zip's entries; the
    error names the zip whose entry crossed it, as ``<archive>: <path of the inner zip in it>``.
    ``target`` is replaced only once everything is unpacked; a refusal leaves it as it was.
    """
    with atomic_dir(target) as tree:
        if archive.is_dir():
            shutil.copytree(archive, tree, dirs_exist_ok=True)
            used = 0
        else:
            files = safe_extract_zip(archive, tree, max_bytes=max_bytes)
            used = sum(p.stat().st_size for p in files)
        for inner in sorted(tree.rglob(_INNER_ZIPS)) if inner_zips else ():
            where = f"{archive}: {inner.relative_to(tree).as_posix()}"
            staging = inner.with_name(inner.name + ".unpacked")
            try:
                files = safe_extract_zip(inner, staging, max_bytes=max_bytes, unpacked_before=used)
            except DataError as exc:
                raise DataError(str(exc).replace(str(inner), where, 1)) from exc
            used += sum(p.stat().st_size for p in files)
            for child in sorted(staging.iterdir()):
                if (inner.parent / child.name).exists():
                    raise DataError(f"{where}: {child.name} is both inside this zip and beside it")
                child.rename(inner.parent / child.name)
            staging.rmdir()
            inner.unlink()


def ingest_ircad(params: IrcadParams, out_dir: Path, cache: Path) -> list[str]:
    """The IRCAD data of ``params`` (``ingest.ircad``) in the internal format in ``out_dir``.

    A ``*-dir`` format is read in place. ``dicom-zip`` also takes a local folder holding the
    official archive's ``3Dircadb1.N/`` folders with their inner zips (the archive unpacked once
    by hand). Otherwise ``params.source`` (URL or local archive) is fetched into ``cache`` as
    ``ircad-source.zip`` and checked against ``params.sha256`` when set. Either is unpacked
    into a temporary folder in ``cache`` within ``params.max_unpacked_gb`` (inner
    ``*_DICOM.zip`` included, see :func:`unpack_archive`) and converted. Logs the archive's
    SHA-256, so that a first download can be pinned. Returns the case ids sorted.
    """
    layout = "dicom" if params.format.startswith("dicom") else "nifti"
    if params.format.endswith("-dir"):
        return collect_cases(Path(params.source), layout, out_dir)
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    max_bytes = int(params.max_unpacked_gb * 1e9)
    archive = Path(params.source)
    if layout == "dicom" and archive.is_dir():
        if params.sha256:
            raise DataError(f"{params.source}: ingest.ircad.sha256 checks an archive, not a folder")
    else:
        archive = cache / "ircad-source.zip"
        digest = fetch(params.source, archive, params.sha256)
        pin = "" if params.sha256 else " (pin it: set ingest.ircad.sha256 in params.yaml)"
        log.info("ingest: %s\n  SHA-256 %s%s", params.source, digest, pin)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        unpacked = Path(tmp) / "unpacked"
        unpack_archive(archive, unpacked, max_bytes=max_bytes, inner_zips=layout == "dicom")
        return collect_cases(unpacked, layout, out_dir)
