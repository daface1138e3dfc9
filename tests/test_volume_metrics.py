"""Volume metrics against values computed by hand on small synthetic masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from liverseg.errors import DataError
from liverseg.evaluation.metrics import dice, surface_distances, volume_metrics

ANISO = (0.5, 0.5, 2.0)


def box(shape: tuple[int, ...], lo: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))] = True
    return mask


def shifted_cubes(axis: int, shift: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(P, T, spacing): cube T of side 10 in a 16^3 grid, P the same cube shifted ``shift``
    voxels along ``axis``, whose spacing is 2 mm (the two other axes 1 mm)."""
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = 2.0
    lo = [2, 2, 2]
    truth = box((16, 16, 16), tuple(lo), (10, 10, 10))
    lo[axis] += shift
    return box((16, 16, 16), tuple(lo), (10, 10, 10)), truth, spacing


def ball(shape: tuple[int, int, int], radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` of the array's central voxel."""
    grid = np.indices(shape).astype(float)
    centre = [n // 2 for n in shape]
    d2 = sum(((grid[i] - centre[i]) * spacing[i]) ** 2 for i in range(3))
    return d2 <= radius_mm**2


# --- overlap metrics -------------------------------------------------------------------------

A4 = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    ("pred", "truth", "exp_dice", "exp_iou"),
    [
        # 2x2 block vs the block shifted one column right: |P∩T| = 2, |P∪T| = 6.
        (A4, np.roll(A4, 1, axis=1), 4 / 8, 2 / 6),
        # vs the first two rows: |P∩T| = 4, |P| = 4, |T| = 8.
        (A4, np.array([[1] * 4, [1] * 4, [0] * 4, [0] * 4]), 8 / 12, 4 / 8),
        # vs its top-left pixel: |P∩T| = 1, |P| = 4, |T| = 1.
        (A4, np.eye(4, dtype=int) * np.array([1, 0, 0, 0]), 2 / 5, 1 / 4),
        (A4, A4, 1.0, 1.0),
        (A4, 1 - A4, 0.0, 0.0),
        # 3-D: a 2x2x2 cube vs one of its voxels.
        (np.ones((2, 2, 2), dtype=int), box((2, 2, 2), (0, 0, 0), (1, 1, 1)), 2 / 9, 1 / 8),
    ],
)
def test_dice_iou_small_masks(
    pred: np.ndarray, truth: np.ndarray, exp_dice: float, exp_iou: float
) -> None:
    p3, t3 = np.atleast_3d(pred), np.atleast_3d(truth)
    assert dice(pred, truth) == pytest.approx(exp_dice)
    assert volume_metrics(p3, t3, (1.0, 1.0, 1.0))["iou"] == pytest.approx(exp_iou)
    # Both are symmetric in their arguments.
    assert dice(truth, pred) == pytest.approx(exp_dice)
    assert volume_metrics(t3, p3, (1.0, 1.0, 1.0))["iou"] == pytest.approx(exp_iou)


@pytest.mark.parametrize(
    ("pred_lo", "pred_size", "exp"),
    [
        # Truth: cube of side 10 at (2, 2, 2), 1000 voxels. Spacing never enters these metrics.
        ((2, 2, 2), (10, 10, 10), (1.0, 1.0, 0.0, 0.0)),
        # Shifted 2 along z: overlap 10*10*8 = 800, union 1200.
        ((2, 2, 4), (10, 10, 10), (0.8, 800 / 1200, 400 / 1200, 0.0)),
        # Shifted 5 along x: overlap 500, union 1500.
        ((7, 2, 2), (10, 10, 10), (0.5, 1 / 3, 2 / 3, 0.0)),
        # Shifted 10 along y: faces touch, no overlap.
        ((2, 12, 2), (10, 10, 10), (0.0, 0.0, 1.0, 0.0)),
        # 12 long along z: |P| = 1200 contains T; dice 2000/2200, iou 1000/1200, rvd +0.2.
        ((2, 2, 2), (10, 10, 12), (10 / 11, 5 / 6, 1 / 6, 0.2)),
        # Half the cube along y: |P| = 500 inside T; dice 1000/1500, iou 0.5, rvd -0.5.
        ((2, 2, 2), (10, 5, 10), (2 / 3, 0.5, 0.5, -0.5)),
        # Shifted 4 along y and 15 long along z: |P| = 1500, overlap 10*6*10 = 600,
        # union 1900: dice 1200/2500, iou 6/19, rvd (1500-1000)/1000.
        ((2, 6, 2), (10, 10, 15), (0.48, 6 / 19, 13 / 19, 0.5)),
    ],
)
def test_overlap_of_offset_cubes_anisotropic(
    pred_lo: tuple[int, int, int],
    pred_size: tuple[int, int, int],
    exp: tuple[float, float, float, float],
) -> None:
    shape = (24, 24, 24)
    truth = box(shape, (2, 2, 2), (10, 10, 10))
    pred = box(shape, pred_lo, pred_size)
    exp_dice, exp_iou, exp_voe, exp_rvd = exp
    assert dice(pred, truth) == pytest.approx(exp_dice)
    got = volume_metrics(pred, truth, ANISO)
    assert got["dice"] == pytest.approx(exp_dice)
    assert got["iou"] == pytest.approx(exp_iou)
    assert got["voe"] == pytest.approx(exp_voe)
    assert got["rvd"] == pytest.approx(exp_rvd)


def test_rvd_is_signed_and_not_symmetric() -> None:
    small = box((6, 6, 6), (0, 0, 0), (2, 2, 2))  # 8 voxels
    big = box((6, 6, 6), (0, 0, 0), (4, 2, 2))  # 16 voxels
    assert volume_metrics(big, small, ANISO)["rvd"] == pytest.approx(1.0)
    assert volume_metrics(small, big, ANISO)["rvd"] == pytest.approx(-0.5)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64, np.float32])
def test_any_binary_dtype_gives_the_same_result(dtype: type) -> None:
    truth = box((8, 8, 8), (1, 1, 1), (4, 4, 4)).astype(dtype)
    pred = box((8, 8, 8), (2, 1, 1), (4, 4, 4)).astype(dtype)
    # Overlap 3*4*4 = 48 of 64 each: dice 96/128; surfaces 56 voxels each.
    got = volume_metrics(pred, truth, (1.0, 1.0, 1.0))
    assert got["dice"] == pytest.approx(0.75)
    assert got["iou"] == pytest.approx(48 / 80)


# --- surface distances -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "spacing", "exp_mm"),
    [
        ((3, 0, 0), (1.5, 1.0, 1.0), 4.5),
        ((0, 0, 2), ANISO, 4.0),
        ((1, 1, 0), (3.0, 4.0, 1.0), 5.0),  # 3-4-5 triangle
        ((0, 2, 1), (1.0, 1.5, 4.0), 5.0),  # sqrt(3^2 + 4^2)
        ((2, 1, 2), (1.0, 1.0, 1.0), 3.0),  # sqrt(4 + 1 + 4)
    ],
)
def test_single_voxels_distance_uses_spacing_per_axis(
    offset: tuple[int, int, int], spacing: tuple[float, float, float], exp_mm: float
) -> None:
    truth = box((6, 6, 6), (1, 1, 1), (1, 1, 1))
    pred = box((6, 6, 6), tuple(1 + o for o in offset), (1, 1, 1))
    p2t, t2p = surface_distances(pred, truth, spacing)
    assert p2t.tolist() == pytest.approx([exp_mm])
    assert t2p.tolist() == pytest.approx([exp_mm])
    got = volume_metrics(pred, truth, spacing)
    assert got["assd_mm"] == pytest.approx(exp_mm)
    assert got["hd95_mm"] == pytest.approx(exp_mm)


# Cube T of side 10 vs the same cube P shifted by s voxels along one axis whose spacing is 2 mm
# (the two other axes 1 mm). Each surface has 1000 - 8^3 = 488 voxels; by the mirror symmetry
# of the pair both directions give the same distances. From P to T, for s = 2 (along z):
#   side-wall voxels at z = 2..9 (8 rings of 36) lie on T's side wall: 288 x 0 mm;
#   side-wall ring at z = 10: 36 x 2 mm; ring at z = 11: 36 x 4 mm;
#   top-face interior (z = 11, 8x8): 64 x 4 mm (down to T's top face at z = 9);
#   bottom-face interior (z = 2, 8x8): min(4 mm down to T's bottom face, k mm sideways to T's
#   side wall), k = in-plane distance to the ring = 1 (28 voxels), 2 (20), 3 (12), 4 (4).
#   Sum = 72 + 144 + 256 + 28 + 40 + 36 + 16 = 592 -> ASSD = 592/488 = 74/61 mm.
#   Pooled sorted: 576 x 0, 56 x 1, 112 x 2, 24 x 3, 208 x 4; the 95th percentile sits at index
#   0.95 * 975 = 926.25, inside the 4s (768..975) -> HD95 = 4 mm = the maximum, 2 * 2.0 mm.
# For s = 1: 324 x 0; ring z = 10: 36 x 2; top interior: 64 x 2; bottom interior: 28 x 1 and
#   36 x 2 -> sum 300, ASSD = 300/488 = 75/122 mm; pooled 648 x 0, 56 x 1, 272 x 2 -> HD95 = 2.
@pytest.mark.parametrize(
    ("shift", "exp_assd", "exp_hd95"),
    [(1, 75 / 122, 2.0), (2, 74 / 61, 4.0)],
)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_cube_surface_distances(
    shift: int, exp_assd: float, exp_hd95: float, axis: int
) -> None:
    pred, truth, spacing = shifted_cubes(axis, shift)
    p2t, t2p = surface_distances(pred, truth, spacing)
    assert (p2t.size, t2p.size) == (488, 488)
    assert p2t.max() == pytest.approx(shift * 2.0)
    got = volume_metrics(pred, truth, spacing)
    assert got["assd_mm"] == pytest.approx(exp_assd)
    assert got["hd95_mm"] == pytest.approx(exp_hd95)
    assert got["hd95_mm"] <= shift * 2.0 + 1e-9


@pytest.mark.parametrize("origin", [(0, 0, 0), (9, 5, 20), (30, 30, 28)])
def test_position_in_a_large_array_does_not_change_distances(
    origin: tuple[int, int, int],
) -> None:
    # The metric crops to the masks' bounding box: the results must not depend on where the
    # masks sit, even flush against the array border (origin 0, and the far corner).
    shape = (40, 40, 40)
    truth = box(shape, origin, (10, 10, 10))
    pred = box(shape, (origin[0], origin[1], origin[2] + 2), (10, 10, 10))
    spacing = (1.0, 1.0, 2.0)
    got = volume_metrics(pred, truth, spacing)
    assert got["assd_mm"] == pytest.approx(74 / 61)
    assert got["hd95_mm"] == pytest.approx(4.0)


def test_distances_are_pooled_over_both_directions() -> None:
    # P = {a}, T = {a, b}: P->T gives [0], T->P gives [0, D]. Pooled: [0, 0, D], so
    # ASSD = D/3 (MedPy's mean of directional means would give D/4) and HD95 interpolates at
    # index 0.95 * 2 = 1.9: 0.9 D (the max of directional 95th percentiles would give 0.95 D).
    spacing = (1.0, 2.0, 3.0)
    truth = np.zeros((5, 5, 5), dtype=bool)
    truth[0, 0, 0] = truth[4, 4, 4] = True
    pred = np.zeros_like(truth)
    pred[0, 0, 0] = True
    d = math.sqrt(16 * (1 + 4 + 9))
    got = volume_metrics(pred, truth, spacing)
    assert got["assd_mm"] == pytest.approx(d / 3)
    assert got["hd95_mm"] == pytest.approx(0.9 * d)


def test_mask_touching_array_border_has_a_surface_there() -> None:
    # T fills the whole 4x4x4 array (outside counts as background: surface = 56-voxel shell);
    # P is T without its last x layer (surface 48 - 4 = 44). P->T: 4 voxels of P's x = 2 face
    # interior are 1 mm (along y/z) from T's shell, the rest 0. T->P: T's x = 3 face, 16 voxels
    # at 2.5 mm (x spacing). Pooled 100 values: ASSD = (4 + 40)/100; HD95 at index 94.05 of
    # 80 x 0, 4 x 1, 16 x 2.5 -> 2.5.
    truth = np.ones((4, 4, 4), dtype=bool)
    pred = truth.copy()
    pred[3] = False
    spacing = (2.5, 1.0, 1.0)
    p2t, t2p = surface_distances(pred, truth, spacing)
    assert sorted(p2t.tolist()) == [0.0] * 40 + [1.0] * 4
    assert sorted(t2p.tolist()) == [0.0] * 40 + [2.5] * 16
    got = volume_metrics(pred, truth, spacing)
    assert got["assd_mm"] == pytest.approx(0.44)
    assert got["hd95_mm"] == pytest.approx(2.5)


@pytest.mark.parametrize(
    "mask",
    [
        box((12, 12, 12), (2, 3, 4), (5, 6, 7)),
        np.ones((4, 4, 4), dtype=bool),
        ball((21, 21, 11), 8.0, ANISO),
    ],
)
def test_identical_masks_have_zero_distance(mask: np.ndarray) -> None:
    got = volume_metrics(mask, mask.copy(), ANISO)
    assert got == {"dice": 1.0, "iou": 1.0, "voe": 0.0, "rvd": 0.0, "assd_mm": 0.0, "hd95_mm": 0.0}


@pytest.mark.parametrize(
    ("shape", "spacing", "r_in", "r_out"),
    [
        ((33, 33, 33), (1.0, 1.0, 1.0), 10.0, 14.0),
        ((61, 61, 61), (0.5, 0.5, 0.5), 10.0, 14.0),
        ((33, 33, 19), (1.0, 1.0, 2.0), 10.0, 14.0),
    ],
)
def test_concentric_spheres_assd_is_radius_difference(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], r_in: float, r_out: float
) -> None:
    # Every point of one sphere is r_out - r_in from the other; voxelisation blurs this by a
    # fraction of a voxel.
    inner = ball(shape, r_in, spacing)
    outer = ball(shape, r_out, spacing)
    got = volume_metrics(inner, outer, spacing)
    assert got["assd_mm"] == pytest.approx(r_out - r_in, abs=0.3)
    assert got["hd95_mm"] == pytest.approx(r_out - r_in, abs=0.5)


# --- empty masks and bad input ---------------------------------------------------------------

INF = math.inf


@pytest.mark.parametrize(
    ("pred_empty", "truth_empty", "exp"),
    [
        (True, True, {"dice": 1.0, "iou": 1.0, "voe": 0.0, "rvd": 0.0, "assd_mm": 0.0,
                      "hd95_mm": 0.0}),
        (True, False, {"dice": 0.0, "iou": 0.0, "voe": 1.0, "rvd": -1.0, "assd_mm": INF,
                       "hd95_mm": INF}),
    ],
)  # fmt: skip
def test_empty_mask_conventions(pred_empty: bool, truth_empty: bool, exp: dict[str, float]) -> None:
    cube = box((6, 6, 6), (1, 1, 1), (3, 3, 3))
    empty = np.zeros_like(cube)
    pred = empty if pred_empty else cube
    truth = empty if truth_empty else cube
    assert volume_metrics(pred, truth, ANISO) == exp
    assert dice(pred, truth) == exp["dice"]


def test_empty_truth_with_prediction() -> None:
    cube = box((6, 6, 6), (1, 1, 1), (3, 3, 3))
    empty = np.zeros_like(cube)
    assert dice(cube, empty) == 0.0
    with pytest.raises(DataError, match="truth: empty reference mask, RVD undefined"):
        volume_metrics(cube, empty, ANISO)


@pytest.mark.parametrize("which", ["pred", "truth"])
def test_surface_distances_refuses_an_empty_mask(which: str) -> None:
    cube = box((6, 6, 6), (1, 1, 1), (3, 3, 3))
    empty = np.zeros_like(cube)
    pred, truth = (empty, cube) if which == "pred" else (cube, empty)
    with pytest.raises(DataError, match=f"{which}: empty mask"):
        surface_distances(pred, truth, ANISO)


def test_volume_metrics_keys_and_types() -> None:
    truth = box((16, 16, 16), (2, 2, 2), (10, 10, 10))
    pred = box((16, 16, 16), (2, 2, 4), (10, 10, 10))
    got = volume_metrics(pred, truth, (1.0, 1.0, 2.0))
    assert list(got) == ["dice", "iou", "voe", "rvd", "assd_mm", "hd95_mm"]
    assert all(type(v) is float for v in got.values())
    assert got["assd_mm"] == pytest.approx(74 / 61)
    assert got["hd95_mm"] == pytest.approx(4.0)


def test_inputs_are_not_modified() -> None:
    truth = box((8, 8, 8), (1, 1, 1), (4, 4, 4)).astype(np.uint8)
    pred = box((8, 8, 8), (2, 1, 1), (4, 4, 4)).astype(np.uint8)
    before = (truth.copy(), pred.copy())
    volume_metrics(pred, truth, ANISO)
    np.testing.assert_array_equal(truth, before[0])
    np.testing.assert_array_equal(pred, before[1])


CUBE = box((6, 6, 6), (1, 1, 1), (3, 3, 3))


@pytest.mark.parametrize(
    ("pred", "truth", "match"),
    [
        (CUBE, CUBE[:, :, :5], r"pred shape \(6, 6, 6\) != truth shape \(6, 6, 5\)"),
        (CUBE[0, 0], CUBE[0, 0], r"pred: expected a 2-D or 3-D mask, got shape \(6,\)"),
        (CUBE[None], CUBE, r"pred: expected a 2-D or 3-D mask, got shape \(1, 6, 6, 6\)"),
        (CUBE, CUBE * 2, r"truth: mask is not binary: values \[2\]"),
        (CUBE * 0.5, CUBE, r"pred: mask is not binary: values \[0.5\]"),
        (np.where(CUBE, np.nan, 0.0), CUBE, r"pred: mask is not binary: values \[nan\]"),
        (CUBE.astype(complex), CUBE, "pred: expected a binary mask, got dtype complex128"),
        (CUBE.astype(str), CUBE, "pred: expected a binary mask, got dtype <U"),
    ],
)
def test_bad_masks_raise(pred: np.ndarray, truth: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        dice(pred, truth)
    with pytest.raises(DataError, match=match.replace("2-D or 3-D", "3-D")):
        volume_metrics(pred, truth, ANISO)


def test_distance_metrics_need_3d_masks() -> None:
    assert dice(A4, A4) == 1.0  # 2-D is fine for overlap metrics
    for fn in (volume_metrics, surface_distances):
        with pytest.raises(DataError, match=r"pred: expected a 3-D mask, got shape \(4, 4\)"):
            fn(A4, A4, (1.0, 1.0))


@pytest.mark.parametrize(
    ("spacing", "match"),
    [
        ((1.0, 1.0), "spacing: expected 3 values \\(one per axis\\), got 2"),
        ((1.0, 1.0, 1.0, 1.0), "spacing: expected 3 values \\(one per axis\\), got 4"),
        ((1.0, 0.0, 1.0), "spacing: every voxel size must be finite and > 0 mm"),
        ((1.0, 1.0, -2.0), "spacing: every voxel size must be finite and > 0 mm"),
        ((1.0, math.nan, 1.0), "spacing: every voxel size must be finite and > 0 mm"),
        ((math.inf, 1.0, 1.0), "spacing: every voxel size must be finite and > 0 mm"),
        (("a", 1.0, 1.0), "spacing: expected 3 numbers in mm"),
        (2.0, "spacing: expected 3 numbers in mm"),
    ],
)
def test_bad_spacing_raises(spacing: object, match: str) -> None:
    for fn in (volume_metrics, surface_distances):
        with pytest.raises(DataError, match=match):
            fn(CUBE, CUBE, spacing)  # type: ignore[arg-type]
