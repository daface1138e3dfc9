"""`ingest` stage: the data set as NIfTI pairs under ``data/raw/<dataset>/``.

phantom: generated (seeded) from ``ingest.phantom``. ircad: downloaded (URL) or read (local
path) from ``ingest.ircad.source``, checked against ``ingest.ircad.sha256`` when set, unpacked
safely and converted from either IRCAD layout into the same pairs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from liverseg.data import ircad
from liverseg.data.download import fetch, safe_extract_zip
from liverseg.data.phantom import write_phantom
from liverseg.data.volumes import load_case
from liverseg.fsutil import atomic_dir
from liverseg.params import IngestParams, IrcadParams, load_section


def _ingest_ircad(p: IrcadParams, out: Path, cache: Path) -> list[str]:
    layout = "dicom" if p.format.startswith("dicom") else "nifti"
    if p.format.endswith("-dir"):
        return ircad.collect_cases(Path(p.source), layout, out)
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / "ircad-source.zip"
    digest = fetch(p.source, archive, p.sha256)
    print(f"ingest: {p.source}\n  SHA-256 {digest}")
    if not p.sha256:
        print("  (pin it: set ingest.ircad.sha256 in params.yaml to verify later downloads)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        unpacked = Path(tmp) / "unpacked"
        max_bytes = int(p.max_unpacked_gb * 1e9)
        safe_extract_zip(archive, unpacked, max_bytes=max_bytes)
        if layout == "dicom":
            # The official 3D-IRCADb-01 archive zips each series again inside each patient
            # folder (3Dircadb1.N/PATIENT_DICOM.zip, MASKS_DICOM.zip).
            for inner in sorted(unpacked.rglob("*_DICOM.zip")):
                safe_extract_zip(inner, inner.parent / "_tmp_unzip", max_bytes=max_bytes)
                # The inner zip holds the folder PATIENT_DICOM/ itself; lift it up one level.
                for child in (inner.parent / "_tmp_unzip").iterdir():
                    child.rename(inner.parent / child.name)
                (inner.parent / "_tmp_unzip").rmdir()
                inner.unlink()
        return ircad.collect_cases(unpacked, layout, out)


def ingest(params: IngestParams, out: Path, cache: Path) -> list[str]:
    """Write the chosen data set's NIfTI pairs into ``out`` (atomically); returns the case ids."""
    with atomic_dir(out) as tmp:
        if params.dataset == "phantom":
            cases = write_phantom(tmp, params.phantom)
        else:
            cases = _ingest_ircad(params.ircad, tmp, cache)
        # Every pair is validated on load (shape, affine, binary mask, NaN, empty liver) before
        # the folder replaces the old one.
        for c in ircad.find_nifti_pairs(tmp):
            load_case(c.image, c.mask, case_id=c.case_id)
    return cases


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder of NIfTI pairs")
    parser.add_argument(
        "--cache", type=Path, default=Path("data/downloads"), help="download cache (ircad)"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))


def main(args: argparse.Namespace) -> None:
    params: IngestParams = load_section("ingest", args.params)
    cases = ingest(params, args.out, args.cache)
    print(f"ingest: {len(cases)} cases ({params.dataset}) -> {args.out}")
