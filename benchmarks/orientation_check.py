"""The served slice form on slices that are not RAS: as sent, and with ``orientation`` named.

    python benchmarks/orientation_check.py CT.nii.gz [--model models]

Runs the pyfunc's ``predict`` in process (no server) on the CT's slices as the file stores
them, first sent as if RAS, then with ``params={"orientation": <the file's axis codes>}``, and
on the RAS slices; prints the liver pixel counts and whether the oriented answer equals the
RAS answer mapped back to the file's orientation.
"""

from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from liverseg.inference import Segmenter
from liverseg.serving.model import LiverSegModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ct")
    parser.add_argument("--model", default="models")
    args = parser.parse_args()
    img = nib.load(args.ct)
    codes = "".join(nib.aff2axcodes(img.affine))
    stored = np.moveaxis(np.asarray(img.get_fdata(), np.float32), 2, 0)  # (N, H, W) as stored
    ras = np.moveaxis(np.asarray(nib.as_closest_canonical(img).get_fdata(), np.float32), 2, 0)
    model = LiverSegModel(Segmenter.from_dir(args.model), max_bytes=2**31)
    as_ras = model.predict(None, stored)
    oriented = model.predict(None, stored, params={"orientation": codes})
    reference = model.predict(None, ras)
    back = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(tuple(codes)))
    expected = np.moveaxis(apply_orientation(np.moveaxis(reference, 0, 2), back), 2, 0)
    same = np.array_equal(oriented, expected)
    print(f"file axis codes {codes}; liver pixels: stored slices sent as RAS {int(as_ras.sum())}")
    print(f"with orientation {codes!r} {int(oriented.sum())}, RAS slices {int(reference.sum())}")
    print(f"oriented answer == RAS answer in the file's orientation: {same}")


if __name__ == "__main__":
    main()
