"""IRCAD's official archive end to end: a nested archive (``3Dircadb1.N/PATIENT_DICOM.zip``,
``3Dircadb1.N/MASKS_DICOM.zip`` inside the download) served over HTTP on 127.0.0.1, ingested
into NIfTI pairs, and the one unpacking budget shared by the outer archive and its inner zips."""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dicomfake import phantom_ijk, write_series
from liverseg.data.ircad import unpack_archive
from liverseg.data.layout import find_nifti_pairs
from liverseg.errors import DataError
from liverseg.params import IngestParams, IrcadParams
from liverseg.stages.ingest import ingest
from test_download import Server, server  # noqa: F401  (the HTTP server fixture)

SHAPE = (20, 16, 6)  # columns, rows, slices


def zip_folder(folder: Path, base: Path) -> bytes:
    """The files below ``folder`` zipped with names relative to ``base`` (as the archive has)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(base).as_posix())
    return buf.getvalue()


def zip_entries(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def official_archive(work: Path, patients: dict[int, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """The official layout: ``3Dircadb1/3Dircadb1.N/{PATIENT,MASKS}_DICOM.zip`` per patient,
    each inner zip holding its folder (``PATIENT_DICOM/...``, ``MASKS_DICOM/liver/...``)."""
    entries: dict[str, bytes] = {"3Dircadb1/README.txt": b"test archive\n"}
    for number, (hu, liver) in patients.items():
        case = work / f"3Dircadb1.{number}"
        write_series(case / "PATIENT_DICOM", hu)
        write_series(case / "MASKS_DICOM" / "liver", liver * 255.0, prefix="image")
        for series in ("PATIENT_DICOM", "MASKS_DICOM"):
            inner = zip_folder(case / series, case)
            entries[f"3Dircadb1/3Dircadb1.{number}/{series}.zip"] = inner
    return zip_entries(entries)


def liver_block(seed: int) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[2 + seed % 5 : 12, 3:10, 1:5] = 1  # differs between patients
    return mask


def test_official_nested_archive_is_ingested(server: Server, tmp_path: Path) -> None:  # noqa: F811
    patients = {n: (phantom_ijk(SHAPE, seed=n), liver_block(n)) for n in (12, 3)}
    body = official_archive(tmp_path / "src", patients)
    url = server.add("/3Dircadb1.zip", body)
    params = IngestParams(
        dataset="ircad",
        ircad=IrcadParams(source=url, sha256=hashlib.sha256(body).hexdigest(), format="dicom-zip"),
    )
    out, cache = tmp_path / "data" / "raw" / "ircad", tmp_path / "cache"
    assert ingest(params, out, cache, tmp_path / "labelmaps") == ["e03", "e12"]  # unused
    pairs = find_nifti_pairs(out)
    assert [(p.case_id, p.image.name, p.mask.name) for p in pairs] == [
        ("e03", "ircad_e03_orig.nii.gz", "ircad_e03_liver.nii.gz"),
        ("e12", "ircad_e12_orig.nii.gz", "ircad_e12_liver.nii.gz"),
    ]
    for pair, number in zip(pairs, (3, 12), strict=True):
        hu, liver = patients[number]
        # the files keep the DICOM [column, row, slice] array, slices in position order
        ct = nib.load(pair.image)
        np.testing.assert_array_equal(np.asarray(ct.dataobj), hu.astype(np.int16))
        np.testing.assert_array_equal(np.asarray(nib.load(pair.mask).dataobj), liver)
        np.testing.assert_allclose(nib.load(pair.mask).affine, ct.affine)
        # 0.8 mm pixels, 2.5 mm slices; DICOM's LPS x and y become RAS -x and -y
        np.testing.assert_allclose(np.diag(ct.affine)[:3], [-0.8, -0.8, 2.5])
    # the download stays in the cache for the next run; the unpacked tree does not
    assert sorted(p.name for p in cache.iterdir()) == ["ircad-source.zip"]


def test_official_folder_with_inner_zips_is_ingested(tmp_path: Path) -> None:
    """``dicom-zip`` with a folder: ``3Dircadb1.N/`` holding PATIENT_DICOM.zip and
    MASKS_DICOM.zip (the download unpacked once by hand), the folder left as it was."""
    hu, liver = phantom_ijk(SHAPE, seed=1), liver_block(1)
    with zipfile.ZipFile(io.BytesIO(official_archive(tmp_path / "work", {1: (hu, liver)}))) as zf:
        zf.extractall(tmp_path / "src")
    source = tmp_path / "src" / "3Dircadb1"
    before = sorted(p.relative_to(source).as_posix() for p in source.rglob("*"))
    assert "3Dircadb1.1/PATIENT_DICOM.zip" in before
    params = IngestParams(
        dataset="ircad", ircad=IrcadParams(source=str(source), format="dicom-zip")
    )
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert ingest(params, out, cache, tmp_path / "labelmaps") == ["e01"]
    (pair,) = find_nifti_pairs(out)
    np.testing.assert_array_equal(np.asarray(nib.load(pair.image).dataobj), hu.astype(np.int16))
    np.testing.assert_array_equal(np.asarray(nib.load(pair.mask).dataobj), liver)
    assert sorted(p.relative_to(source).as_posix() for p in source.rglob("*")) == before
    assert list(cache.iterdir()) == []
    pinned = IrcadParams(source=str(source), format="dicom-zip", sha256="0" * 64)
    with pytest.raises(DataError, match="3Dircadb1: ingest.ircad.sha256 checks an archive"):
        ingest(IngestParams(dataset="ircad", ircad=pinned), out, cache, tmp_path / "labelmaps")


# The inner zips' contents (bytes): MASKS_DICOM.zip sorts before PATIENT_DICOM.zip.
MASK_BYTES, CT_BYTES = 300, 500


@pytest.fixture
def nested(tmp_path: Path) -> tuple[Path, int]:
    """A nested archive of one patient, and what its outer archive alone unpacks to."""
    inner = {
        "MASKS_DICOM": zip_entries({"MASKS_DICOM/liver/image_0": b"m" * MASK_BYTES}),
        "PATIENT_DICOM": zip_entries({"PATIENT_DICOM/image_0": b"c" * CT_BYTES}),
    }
    outer = {f"3Dircadb1.1/{name}.zip": data for name, data in inner.items()}
    archive = tmp_path / "ircad.zip"
    archive.write_bytes(zip_entries(outer))
    return archive, sum(len(d) for d in inner.values())


@pytest.mark.parametrize(
    ("extra", "fails_in"),
    [
        (MASK_BYTES + CT_BYTES, None),  # exactly the budget
        (MASK_BYTES + CT_BYTES - 1, "PATIENT_DICOM.zip"),
        (MASK_BYTES - 1, "MASKS_DICOM.zip"),
    ],
)
def test_inner_zips_share_one_budget(
    tmp_path: Path, nested: tuple[Path, int], extra: int, fails_in: str | None
) -> None:
    archive, outer_bytes = nested
    target = tmp_path / "unpacked"
    max_bytes = outer_bytes + extra
    if fails_in is None:
        unpack_archive(archive, target, max_bytes=max_bytes, inner_zips=True)
        assert sorted(
            p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()
        ) == [
            "3Dircadb1.1/MASKS_DICOM/liver/image_0",
            "3Dircadb1.1/PATIENT_DICOM/image_0",
        ]
        return
    # Each zip alone fits (the old rule gave each inner zip the whole budget): only the total
    # crosses it, in the zip named.
    total = outer_bytes + MASK_BYTES + (CT_BYTES if fails_in == "PATIENT_DICOM.zip" else 0)
    with pytest.raises(
        DataError,
        match=rf"^{re.escape(str(archive))}: 3Dircadb1\.1/{re.escape(fails_in)}: entry .*"
        rf"total uncompressed size {total} "
        rf"bytes \(\d+ of them from earlier archives\) exceeds max_bytes={max_bytes}",
    ):
        unpack_archive(archive, target, max_bytes=max_bytes, inner_zips=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ircad.zip"]  # nothing half-written


def test_budget_refusal_leaves_no_output(tmp_path: Path, nested: tuple[Path, int]) -> None:
    archive, outer_bytes = nested
    # a budget of a few bytes over the outer archive: the inner zips cross it
    params = IngestParams(
        dataset="ircad",
        ircad=IrcadParams(
            source=str(archive), format="dicom-zip", max_unpacked_gb=(outer_bytes + 10) / 1e9
        ),
    )
    out, cache = tmp_path / "raw", tmp_path / "cache"
    with pytest.raises(
        DataError,
        match=r"cache/ircad-source\.zip: 3Dircadb1\.1/MASKS_DICOM\.zip: entry .* exceeds max_bytes",
    ):
        ingest(params, out, cache, tmp_path / "labelmaps")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ircad.zip"]
    assert sorted(p.name for p in cache.iterdir()) == ["ircad-source.zip"]


def test_inner_zip_beside_its_own_folder_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "ircad.zip"
    inner = zip_entries({"PATIENT_DICOM/image_0": b"new"})
    archive.write_bytes(
        zip_entries(
            {"3Dircadb1.2/PATIENT_DICOM.zip": inner, "3Dircadb1.2/PATIENT_DICOM/image_0": b"old"}
        )
    )
    with pytest.raises(
        DataError,
        match=r"ircad\.zip: 3Dircadb1\.2/PATIENT_DICOM\.zip: PATIENT_DICOM is both inside this "
        "zip and beside it",
    ):
        unpack_archive(archive, tmp_path / "unpacked", max_bytes=10_000, inner_zips=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ircad.zip"]  # nothing half-written
