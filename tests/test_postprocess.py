"""Post-processing of predicted masks: largest 3-D component, per-axial-slice hole filling."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy import ndimage

from liverseg.errors import DataError
from liverseg.postprocess import fill_holes, largest_component, postprocess


def box(
    shape: tuple[int, int, int], lo: tuple[int, int, int], size: tuple[int, int, int]
) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))] = 1
    return mask


def ring(shape: tuple[int, int, int], z: slice) -> tuple[np.ndarray, np.ndarray]:
    """A 5x5 square outline at (1..5, 1..5) in slices ``z``, and the same squares filled."""
    filled = np.zeros(shape, dtype=np.uint8)
    filled[1:6, 1:6, z] = 1
    outline = filled.copy()
    outline[2:5, 2:5, z] = 0
    return outline, filled


# --- largest component -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, bool, np.float32])
def test_two_blobs_keep_the_larger(dtype: type) -> None:
    big = box((12, 12, 12), (0, 0, 0), (4, 4, 4))  # 64 voxels
    small = box((12, 12, 12), (8, 8, 8), (3, 3, 3))  # 27 voxels
    out = largest_component((big | small).astype(dtype))
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, big.astype(dtype))


@pytest.mark.parametrize(
    ("second_lo", "kept_voxels"),
    [
        # Corner-to-corner contact with the 2x2x2 cube at the origin: 26-connected, one organ.
        ((2, 2, 2), 8 + 27),
        # Edge contact only (touching along z at x = 2, y = 2 with no face shared).
        ((2, 2, 0), 8 + 27),
        # One empty voxel between them along x: separate, the 27-voxel cube wins.
        ((3, 0, 0), 27),
    ],
)
def test_full_connectivity_keeps_diagonally_touching_parts(
    second_lo: tuple[int, int, int], kept_voxels: int
) -> None:
    mask = box((8, 8, 8), (0, 0, 0), (2, 2, 2)) | box((8, 8, 8), second_lo, (3, 3, 3))
    assert int(largest_component(mask).sum()) == kept_voxels


def test_tie_keeps_the_first_component_in_index_order() -> None:
    first = box((10, 10, 10), (0, 0, 0), (2, 2, 2))
    second = box((10, 10, 10), (6, 6, 6), (2, 2, 2))
    np.testing.assert_array_equal(largest_component(first | second), first)


def test_single_component_is_unchanged_and_a_copy() -> None:
    mask = box((6, 6, 6), (1, 1, 1), (3, 2, 4))
    out = largest_component(mask)
    np.testing.assert_array_equal(out, mask)
    assert out is not mask
    out[0, 0, 0] = 1
    assert mask[0, 0, 0] == 0


# --- hole filling ----------------------------------------------------------------------------


def test_ring_in_axial_slices_is_filled() -> None:
    outline, filled = ring((7, 7, 5), slice(1, 4))
    out = fill_holes(outline)
    np.testing.assert_array_equal(out, filled)
    assert int(out.sum()) == 3 * 25  # 3 slices of 16-voxel outline + 9-voxel hole


def test_tube_open_at_both_z_ends_is_filled_per_slice() -> None:
    # A vessel running through the organ from top to bottom: in 3-D its lumen reaches the array
    # border at z = 0 and z = last, so a 3-D fill leaves it; every axial slice encloses it.
    outline, filled = ring((7, 7, 6), slice(None))
    assert int(ndimage.binary_fill_holes(outline).sum()) == int(outline.sum())  # 3-D misses it
    np.testing.assert_array_equal(fill_holes(outline), filled)


def test_hole_open_at_one_z_end_is_filled() -> None:
    # A cup: a closed bottom slice and rings above it, open at the top of the array.
    outline, filled = ring((7, 7, 6), slice(1, 6))
    outline[1:6, 1:6, 1] = 1
    np.testing.assert_array_equal(fill_holes(outline), filled)


def test_ring_with_a_gap_is_not_filled() -> None:
    outline, _ = ring((7, 7, 3), slice(None))
    outline[3, 1, :] = 0  # a gap in the wall connects the inside to the outside in-plane
    np.testing.assert_array_equal(fill_holes(outline), outline)


def test_diagonally_closed_ring_is_a_hole() -> None:
    # A diamond outline |x-3| + |y-3| = 2 (8 pixels touching only at corners): the foreground is
    # 8-connected in-plane, so the background is 4-connected and the 5 pixels inside
    # (|x-3| + |y-3| < 2) are a hole.
    x, y = np.indices((7, 7))
    l1 = np.abs(x - 3) + np.abs(y - 3)
    outline = np.repeat((l1 == 2)[:, :, None], 2, axis=2).astype(np.uint8)
    out = fill_holes(outline)
    assert int(outline[:, :, 0].sum()) == 8
    np.testing.assert_array_equal(out, np.repeat((l1 <= 2)[:, :, None], 2, axis=2))
    assert int(out[:, :, 0].sum()) == 13


def test_holes_in_different_slices_do_not_interact() -> None:
    # Slice 0: ring (hole filled); slice 1: C-shape with a gap (not filled), even though the
    # slice above encloses the same pixels.
    outline, filled = ring((7, 7, 2), slice(None))
    outline[3, 1, 1] = 0
    expected = filled.copy()
    expected[:, :, 1] = outline[:, :, 1]
    np.testing.assert_array_equal(fill_holes(outline), expected)


# --- combined and edge cases -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("largest", "fill", "exp_voxels"),
    [
        # Organ: 5x5 rings over 4 slices = 4 * 16 = 64 voxels (filled: 100); blob: 8 voxels.
        (False, False, 64 + 8),
        (True, False, 64),
        (False, True, 100 + 8),
        (True, True, 100),
    ],
)
def test_postprocess_applies_the_chosen_steps(largest: bool, fill: bool, exp_voxels: int) -> None:
    organ, _ = ring((12, 12, 6), slice(1, 5))
    mask = organ | box((12, 12, 6), (9, 9, 0), (2, 2, 2))
    before = mask.copy()
    out = postprocess(mask, largest=largest, fill=fill)
    assert int(out.sum()) == exp_voxels
    assert out.dtype == mask.dtype
    np.testing.assert_array_equal(mask, before)  # input untouched


@pytest.mark.parametrize("fn", [largest_component, fill_holes])
def test_empty_stays_empty(fn: Callable[[np.ndarray], np.ndarray]) -> None:
    empty = np.zeros((5, 6, 7), dtype=np.uint8)
    out = fn(empty)
    assert out.shape == (5, 6, 7)
    assert out.dtype == np.uint8
    assert not out.any()
    assert not postprocess(empty, largest=True, fill=True).any()


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.zeros((4, 4), dtype=np.uint8), r"mask: expected a 3-D \(x, y, z\) mask, got shape"),
        (np.zeros((1, 4, 4, 4), dtype=np.uint8), r"mask: expected a 3-D \(x, y, z\) mask"),
        (np.full((4, 4, 4), 2, dtype=np.uint8), r"mask: mask is not binary: values \[2\]"),
        (np.full((4, 4, 4), 0.7), r"mask: mask is not binary: values \[0.7\]"),
    ],
)
def test_bad_masks_raise(mask: np.ndarray, match: str) -> None:
    for fn in (largest_component, fill_holes):
        with pytest.raises(DataError, match=match):
            fn(mask)
    with pytest.raises(DataError, match=match):
        postprocess(mask, largest=False, fill=False)
