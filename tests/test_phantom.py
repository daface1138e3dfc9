"""Tests of the synthetic abdominal CT phantom (liverseg.data.phantom)."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverseg.data.phantom import generate_case, write_phantom
from liverseg.data.volumes import load_case
from liverseg.params import PhantomParams

DEFAULT = PhantomParams()
CASES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def cases() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Default-size cases, generated once for the whole module (each takes a fraction of 1 s)."""
    return {i: generate_case(i, DEFAULT)[:2] for i in CASES}


def best_threshold_dice(hu: np.ndarray, mask: np.ndarray, step: int = 10) -> float:
    """Best 3-D Dice of ``lo <= hu < hi`` over all lo < hi on a ``step`` HU grid in [-300, 500].

    Counting voxels per HU bin once makes every interval's counts a difference of cumulative
    sums, so the whole grid is searched without thresholding the volume again.
    """
    edges = np.arange(-300, 500 + step, step)
    in_liver, _ = np.histogram(hu[mask > 0], edges)
    everyone, _ = np.histogram(hu, edges)
    cum_liver = np.concatenate([[0], np.cumsum(in_liver)])
    cum_all = np.concatenate([[0], np.cumsum(everyone)])
    lo, hi = np.triu_indices(len(edges), k=1)
    tp = cum_liver[hi] - cum_liver[lo]
    selected = cum_all[hi] - cum_all[lo]
    return float(np.max(2 * tp / (selected + np.count_nonzero(mask))))


# ------------------------------------------------------------------------ the Dice helper itself
@pytest.mark.parametrize(
    ("hu", "mask", "expected"),
    [
        ([100, 105, 110, 200], [1, 1, 1, 0], 1.0),  # [100, 120) is exactly the liver
        ([100, 100, 100, 100], [1, 1, 0, 0], 2 / 3),  # 2*2 / (4 + 2): all or nothing
        ([100, 100, 300], [1, 0, 1], 0.8),  # [100, 310): 2*2 / (3 + 2)
        ([-1000, 50, 50, 60], [0, 1, 0, 0], 2 / 3),  # [50, 60): 2*1 / (2 + 1); -1000 off the grid
    ],
)
def test_best_threshold_dice_on_hand_made_volumes(hu, mask, expected):
    assert best_threshold_dice(np.array(hu, float), np.array(mask)) == pytest.approx(expected)


# ---------------------------------------------------------------------------- determinism
def test_same_seed_and_case_give_identical_volumes():
    params = PhantomParams(size=48, n_slices=16, seed=7)
    hu1, mask1, aff1 = generate_case(3, params)
    hu2, mask2, aff2 = generate_case(3, params)
    np.testing.assert_array_equal(hu1, hu2)
    np.testing.assert_array_equal(mask1, mask2)
    np.testing.assert_array_equal(aff1, aff2)


@pytest.mark.parametrize(
    ("seed_b", "case_b"),
    [(8, 3), (7, 4)],  # another seed, same case; same seed, another case
)
def test_another_seed_or_case_gives_another_volume(seed_b, case_b):
    a = generate_case(3, PhantomParams(size=48, n_slices=16, seed=7))
    b = generate_case(case_b, PhantomParams(size=48, n_slices=16, seed=seed_b))
    assert not np.array_equal(a[0], b[0])
    assert not np.array_equal(a[1], b[1])


def test_negative_case_index_is_refused():
    with pytest.raises(ValueError, match="case_index must be >= 0, got -1"):
        generate_case(-1, DEFAULT)


# ----------------------------------------------------------------------- shapes and geometry
@pytest.mark.parametrize(
    ("size", "n_slices", "spacing"),
    [
        (128, 48, (2.5, 2.5, 4.0)),  # the pipeline's default
        (16, 8, (1.0, 1.0, 1.0)),  # the smallest grid params allow
        (48, 16, (3.0, 2.0, 5.0)),  # anisotropic in-plane spacing
    ],
)
def test_shapes_dtypes_and_affine(size, n_slices, spacing):
    params = PhantomParams(size=size, n_slices=n_slices, spacing=spacing)
    hu, mask, affine = generate_case(0, params)
    assert hu.shape == mask.shape == (size, size, n_slices)
    assert hu.dtype == np.float32
    assert mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 1}
    np.testing.assert_allclose(affine[:3, :3], np.diag(spacing))
    np.testing.assert_allclose(affine[3], [0, 0, 0, 1])
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    # centred: voxel (n-1)/2 sits at the scanner origin
    centre = affine @ np.array([(size - 1) / 2, (size - 1) / 2, (n_slices - 1) / 2, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


@pytest.mark.parametrize(
    ("size", "n_slices", "spacing", "origin"),
    [
        (16, 8, (2.5, 2.5, 4.0), (-18.75, -18.75, -14.0)),  # -(n - 1) / 2 * spacing
        (20, 10, (1.0, 2.0, 3.0), (-9.5, -19.0, -13.5)),
    ],
)
def test_phantom_affine_by_hand(size, n_slices, spacing, origin):
    affine = generate_case(0, PhantomParams(size=size, n_slices=n_slices, spacing=spacing))[2]
    np.testing.assert_allclose(affine[:3, 3], origin)
    np.testing.assert_allclose(np.diag(affine), [*spacing, 1.0])


# ----------------------------------------------------------------------------- writing files
def test_write_phantom_pairs_load_back(tmp_path: Path):
    params = PhantomParams(n_cases=2, size=32, n_slices=8, spacing=(10.0, 10.0, 24.0), seed=3)
    ids = write_phantom(tmp_path / "raw", params)
    assert ids == ["e01", "e02"]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [
        "ircad_e01_liver.nii.gz",
        "ircad_e01_orig.nii.gz",
        "ircad_e02_liver.nii.gz",
        "ircad_e02_orig.nii.gz",
    ]
    for index, case_id in enumerate(ids):
        raw = tmp_path / "raw"
        case = load_case(
            raw / f"ircad_{case_id}_orig.nii.gz",
            raw / f"ircad_{case_id}_liver.nii.gz",
            case_id=case_id,
        )
        hu, mask, affine = generate_case(index, params)
        np.testing.assert_array_equal(case.image.data, np.rint(hu))  # stored as int16 HU
        np.testing.assert_array_equal(case.mask.data, mask)
        np.testing.assert_allclose(case.image.affine, affine)
        assert case.image.spacing == pytest.approx(params.spacing)
        assert nib.load(str(raw / f"ircad_{case_id}_orig.nii.gz")).get_data_dtype() == np.int16
        assert nib.load(str(raw / f"ircad_{case_id}_liver.nii.gz")).get_data_dtype() == np.uint8


# ------------------------------------------------------------------------------- the liver
def test_liver_mean_near_100_and_air_near_minus_1000(cases):
    for i in CASES:
        hu, mask = cases[i]
        assert abs(float(hu[mask > 0].mean()) - 100) < 25
        corner = hu[:8, -8:, :]  # anterior corner on the patient's left: outside the body
        assert abs(float(corner.mean()) + 1000) < 10


def test_liver_only_on_a_middle_z_range(cases):
    n = DEFAULT.n_slices
    for i in CASES:
        _, mask = cases[i]
        slices = np.flatnonzero(mask.any(axis=(0, 1)))
        assert slices.size > n // 3
        np.testing.assert_array_equal(slices, np.arange(slices[0], slices[-1] + 1))  # no gaps
        assert slices[0] >= 3, f"case {i}: liver in the bottom slices"
        assert slices[-1] <= n - 4, f"case {i}: liver in the top slices"


def test_smallest_grid_keeps_liver_free_end_slices():
    for i in range(3):
        _, mask, _ = generate_case(i, PhantomParams(size=16, n_slices=8))
        per_slice = mask.any(axis=(0, 1))
        assert per_slice.any()
        assert not per_slice[0] and not per_slice[-1]


def test_liver_on_the_patients_right_and_anterior(cases):
    size = DEFAULT.size
    for i in CASES:
        _, mask = cases[i]
        liver_x, liver_y, _ = np.argwhere(mask > 0).mean(axis=0)
        assert liver_x > 0.55 * size  # RAS: large x is the patient's right
        assert liver_y > 0.45 * size  # anterior half (y grows towards anterior)


def test_liver_volume_and_position_vary_between_cases(cases):
    masks = [cases[i][1] > 0 for i in CASES]
    volumes = np.array([m.sum() for m in masks], float)
    centroids = np.array([np.argwhere(m).mean(axis=0) for m in masks])
    assert volumes.max() / volumes.min() > 1.1
    spread = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1).max()
    assert spread > 2.0  # voxels
    means = [float(cases[i][0][masks[k]].mean()) for k, i in enumerate(CASES)]
    assert np.ptp(means) > 5.0  # HU


def test_no_hu_threshold_segments_the_liver(cases):
    for i in CASES:
        hu, mask = cases[i]
        assert best_threshold_dice(np.rint(hu), mask) < 0.7, f"case {i}"
    # one threshold for the whole data set is worse still
    pooled_hu = np.concatenate([np.rint(cases[i][0]).ravel() for i in CASES])
    pooled_mask = np.concatenate([cases[i][1].ravel() for i in CASES])
    assert best_threshold_dice(pooled_hu, pooled_mask) < 0.7


def test_default_case_is_fast():
    # a guard against per-voxel Python loops (those take minutes), with room for a busy machine
    best = min(_timed(lambda: generate_case(5, DEFAULT)) for _ in range(3))
    assert best < 2.0


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
