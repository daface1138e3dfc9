"""Segmentation metrics of a predicted binary volume against the reference one (numpy/scipy only).

Array contract: ``pred`` and ``truth`` have the same shape, are 3-D ``(x, y, z)`` arrays in the
RAS orientation of :mod:`liverseg.data.volumes` (2-D is also accepted by the overlap metrics
:func:`dice`, :func:`iou`, :func:`voe`, :func:`rvd`), and hold only 0/1 (any bool, integer or
float dtype). ``spacing`` is the voxel size in mm along those same axes (``Volume.spacing``).
Any violation raises :class:`~liverseg.errors.DataError` (a ``ValueError``) naming the argument.

Definitions (P = predicted voxels, T = reference voxels, S(.) = surface voxels):

- Dice ``2|P∩T| / (|P|+|T|)``; IoU (Jaccard) ``|P∩T| / |P∪T|``; VOE ``1 - IoU`` as a fraction
  (LiTS reports it in percent: multiply by 100 there); RVD ``(|P|-|T|) / |T|``, signed, so an
  over-segmentation is positive. Voxel counts are used: the voxel volume cancels out.
- Surface of a mask: its voxels minus its binary erosion by the 6-neighbour (connectivity 1)
  structuring element; voxels on the array border count as surface (outside is background).
- ASSD: the mean of the distances from every voxel of S(P) to S(T) and from every voxel of S(T)
  to S(P), pooled (Heimann et al. 2009, SLIVER07/LiTS). MedPy's ``assd`` instead averages the
  two directional means; the two differ when the surfaces have different voxel counts.
- HD95: the 95th percentile (numpy's linear interpolation) of the same pooled distances, as
  MedPy's ``hd95`` does.
- NSD at tolerance τ mm (normalised surface Dice, Nikolov et al. 2021; MONAI's
  ``compute_surface_dice``): the fraction of the pooled surface voxels of both masks that lie
  within τ of the other mask's surface, ``(|{d(S(P)→S(T)) <= τ}| + |{d(S(T)→S(P)) <= τ}|) /
  (|S(P)| + |S(T)|)``, in [0, 1]. Surface voxels are counted, not surface areas (as MONAI).

Empty-mask conventions, chosen so that an empty prediction of an empty reference is perfect and
an empty prediction of a non-empty reference (or the reverse) is the worst possible score:

=======================  ======  =====  =====  =========  ==========  =========  ===
case                     dice    iou    voe    rvd        assd_mm     hd95_mm    nsd
=======================  ======  =====  =====  =========  ==========  =========  ===
both empty               1       1      0      0          0           0          1
pred empty, truth not    0       0      1      -1         inf         inf        0
truth empty, pred not    0       0      1      DataError  inf         inf        0
=======================  ======  =====  =====  =========  ==========  =========  ===

RVD with an empty reference and a non-empty prediction is undefined (division by zero) and raises
rather than returning inf, because an empty liver reference is a data error in this project
(every CT of the data sets contains a liver); :func:`volume_metrics` raises likewise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from liverseg.errors import DataError
from liverseg.postprocess import as_binary

#: The pooled-distance percentile reported as HD95.
HD_PERCENTILE = 95.0


def _validate_pair(
    pred: np.ndarray, truth: np.ndarray, ndims: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred)
    t = np.asarray(truth)
    for name, arr in (("pred", p), ("truth", t)):
        if arr.ndim not in ndims:
            allowed = " or ".join(f"{n}-D" for n in ndims)
            raise DataError(f"{name}: expected a {allowed} mask, got shape {arr.shape}")
    if p.shape != t.shape:
        raise DataError(f"pred shape {p.shape} != truth shape {t.shape}")
    return as_binary(p, "pred"), as_binary(t, "truth")


def _validate_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as exc:
        raise DataError(f"spacing: expected {ndim} numbers in mm, got {spacing!r}") from exc
    if len(values) != ndim:
        raise DataError(f"spacing: expected {ndim} values (one per axis), got {len(values)}")
    if not all(np.isfinite(s) and s > 0 for s in values):
        raise DataError(f"spacing: every voxel size must be finite and > 0 mm, got {values}")
    return values


def _overlap_counts(p: np.ndarray, t: np.ndarray) -> tuple[int, int, int]:
    return int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient in [0, 1]; 1 when both masks are empty (see the module table)."""
    p, t = _validate_pair(pred, truth, (2, 3))
    inter, n_p, n_t = _overlap_counts(p, t)
    if n_p + n_t == 0:
        return 1.0
    return 2.0 * inter / (n_p + n_t)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard index in [0, 1]; 1 when both masks are empty (see the module table)."""
    p, t = _validate_pair(pred, truth, (2, 3))
    inter, n_p, n_t = _overlap_counts(p, t)
    union = n_p + n_t - inter
    if union == 0:
        return 1.0
    return inter / union


def voe(pred: np.ndarray, truth: np.ndarray) -> float:
    """Volumetric overlap error ``1 - IoU`` as a fraction in [0, 1] (not percent)."""
    return 1.0 - iou(pred, truth)


def rvd(pred: np.ndarray, truth: np.ndarray) -> float:
    """Signed relative volume difference ``(|P|-|T|)/|T|``: > 0 over-, < 0 under-segmentation.

    0 when both masks are empty; raises DataError when only ``truth`` is empty (undefined).
    """
    p, t = _validate_pair(pred, truth, (2, 3))
    n_p = int(np.count_nonzero(p))
    n_t = int(np.count_nonzero(t))
    if n_t == 0:
        if n_p == 0:
            return 0.0
        raise DataError(f"truth: empty reference mask, RVD undefined (prediction has {n_p} voxels)")
    return (n_p - n_t) / n_t


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def _crop_to_union(p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union.

    The distance transforms cost time in proportion to the array size, and a liver fills a small
    part of a CT. Distances are unchanged: every surface voxel lies in the box, the exact EDT only
    looks at those, and the erosion's outside-is-background border matches the real background
    around the box.
    """
    union = p | t
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        slices.append(slice(int(idx[0]), int(idx[-1]) + 1))
    box = tuple(slices)
    return p[box], t[box]


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of one mask to the nearest of the other's.

    Returns ``(pred_to_truth, truth_to_pred)``: float64 arrays of length |S(P)| and |S(T)|.
    Both masks must be non-empty (a distance to an empty surface does not exist); the metric
    functions apply the empty-mask conventions before calling this.
    """
    p, t = _validate_pair(pred, truth, (3,))
    sampling = _validate_spacing(spacing, p.ndim)
    for name, arr in (("pred", p), ("truth", t)):
        if not arr.any():
            raise DataError(f"{name}: empty mask, surface distances undefined")
    p, t = _crop_to_union(p, t)
    surf_p = _surface(p)
    surf_t = _surface(t)
    dist_to_t = ndimage.distance_transform_edt(~surf_t, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~surf_p, sampling=sampling)
    return (
        np.asarray(dist_to_t[surf_p], dtype=np.float64),
        np.asarray(dist_to_p[surf_t], dtype=np.float64),
    )


def _empty_distance(p: np.ndarray, t: np.ndarray) -> float | None:
    """The convention's value when a mask is empty, None when distances are defined."""
    has_p, has_t = bool(p.any()), bool(t.any())
    if has_p and has_t:
        return None
    return 0.0 if not (has_p or has_t) else float("inf")


def _pooled_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> np.ndarray | float:
    p, t = _validate_pair(pred, truth, (3,))
    _validate_spacing(spacing, p.ndim)
    empty = _empty_distance(p, t)
    if empty is not None:
        return empty
    return np.concatenate(surface_distances(p, t, spacing))


def assd(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm (pooled over both directions, see above)."""
    d = _pooled_distances(pred, truth, spacing)
    return d if isinstance(d, float) else float(d.mean())


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile of the pooled symmetric surface distances in mm (robust Hausdorff)."""
    d = _pooled_distances(pred, truth, spacing)
    return d if isinstance(d, float) else float(np.percentile(d, HD_PERCENTILE))


def _validate_tolerance(tolerance_mm: float) -> float:
    try:
        tol = float(tolerance_mm)
    except (TypeError, ValueError) as exc:
        raise DataError(f"tolerance_mm: expected a number of mm, got {tolerance_mm!r}") from exc
    if not (np.isfinite(tol) and tol >= 0):
        raise DataError(f"tolerance_mm: must be finite and >= 0 mm, got {tol}")
    return tol


def _nsd(d: np.ndarray | float, tolerance_mm: float) -> float:
    if isinstance(d, float):  # an empty mask: 1 if both are, else 0 (the module table)
        return 1.0 if d == 0.0 else 0.0
    return float(np.count_nonzero(d <= tolerance_mm)) / d.size


def nsd_key(tolerance_mm: float) -> str:
    """The metric's name at a tolerance: ``nsd_1mm``, ``nsd_2.5mm``."""
    return f"nsd_{float(tolerance_mm):g}mm"


def surface_dice(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> float:
    """Normalised surface Dice in [0, 1] at ``tolerance_mm`` (see the module docstring)."""
    tol = _validate_tolerance(tolerance_mm)
    return _nsd(_pooled_distances(pred, truth, spacing), tol)


def volume_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerances_mm: Sequence[float] = (),
) -> dict[str, float]:
    """The metrics of one case: keys dice, iou, voe, rvd, assd_mm, hd95_mm, and one
    :func:`nsd_key` per tolerance in ``nsd_tolerances_mm``.

    Validates and computes the surface distances once for all distance metrics.
    """
    p, t = _validate_pair(pred, truth, (3,))
    _validate_spacing(spacing, p.ndim)
    tolerances = [_validate_tolerance(tol) for tol in nsd_tolerances_mm]
    jaccard = iou(p, t)
    d = _pooled_distances(p, t, spacing)
    if isinstance(d, float):
        assd_mm = hd95_mm = d
    else:
        assd_mm = float(d.mean())
        hd95_mm = float(np.percentile(d, HD_PERCENTILE))
    return {
        "dice": dice(p, t),
        "iou": jaccard,
        "voe": 1.0 - jaccard,
        "rvd": rvd(p, t),
        "assd_mm": assd_mm,
        "hd95_mm": hd95_mm,
        **{nsd_key(tol): _nsd(d, tol) for tol in tolerances},
    }
