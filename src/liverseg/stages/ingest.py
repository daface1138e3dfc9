"""`ingest` stage: the data set as NIfTI pairs under ``data/raw/<dataset>/``.

synth: synthetic CT from the label maps in ``--labelmaps`` (seeded, ``ingest.synth``).
phantom: generated (seeded) from ``ingest.phantom``. ircad: downloaded (URL) or read (local
path) from ``ingest.ircad.source``, checked against ``ingest.ircad.sha256`` when set, unpacked
safely and converted from either IRCAD layout into the same pairs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from liverseg import stop
from liverseg.data.ircad import ingest_ircad
from liverseg.data.layout import find_nifti_pairs
from liverseg.data.phantom import write_phantom
from liverseg.data.synth import write_synth
from liverseg.data.volumes import load_case
from liverseg.fsutil import atomic_dir
from liverseg.params import IngestParams, load_section


def ingest(params: IngestParams, out: Path, cache: Path, labelmaps: Path) -> list[str]:
    """Write the chosen data set's NIfTI pairs into ``out`` (atomically); returns the case ids."""
    with atomic_dir(out) as tmp:
        if params.dataset == "synth":
            cases = write_synth(tmp, params.synth, labelmaps)
        elif params.dataset == "phantom":
            cases = write_phantom(tmp, params.phantom)
        else:
            cases = ingest_ircad(params.ircad, tmp, cache)
        # Every pair is validated on load (shape, affine, binary mask, NaN, empty liver) before
        # the folder replaces the old one.
        for c in find_nifti_pairs(tmp):
            stop.check()
            load_case(c.image, c.mask, case_id=c.case_id)
    return cases


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder of NIfTI pairs")
    parser.add_argument(
        "--cache", type=Path, default=Path("data/downloads"), help="download cache (ircad)"
    )
    parser.add_argument(
        "--labelmaps", type=Path, default=Path("labelmaps"), help="label maps (synth)"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))


def main(args: argparse.Namespace) -> None:
    params: IngestParams = load_section("ingest", args.params)
    cases = ingest(params, args.out, args.cache, args.labelmaps)
    print(f"ingest: {len(cases)} cases ({params.dataset}) -> {args.out}")
