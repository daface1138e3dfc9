"""Slice preparation (window, resize, selection) and the patient-level splits."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import resize

from liverseg.data.slices import (
    body_box,
    crop_xy,
    nearest_indices,
    prepare_volume,
    resample_matrix,
    resize_to_stack,
    resize_xy,
    select_slices,
    window,
)
from liverseg.data.splits import fold_cases, make_splits, trainval_cases
from liverseg.errors import DataError


@pytest.mark.parametrize(
    ("hu", "expected"),
    [(-1000.0, 0.0), (-100.0, 0.0), (150.0, 0.5), (400.0, 1.0), (3000.0, 1.0)],
)
def test_window_table(hu: float, expected: float) -> None:
    assert window(np.array([hu], np.float32), -100, 400)[0] == pytest.approx(expected)
    assert window(np.array([hu], np.float32), -100, 400).dtype == np.float32


@pytest.mark.parametrize(("n_in", "n_out"), [(512, 96), (96, 512), (10, 10), (7, 3)])
def test_resample_rows_sum_to_one(n_in: int, n_out: int) -> None:
    w = resample_matrix(n_in, n_out)
    assert w.shape == (n_out, n_in)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)


def resize_stack(stack: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W) -> (N, size[0], size[1]) through the (X, Y, Z) volume path."""
    return resize_to_stack(np.moveaxis(stack, 0, 2), size)


def test_identity_resize_is_exact() -> None:
    x = np.random.default_rng(0).random((3, 9, 7)).astype(np.float32)
    np.testing.assert_allclose(resize_stack(x, (9, 7)), x, atol=1e-6)


def test_downsample_by_two_is_pair_average_on_linear_ramp() -> None:
    # A linear ramp stays linear under any normalised symmetric kernel (away from edges).
    ramp = np.tile(np.arange(16, dtype=np.float32), (1, 16, 1))
    out = resize_stack(ramp, (8, 8))
    np.testing.assert_allclose(out[0, 4, 2:6], [4.5, 6.5, 8.5, 10.5], atol=1e-5)


def test_resize_close_to_skimage_antialiased() -> None:
    rng = np.random.default_rng(1)
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(rng.random((128, 128)), 3).astype(np.float32)
    ours = resize_stack(img[None], (32, 32))[0]
    ref = resize(img, (32, 32), order=1, anti_aliasing=True)
    assert np.abs(ours - ref).mean() < 0.01 * (img.max() - img.min())


def test_nearest_mask_resize_keeps_labels() -> None:
    m = np.zeros((1, 8, 8), np.uint8)
    m[0, 2:6, 2:6] = 1
    out = m[0][np.ix_(nearest_indices(8, 4), nearest_indices(8, 4))]
    assert set(np.unique(out)) <= {0, 1}
    np.testing.assert_array_equal(out, m[0, ::2, ::2] | m[0, 1::2, 1::2])
    assert nearest_indices(8, 4).tolist() == [1, 3, 5, 7]


def test_select_slices_keeps_all_liver_and_a_seeded_share() -> None:
    mask = np.zeros((4, 4, 20), np.uint8)
    mask[1, 1, 5:10] = 1
    idx = select_slices(mask, 0.2, np.random.default_rng(3))
    assert set(range(5, 10)) <= set(idx.tolist())
    assert len(idx) == 5 + 3  # 20% of the 15 liver-free slices
    assert len(set(idx.tolist())) == len(idx)  # drawn without replacement
    np.testing.assert_array_equal(idx, select_slices(mask, 0.2, np.random.default_rng(3)))


def test_prepare_volume_shapes_and_ranges() -> None:
    hu = np.full((40, 30, 10), 1000.0)
    hu[:, :, :] = np.linspace(-1000, 1000, 40)[:, None, None]
    mask = np.zeros(hu.shape, np.uint8)
    mask[10:20, 10:20, 3:6] = 1
    img, lab, idx = prepare_volume(
        hu,
        mask,
        window_hu=(-100, 400),
        image_size=16,
        liver_free_fraction=0.0,
        rng=np.random.default_rng(0),
    )
    assert img.shape == lab.shape == (3, 16, 16)
    assert idx.tolist() == [3, 4, 5]
    assert img.dtype == np.float32 and img.min() >= 0.0 and img.max() <= 1.0
    assert lab.dtype == np.uint8 and lab.any()


def test_select_slices_step_keeps_every_kth_slice_from_a_seeded_offset() -> None:
    mask = np.zeros((4, 4, 30), np.uint8)
    mask[1:3, 1:3, 5:25] = 1
    offsets = set()
    for seed in range(12):
        idx = select_slices(mask, 1.0, np.random.default_rng(seed), step=3)
        assert np.all(np.diff(idx) == 3)  # every 3rd slice, liver or not (fraction 1.0)
        assert idx[0] < 3 and idx[-1] >= 27
        offsets.add(int(idx[0]))
    assert offsets == {0, 1, 2}
    # step 1 draws nothing from the generator: the same slices as before the option existed
    a = select_slices(mask, 0.5, np.random.default_rng(3))
    b = select_slices(mask, 0.5, np.random.default_rng(3), step=1)
    assert a.tolist() == b.tolist()
    assert set(range(5, 25)) <= set(a.tolist())


def _counts(n: int) -> dict[str, int]:
    return {f"e{i:02d}": 10 + i for i in range(1, n + 1)}


@pytest.mark.parametrize(("n", "n_test", "k"), [(12, 3, 3), (20, 4, 5), (6, 1, 2)])
def test_splits_are_patient_disjoint_and_complete(n: int, n_test: int, k: int) -> None:
    s = make_splits(_counts(n), n_test=n_test, k_folds=k, seed=7)
    assert len(s["test"]) == n_test and len(s["folds"]) == k
    seen = [c for f in s["folds"] for c in f] + s["test"]
    assert sorted(seen) == sorted(_counts(n))  # every case exactly once
    assert len(seen) == len(set(seen))
    for fold in range(k):
        train, val = fold_cases(s, fold)
        assert not set(train) & set(val)
        assert not (set(train) | set(val)) & set(s["test"])
    assert sorted(trainval_cases(s)) == sorted(set(seen) - set(s["test"]))


def test_splits_are_seeded() -> None:
    a = make_splits(_counts(12), n_test=3, k_folds=3, seed=1)
    assert a == make_splits(_counts(12), n_test=3, k_folds=3, seed=1)
    assert a != make_splits(_counts(12), n_test=3, k_folds=3, seed=2)


def test_too_few_cases() -> None:
    with pytest.raises(DataError, match="need at least n_test \\+ k_folds = 5 patients, have 4"):
        make_splits(_counts(4), n_test=2, k_folds=3, seed=0)


@pytest.mark.parametrize("named", [("e01",), ("e07", "e01"), ("e01", "e02", "e03")])
def test_named_test_cases_are_always_held_out(named: tuple[str, ...]) -> None:
    drawn = set()
    for seed in range(8):
        s = make_splits(_counts(12), n_test=3, k_folds=3, seed=seed, test_cases=named)
        assert set(named) <= set(s["test"]) and len(s["test"]) == 3
        assert not set(named) & set(trainval_cases(s))  # never in any training
        assert sorted(s["test"] + trainval_cases(s)) == sorted(_counts(12))
        drawn.add(tuple(sorted(set(s["test"]) - set(named))))
        assert s == make_splits(_counts(12), n_test=3, k_folds=3, seed=seed, test_cases=named)
    # the rest is drawn (seeded), or nothing when all n_test are named
    assert drawn == {()} if len(named) == 3 else len(drawn) > 1


def test_a_patients_draws_stay_together() -> None:
    """Synthetic draws of one anatomy (``e02``, ``e02-1``, ...) are one patient to the splits."""
    counts = {f"{p}{d}": 10 + i for i, p in enumerate(_counts(12)) for d in ("", "-1", "-2")}
    s = make_splits(counts, n_test=3, k_folds=3, seed=5, test_cases=("e01",))
    assert {"e01", "e01-1", "e01-2"} <= set(s["test"]) and len(s["test"]) == 9
    groups = [s["test"], *s["folds"]]
    assert sorted(c for g in groups for c in g) == sorted(counts)
    for g in groups:  # every split holds all three draws of a patient or none
        assert all({p, f"{p}-1", f"{p}-2"} <= set(g) for p in {c.split("-")[0] for c in g})
    # the patients of the splits are as without draws (same test draw)
    one = make_splits(_counts(12), n_test=3, k_folds=3, seed=5, test_cases=("e01",))
    assert one["test"] == [c for c in s["test"] if "-" not in c]


@pytest.mark.parametrize(
    ("named", "match"),
    [
        (("e01", "e99"), "prepare.test_cases: e99 not in the data set"),
        (("e1",), "prepare.test_cases: e1 not in the data set"),
        (("e01", "e01"), r"prepare.test_cases: \[.e01., .e01.\]: at most 3 distinct"),
        (("e01", "e02", "e03", "e04"), "prepare.test_cases: .*at most 3 distinct"),
    ],
)
def test_bad_test_cases(named: tuple[str, ...], match: str) -> None:
    with pytest.raises(DataError, match=match):
        make_splits(_counts(12), n_test=3, k_folds=3, seed=0, test_cases=named)


def test_resize_to_stack_equals_resize_then_stack() -> None:
    vol = np.random.default_rng(2).random((20, 18, 7)).astype(np.float32)
    idx = np.array([1, 4, 5])
    expected = np.moveaxis(resize_xy(vol, (8, 6))[:, :, idx], 2, 0)
    np.testing.assert_allclose(resize_to_stack(vol, (8, 6), idx), expected, atol=1e-6)
    assert resize_to_stack(vol, (8, 6)).shape == (7, 8, 6)


def test_resize_accepts_flipped_views() -> None:
    # RAS reorientation hands over views with negative strides; the result must not depend on it
    vol = np.random.default_rng(3).random((16, 12, 5)).astype(np.float32)
    flipped = vol[::-1]
    np.testing.assert_allclose(
        resize_xy(flipped, (8, 6)), resize_xy(np.ascontiguousarray(flipped), (8, 6)), atol=1e-6
    )


def _body_on_a_table(shape: tuple[int, int, int] = (120, 100, 6)) -> np.ndarray:
    hu = np.full(shape, -1000.0, np.float32)
    hu[30:91, 20:61, :] = 40.0  # the body: x 30..90, y 20..60
    hu[5:115, 70:74, :] = 200.0  # the table under it: wider than the body, apart from it
    return hu


def test_body_box_is_the_bodys_square_not_the_tables() -> None:
    x0, y0, w, h = body_box(_body_on_a_table(), margin=0.0)
    assert (w, h) == (61, 61)  # the body's width; with the table it would be 110
    assert (x0, x0 + w - 1) == (30, 90)
    assert y0 + (h - 1) / 2 == 40  # centred on the body
    assert body_box(_body_on_a_table(), margin=0.05)[2] == round(60 * 1.1) + 1
    assert body_box(np.full((8, 6, 2), -1000.0, np.float32)) == (0, 0, 8, 6)  # no body


def test_crop_xy_fills_past_the_image_and_keeps_a_whole_image() -> None:
    vol = np.arange(4 * 5 * 2, dtype=np.float32).reshape(4, 5, 2)
    out = crop_xy(vol, (-1, 2, 4, 4), -7.0)
    assert out.shape == (4, 4, 2)
    np.testing.assert_array_equal(out[1:, :3], vol[:3, 2:5])
    assert (out[0] == -7).all() and (out[:, 3:] == -7).all()
    assert crop_xy(vol, (0, 0, 4, 5), 0.0) is vol


def test_prepare_volume_sees_a_body_at_one_scale_whatever_the_field_of_view() -> None:
    hu = _body_on_a_table()
    hu[50:70, 30:45, :] = 120.0
    mask = (hu == 120.0).astype(np.uint8)
    wide = ((60, 60), (50, 50), (0, 0))  # the same body in a field of view twice as wide
    args = {"window_hu": (-100.0, 400.0), "image_size": 32, "liver_free_fraction": 1.0}
    a = prepare_volume(hu, mask, rng=np.random.default_rng(0), **args)
    b = prepare_volume(
        np.pad(hu, wide, constant_values=-1000.0), np.pad(mask, wide),
        rng=np.random.default_rng(0), **args,
    )  # fmt: skip
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    np.testing.assert_array_equal(a[1], b[1])
    assert a[1].any()
