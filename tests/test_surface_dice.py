"""Normalised surface Dice against values counted by hand (the cubes of test_volume_metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from liverseg.errors import DataError
from liverseg.evaluation.metrics import nsd_key, volume_metrics
from test_volume_metrics import box, shifted_cubes


# Cube T of side 10 vs P, the same cube shifted s voxels along an axis of 2 mm spacing (the two
# other axes 1 mm). Both surfaces have 488 voxels, 976 pooled distances, counted by hand in
# test_volume_metrics.test_shifted_cube_surface_distances:
#   s = 2: 576 x 0 mm, 56 x 1, 112 x 2, 24 x 3, 208 x 4;
#   s = 1: 648 x 0 mm, 56 x 1, 272 x 2.
# NSD(τ) = (number of pooled distances <= τ) / 976.
@pytest.mark.parametrize(
    ("shift", "tolerance", "expected"),
    [
        (2, 0.0, 576 / 976),
        (2, 0.5, 576 / 976),
        (2, 1.0, 632 / 976),
        (2, 1.5, 632 / 976),
        (2, 2.0, 744 / 976),
        (2, 3.0, 768 / 976),
        (2, 3.9, 768 / 976),
        (2, 4.0, 1.0),
        (1, 0.5, 648 / 976),
        (1, 1.0, 704 / 976),
        (1, 2.0, 1.0),
    ],
)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_cube_nsd_anisotropic(
    shift: int, tolerance: float, expected: float, axis: int
) -> None:
    pred, truth, spacing = shifted_cubes(axis, shift)
    for p, t in ((pred, truth), (truth, pred)):
        got = volume_metrics(p, t, spacing, nsd_tolerances_mm=[tolerance])
        assert got[nsd_key(tolerance)] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("offset", "spacing", "distance_mm"),
    [
        ((0, 0, 2), (0.5, 0.5, 2.0), 4.0),
        ((1, 1, 0), (3.0, 4.0, 1.0), 5.0),  # 3-4-5 triangle
    ],
)
def test_single_voxels_nsd_is_all_or_nothing(
    offset: tuple[int, int, int], spacing: tuple[float, float, float], distance_mm: float
) -> None:
    truth = box((6, 6, 6), (1, 1, 1), (1, 1, 1))
    pred = box((6, 6, 6), tuple(1 + o for o in offset), (1, 1, 1))
    got = volume_metrics(pred, truth, spacing, nsd_tolerances_mm=[distance_mm - 0.01, distance_mm])
    assert got[nsd_key(distance_mm - 0.01)] == 0.0
    assert got[nsd_key(distance_mm)] == 1.0


def test_nsd_of_a_shaved_cube() -> None:
    # P = T (a 10-cube at 1 mm) minus its outer 1-voxel shell: Dice 2*512/1512 only, yet every
    # one of P's 8^3 - 6^3 = 296 surface voxels is 1 mm from T's surface. Of T's 488: the
    # 6 x 8 x 8 = 384 face voxels are 1 mm from P, the 12 x 8 = 96 edge voxels sqrt(2) mm and
    # the 8 corners sqrt(3) mm.
    truth = box((14, 14, 14), (2, 2, 2), (10, 10, 10))
    pred = box((14, 14, 14), (3, 3, 3), (8, 8, 8))
    got = volume_metrics(pred, truth, (1.0, 1.0, 1.0), nsd_tolerances_mm=[0.5, 1.0, 1.5, 2.0])
    assert got["dice"] == pytest.approx(1024 / 1512)
    assert got["nsd_0.5mm"] == 0.0
    assert got["nsd_1mm"] == pytest.approx((296 + 384) / 784)
    assert got["nsd_1.5mm"] == pytest.approx((296 + 384 + 96) / 784)
    assert got["nsd_2mm"] == 1.0


@pytest.mark.parametrize(
    ("pred_empty", "truth_empty", "expected"),
    [(True, True, 1.0), (True, False, 0.0)],
)
def test_nsd_empty_mask_conventions(pred_empty: bool, truth_empty: bool, expected: float) -> None:
    cube = box((6, 6, 6), (1, 1, 1), (3, 3, 3))
    empty = np.zeros((6, 6, 6), dtype=bool)
    pred = empty if pred_empty else cube
    truth = empty if truth_empty else cube
    assert volume_metrics(pred, truth, (1.0, 1.0, 1.0), [1.0])["nsd_1mm"] == expected


@pytest.mark.parametrize("tolerance", [-1.0, float("nan"), float("inf"), "a"])
def test_bad_tolerance_is_refused(tolerance: object) -> None:
    cube = box((6, 6, 6), (1, 1, 1), (3, 3, 3))
    with pytest.raises(DataError, match="tolerance_mm"):
        volume_metrics(cube, cube, (1.0, 1.0, 1.0), [tolerance])  # type: ignore[list-item]


def test_nsd_keys_name_the_tolerance() -> None:
    assert [nsd_key(t) for t in (1, 2.0, 2.5)] == ["nsd_1mm", "nsd_2mm", "nsd_2.5mm"]
