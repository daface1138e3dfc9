"""Clean-up of a predicted liver mask (the last step of :mod:`liverseg.inference`): keep the
largest 3-D component, fill in-plane holes.

Array contract: masks are 3-D ``(x, y, z)`` arrays in the RAS orientation of
:mod:`liverseg.data.volumes`, so ``mask[:, :, k]`` is axial slice ``k``; values are 0/1 (any bool,
integer or float dtype). Every function returns a new array of the input's shape and dtype and
never modifies its input; an empty mask stays empty. A bad input raises
:class:`~liverseg.errors.DataError` naming the problem.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from liverseg.errors import DataError

# Full (26-neighbour) connectivity: the liver is one organ, but its thin parts (the tip of the
# left lobe, the caudate process) cross thick CT slices obliquely, so consecutive slices of them
# may touch only along an edge or a corner. With 6-connectivity those true liver parts would
# become separate components and be thrown away; merging an occasional diagonally touching false
# positive is the lesser harm.
_COMPONENT_STRUCTURE = ndimage.generate_binary_structure(3, 3)

# Hole filling in each axial slice independently: in-plane 4-connectivity for the background
# (the complement of the 8-connectivity the foreground has in-plane), and nothing across z.
# A 3-D fill would leave the portal vein, hepatic veins and IVC unfilled: they enter the liver
# through its top or bottom, so in 3-D their lumen is connected to the background outside the
# organ and is no hole, while in every axial slice it is enclosed by liver. Per-slice filling
# matches how the reference masks are drawn (slice by slice, vessels inside the liver included).
_AXIAL_FILL_STRUCTURE = ndimage.generate_binary_structure(2, 1)[:, :, np.newaxis]


def as_binary(mask: np.ndarray, name: str) -> np.ndarray:
    """``mask`` as bool, refusing anything but 0/1 (``name`` goes in the message): a probability
    map or a label map with other classes is refused rather than thresholded silently."""
    arr = np.asarray(mask)
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{name}: expected a binary mask, got dtype {arr.dtype}")
    is_zero = arr == 0
    if not np.all(is_zero | (arr == 1)):
        bad = np.unique(arr[~is_zero & (arr != 1)])[:5]
        raise DataError(f"{name}: mask is not binary: values {bad.tolist()} besides 0/1")
    return ~is_zero


def _as_binary_3d(mask: np.ndarray) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 3:
        raise DataError(f"mask: expected a 3-D (x, y, z) mask, got shape {arr.shape}")
    return as_binary(arr, "mask")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest 26-connected component (the liver), dropping false positives. On a
    tie in size the component met first in C (index) order is kept."""
    binary = _as_binary_3d(mask)
    labels, n = ndimage.label(binary, structure=_COMPONENT_STRUCTURE)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0  # background
        binary = labels == int(np.argmax(sizes))
    return binary.astype(np.asarray(mask).dtype)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every axial slice (vessels, unsegmented lesions inside the liver)."""
    binary = _as_binary_3d(mask)
    filled = ndimage.binary_fill_holes(binary, structure=_AXIAL_FILL_STRUCTURE)
    return filled.astype(np.asarray(mask).dtype)


def postprocess(mask: np.ndarray, *, largest: bool, fill: bool) -> np.ndarray:
    """Largest component first, then hole filling: so the fill works on the organ that is kept,
    and its result is still one component (a filled hole touches the foreground around it)."""
    out = _as_binary_3d(mask)
    if largest:
        out = largest_component(out)
    if fill:
        out = fill_holes(out)
    return out.astype(np.asarray(mask).dtype)
