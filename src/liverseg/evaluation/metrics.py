"""Segmentation metrics of a predicted binary volume against the reference one (numpy/scipy only).

Array contract: ``pred`` and ``truth`` have the same shape, are 3-D ``(x, y, z)`` arrays in the
RAS orientation of :mod:`liverseg.data.volumes` (:func:`dice` also takes 2-D),
and hold only 0/1 (any bool, integer or float dtype). ``spacing`` is the voxel size in mm along
those same axes (``Volume.spacing``).
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

=======================  ====  ===  ===  ===  =======  =======  ===
case                     dice  iou  voe  rvd  assd_mm  hd95_mm  nsd
=======================  ====  ===  ===  ===  =======  =======  ===
both empty               1     1    0    0    0        0        1
pred empty, truth not    0     0    1    -1   inf      inf      0
truth empty, pred not    0     0    :func:`volume_metrics` raises DataError (RVD undefined)
=======================  ====  ===  ===  ===  =======  =======  ===

With an empty reference RVD divides by zero; :func:`volume_metrics` raises rather than return
inf, because an empty liver reference is a data error here (every CT of the data sets has one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from liverseg.errors import DataError
from liverseg.postprocess import as_binary


def _validate_pair(
    pred: np.ndarray, truth: np.ndarray, ndims: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred), np.asarray(truth)
    for name, arr in (("pred", p), ("truth", t)):
        if arr.ndim not in ndims:
            allowed = " or ".join(f"{n}-D" for n in ndims)
            raise DataError(f"{name}: expected a {allowed} mask, got shape {arr.shape}")
    if p.shape != t.shape:
        raise DataError(f"pred shape {p.shape} != truth shape {t.shape}")
    return as_binary(p, "pred"), as_binary(t, "truth")


def _validate_spacing(spacing: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as exc:
        raise DataError(f"spacing: expected 3 numbers in mm, got {spacing!r}") from exc
    if len(values) != 3:
        raise DataError(f"spacing: expected 3 values (one per axis), got {len(values)}")
    if not all(np.isfinite(s) and s > 0 for s in values):
        raise DataError(f"spacing: every voxel size must be finite and > 0 mm, got {values}")
    return values


def _counts(p: np.ndarray, t: np.ndarray) -> tuple[int, int, int]:
    """|P∩T|, |P|, |T|."""
    return int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two 2-D or 3-D masks; 1 when both are empty."""
    inter, n_p, n_t = _counts(*_validate_pair(pred, truth, (2, 3)))
    return 2.0 * inter / (n_p + n_t) if n_p + n_t else 1.0


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of one mask to the nearest of the other's:
    ``(pred_to_truth, truth_to_pred)``, of lengths |S(P)| and |S(T)|. Both masks must be
    non-empty (a distance to an empty surface does not exist)."""
    p, t = _validate_pair(pred, truth, (3,))
    sampling = _validate_spacing(spacing)
    for name, arr in (("pred", p), ("truth", t)):
        if not arr.any():
            raise DataError(f"{name}: empty mask, surface distances undefined")
    # Cropped to the bounding box of the union: the distance transforms cost time in proportion
    # to the array size, and a liver fills a small part of a CT. Distances are unchanged: every
    # surface voxel lies in the box, the exact EDT only looks at those, and the erosion's
    # outside-is-background border matches the real background around the box.
    box = ndimage.find_objects((p | t).view(np.uint8))[0]
    cross = ndimage.generate_binary_structure(3, 1)
    surf_p, surf_t = (
        m & ~ndimage.binary_erosion(m, cross, border_value=0) for m in (p[box], t[box])
    )
    dist_to_t = ndimage.distance_transform_edt(~surf_t, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~surf_p, sampling=sampling)
    return np.asarray(dist_to_t[surf_p], np.float64), np.asarray(dist_to_p[surf_t], np.float64)


def nsd_key(tolerance_mm: float) -> str:
    """The metric's name at a tolerance: ``nsd_1mm``, ``nsd_2.5mm``."""
    return f"nsd_{float(tolerance_mm):g}mm"


def _validate_tolerance(tolerance_mm: float) -> float:
    try:
        tol = float(tolerance_mm)
    except (TypeError, ValueError) as exc:
        raise DataError(f"tolerance_mm: expected a number of mm, got {tolerance_mm!r}") from exc
    if not (np.isfinite(tol) and tol >= 0):
        raise DataError(f"tolerance_mm: must be finite and >= 0 mm, got {tol}")
    return tol


def volume_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerances_mm: Sequence[float] = (),
) -> dict[str, float]:
    """The metrics of one case: dice, iou, voe, rvd, assd_mm, hd95_mm, and one :func:`nsd_key`
    per tolerance in ``nsd_tolerances_mm`` (the definitions and the empty-mask table above)."""
    p, t = _validate_pair(pred, truth, (3,))
    _validate_spacing(spacing)
    tolerances = [_validate_tolerance(tol) for tol in nsd_tolerances_mm]
    inter, n_p, n_t = _counts(p, t)
    if n_p and not n_t:
        raise DataError(f"truth: empty reference mask, RVD undefined (prediction has {n_p} voxels)")
    union = n_p + n_t - inter
    jaccard = inter / union if union else 1.0
    out = {
        "dice": 2.0 * inter / (n_p + n_t) if n_p + n_t else 1.0,
        "iou": jaccard,
        "voe": 1.0 - jaccard,
        "rvd": (n_p - n_t) / n_t if n_t else 0.0,
    }
    if n_p and n_t:
        d = np.concatenate(surface_distances(p, t, spacing))
        out["assd_mm"], out["hd95_mm"] = float(d.mean()), float(np.percentile(d, 95.0))
        nsd = {tol: float(np.count_nonzero(d <= tol)) / d.size for tol in tolerances}
    else:  # both empty (perfect) or the prediction empty (the worst)
        out["assd_mm"] = out["hd95_mm"] = 0.0 if n_t == 0 else float("inf")
        nsd = dict.fromkeys(tolerances, 1.0 if n_t == 0 else 0.0)
    return {**out, **{nsd_key(tol): v for tol, v in nsd.items()}}
