"""The per-scan quality report on constructed cases (RAS arrays: x runs to the patient's right)."""

from __future__ import annotations

import numpy as np
import pytest

from liverseg.evaluation.quality import member_agreement, quality_report
from liverseg.params import QualityParams

SPACING = (2.0, 2.0, 5.0)  # 0.02 mL per voxel


def scan() -> tuple[np.ndarray, np.ndarray]:
    """A body (0 HU) across x 10..69 of 80, a liver on its right (x 45..64), slices 3..16."""
    ct = np.full((80, 60, 20), -1000.0, np.float32)
    ct[10:70, 10:50, :] = 0.0
    mask = np.zeros(ct.shape, np.uint8)
    mask[45:65, 20:40, 3:17] = 1  # 20 * 20 * 14 = 5600 voxels = 112 mL
    return ct, mask


LIMITS = QualityParams(min_volume_ml=50.0, max_volume_ml=500.0, min_agreement=0.9)


def test_a_plausible_mask_raises_no_flag() -> None:
    ct, mask = scan()
    r = quality_report(mask, ct, SPACING, limits=LIMITS)
    assert r["liver_volume_ml"] == pytest.approx(112.0)
    assert r["agreement"] is None and r["n_members"] == 0
    assert not r["touches_first_slice"] and not r["touches_last_slice"]
    # Liver centroid x = 54.5, body centroid x = 39.5: 15 voxels = 30 mm to the right.
    assert r["centroid_offset_mm"] == pytest.approx(30.0)
    assert r["review"] is False and r["reasons"] == [] and r["notes"] == []


def test_a_mask_cut_at_the_top_slice_is_noted_not_flagged() -> None:
    # A cut liver is no sign of a bad mask (benchmarks/README.md, "The review flag"): a note.
    ct, mask = scan()
    mask[45:65, 20:40, 3:] = 1  # the liver runs out of the scan at the top
    r = quality_report(mask, ct, SPACING, limits=LIMITS)
    assert r["touches_last_slice"] and not r["touches_first_slice"]
    assert r["review"] is False and r["reasons"] == []
    assert r["notes"] == [
        "liver touches the last (highest) slice: cut off by the scan's extent (the volume too)?"
    ]


def test_a_mask_cut_at_both_ends_gets_two_notes() -> None:
    ct, mask = scan()
    mask[45:65, 20:40, :] = 1
    r = quality_report(mask, ct, SPACING, limits=LIMITS)
    assert r["touches_first_slice"] and r["touches_last_slice"]
    assert r["review"] is False
    assert [n.split(" slice")[0] for n in r["notes"]] == [
        "liver touches the first (lowest)",
        "liver touches the last (highest)",
    ]


def test_a_mirrored_volume_is_flagged() -> None:
    ct, mask = scan()
    # Left-right mirrored arrays (a wrong orientation, or situs inversus): liver on the left.
    r = quality_report(mask[::-1], ct[::-1], SPACING, limits=LIMITS)
    assert r["centroid_offset_mm"] == pytest.approx(-30.0)
    assert r["review"] is True
    assert len(r["reasons"]) == 1 and "patient's left" in r["reasons"][0]


@pytest.mark.parametrize(
    ("x_len", "flagged"),
    [(1, True), (5, False), (20, False), (60, True)],  # 5.6, 28, 112, 336 mL vs [25, 300]
)
def test_volume_outside_the_plausible_range(x_len: int, flagged: bool) -> None:
    ct, _ = scan()
    mask = np.zeros(ct.shape, np.uint8)
    lo = 69 - x_len
    mask[lo:69, 20:40, 3:17] = 1
    limits = QualityParams(min_volume_ml=25.0, max_volume_ml=300.0)
    r = quality_report(mask, ct, SPACING, limits=limits)
    assert r["liver_volume_ml"] == pytest.approx(x_len * 5.6)
    assert any("outside the plausible" in s for s in r["reasons"]) is flagged


def test_an_empty_mask_is_flagged() -> None:
    ct, mask = scan()
    r = quality_report(np.zeros_like(mask), ct, SPACING, limits=LIMITS)
    assert r["review"] is True and r["reasons"] == ["no liver found"]
    assert r["centroid_offset_mm"] is None


def test_agreement_is_the_mean_pairwise_dice() -> None:
    a = np.zeros((4, 4, 2), bool)
    a[:2, :2, 0] = True  # 4 voxels
    b = a.copy()
    b[2, :2, 0] = True  # 6 voxels, 4 shared with a: Dice 8/10
    c = np.zeros_like(a)
    c[3, 3, 1] = True  # shares nothing: Dice 0 with a and b
    assert member_agreement([a, b]) == pytest.approx(0.8)
    assert member_agreement([a, b, c]) == pytest.approx((0.8 + 0 + 0) / 3)
    assert member_agreement([a]) is None and member_agreement(None) is None


def test_poor_agreement_is_flagged() -> None:
    ct, mask = scan()
    other = np.zeros_like(mask)
    other[45:65, 20:40, 3:10] = 1  # half the liver: Dice 2*2800/8400 = 2/3 with mask
    r = quality_report(mask, ct, SPACING, member_masks=[mask, mask, other], limits=LIMITS)
    assert r["agreement"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert r["n_members"] == 3
    assert r["review"] is True and "agree poorly" in r["reasons"][0]


def test_mask_and_ct_must_share_a_grid() -> None:
    ct, mask = scan()
    with pytest.raises(ValueError, match="one 3-D grid"):
        quality_report(mask[:, :, :5], ct, SPACING)
