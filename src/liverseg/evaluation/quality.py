"""A per-scan quality report: the signs that a predicted liver mask should be checked by a person.

Nothing here knows the true mask: these are the facts a user has at prediction time.

- ``liver_volume_ml``; a volume outside [``min_volume_ml``, ``max_volume_ml``] is a reason.
- ``agreement``: the mean pairwise Dice of the ensemble members' thresholded masks (before
  post-processing); ``None`` for a single model. Below ``min_agreement`` is a reason: where the
  fold models disagree, the mean of them is a guess. How well it predicts the true Dice is
  measured by the evaluate stage (its rank correlation with the per-patient Dice).
- ``touches_first_slice`` / ``touches_last_slice``: liver on the first or last axial slice of
  the volume, i.e. the liver is probably cut off by the scan's extent (its volume then too).
  A note, not a reason: a cut liver is no sign of a bad mask (benchmarks/README.md, "The
  review flag": it flagged 13 of 30 held-out scans above Dice 0.93 and no bad one that the
  agreement missed).
- ``centroid_offset_mm``: the liver centroid's distance along x (RAS: towards the patient's
  right) from the body's centroid (voxels above ``body_hu``). The liver lies on the right, so a
  negative offset means a mirrored volume, a wrong orientation, or situs inversus.
- ``review``: true when any reason is given; ``reasons`` says which, in words; ``notes``
  what else a reader of the mask should know (the cut liver).

Array contract: masks and the CT are ``(x, y, z)`` in canonical RAS (see
:mod:`liverseg.data.volumes`): the first axis runs towards the patient's right, the last
towards superior.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from itertools import combinations
from typing import Any

import numpy as np

from liverseg.evaluation.metrics import dice
from liverseg.params import QualityParams


def member_agreement(member_masks: Sequence[np.ndarray] | np.ndarray | None) -> float | None:
    """Mean Dice over all pairs of member masks; None with fewer than two members."""
    if member_masks is None or len(member_masks) < 2:
        return None
    return float(np.mean([dice(a, b) for a, b in combinations(member_masks, 2)]))


def quality_report(
    mask: np.ndarray,
    ct: np.ndarray,
    spacing: Sequence[float],
    *,
    member_masks: Sequence[np.ndarray] | np.ndarray | None = None,
    limits: QualityParams | None = None,
) -> dict[str, Any]:
    """The report of one predicted mask (RAS ``(x, y, z)``, 0/1) on its CT (HU)."""
    limits = limits or QualityParams()
    m = np.asarray(mask) != 0
    if m.shape != ct.shape or m.ndim != 3:
        raise ValueError(f"mask shape {m.shape} and CT shape {ct.shape} must be one 3-D grid")
    sx, sy, sz = (float(s) for s in spacing)
    volume_ml = float(np.count_nonzero(m)) * sx * sy * sz / 1000.0
    agreement = member_agreement(member_masks)
    first, last = bool(m[:, :, 0].any()), bool(m[:, :, -1].any())
    # Centroids along x only: projected counts keep this cheap on a 512 x 512 x 500 volume.
    liver_w = m.sum(axis=(1, 2), dtype=np.float64)
    body_w = (ct > limits.body_hu).sum(axis=(1, 2), dtype=np.float64)
    offset = None
    if liver_w.any() and body_w.any():
        xs = np.arange(m.shape[0])
        offset = float(np.average(xs, weights=liver_w) - np.average(xs, weights=body_w)) * sx

    reasons: list[str] = []
    if volume_ml == 0:
        reasons.append("no liver found")
    elif not limits.min_volume_ml <= volume_ml <= limits.max_volume_ml:
        reasons.append(
            f"liver volume {volume_ml:.0f} mL outside the plausible "
            f"{limits.min_volume_ml:g}-{limits.max_volume_ml:g} mL"
        )
    if agreement is not None and agreement < limits.min_agreement:
        reasons.append(
            f"ensemble members agree poorly (mean pairwise Dice {agreement:.3f} < "
            f"{limits.min_agreement:g})"
        )
    if offset is not None and offset < 0:
        reasons.append(
            f"liver centroid {-offset:.0f} mm on the patient's left of the body's centre: "
            "wrong orientation, mirrored volume or situs inversus?"
        )
    notes = [
        f"liver touches the {which} slice: cut off by the scan's extent (the volume too)?"
        for which, touches in (("first (lowest)", first), ("last (highest)", last))
        if touches
    ]
    return {
        "liver_volume_ml": volume_ml,
        "agreement": agreement,
        "n_members": 0 if member_masks is None else len(member_masks),
        "touches_first_slice": first,
        "touches_last_slice": last,
        "centroid_offset_mm": offset,
        "review": bool(reasons),
        "reasons": reasons,
        "notes": notes,
        "limits": asdict(limits),
    }
