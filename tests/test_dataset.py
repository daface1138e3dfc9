"""tf.data pipeline: image/mask alignment under augmentation, determinism, prepared files."""

from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from liverseg.data.prepared import load_prepared
from liverseg.errors import DataError
from liverseg.params import AugmentParams
from liverseg.training.dataset import make_dataset

H, W = 32, 48  # non-square, to catch swapped axes in the affine transform
NO_AUG = {"flip": False, "rotate_deg": 0.0, "scale": 0.0, "intensity": 0.0, "blur_prob": 0.0}


@pytest.fixture(autouse=True)
def _seed() -> None:
    keras.utils.set_random_seed(1234)


def _masks(n: int, seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    """Distinct off-centre ellipse + rectangle masks, (n, h, w, 1) float32 0/1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy = rng.uniform(0.25 * h, 0.5 * h, (n, 1, 1))
    cx = rng.uniform(0.2 * w, 0.45 * w, (n, 1, 1))
    ry = rng.uniform(0.12 * h, 0.22 * h, (n, 1, 1))
    rx = rng.uniform(0.15 * w, 0.25 * w, (n, 1, 1))
    ellipse = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    top = rng.integers(h // 2, h - 6, (n, 1, 1))
    left = rng.integers(w // 2, w - 8, (n, 1, 1))
    rect = (yy >= top) & (yy < top + 4) & (xx >= left) & (xx < left + 6)
    return (ellipse | rect).astype(np.float32)[..., None]


def _epoch(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    batches = list(ds.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _match(out_mask: np.ndarray, masks: np.ndarray) -> int:
    """Index of the input mask equal to ``out_mask``, or -1."""
    hits = np.flatnonzero(np.all(masks == out_mask[None], axis=(1, 2, 3)))
    return int(hits[0]) if hits.size else -1


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


# --------------------------------------------------------------------------- augmentation
def test_geometric_augmentation_moves_image_and_mask_together() -> None:
    masks = _masks(50)
    images = masks.copy()  # image = mask: after augmentation they must still coincide
    aug = AugmentParams(flip=True, rotate_deg=25.0, scale=0.2, intensity=0.0, blur_prob=0.0)
    ds = make_dataset(images, masks, batch_size=8, training=True, augment=aug, seed=3)
    out_img, out_mask = _epoch(ds)
    assert out_img.shape == out_mask.shape == (50, H, W, 1)
    ious = [_iou(m > 0.5, i > 0.5) for i, m in zip(out_img, out_mask, strict=True)]
    assert min(ious) > 0.95
    # the augmentation really moved things: few outputs equal an input mask exactly
    unchanged = sum(_match(m, masks) >= 0 for m in out_mask)
    assert unchanged < 10


def test_flip_mirrors_image_and_mask_identically() -> None:
    masks = _masks(50)
    texture = np.random.default_rng(1).random(masks.shape, dtype=np.float32)
    images = 0.5 * texture + 0.5 * masks  # image differs from mask but shares its layout
    aug = AugmentParams(**{**NO_AUG, "flip": True})
    ds = make_dataset(images, masks, batch_size=16, training=True, augment=aug, seed=5)
    out_img, out_mask = _epoch(ds)
    kinds = []
    for img, msk in zip(out_img, out_mask, strict=True):
        i = _match(msk, masks)
        if i >= 0:
            np.testing.assert_allclose(img, images[i], atol=1e-6)
            kinds.append("same")
        else:
            j = _match(msk[:, ::-1], masks)
            assert j >= 0, "output mask is neither an input mask nor its left-right mirror"
            np.testing.assert_allclose(img, images[j][:, ::-1], atol=1e-6)
            kinds.append("mirrored")
    assert 10 < kinds.count("mirrored") < 40  # p = 0.5 per slice


def test_intensity_changes_image_only() -> None:
    masks = _masks(30)
    images = 0.2 + 0.5 * masks + 0.1 * np.random.default_rng(2).random(masks.shape, np.float32)
    aug = AugmentParams(**{**NO_AUG, "intensity": 0.3})
    ds = make_dataset(images, masks, batch_size=8, training=True, augment=aug, seed=1)
    out_img, out_mask = _epoch(ds)
    assert out_img.min() >= 0.0 and out_img.max() <= 1.0
    for img, msk in zip(out_img, out_mask, strict=True):
        i = _match(msk, masks)
        assert i >= 0, "mask changed by an intensity-only augmentation"
        assert not np.allclose(img, images[i])
        # out = clip(gain * in + offset): recover gain/offset from unclipped pixels
        inside = (img > 0) & (img < 1)
        gain, offset = np.polyfit(images[i][inside], img[inside], 1)
        assert 0.7 - 1e-4 <= gain <= 1.3 + 1e-4
        assert -0.3 - 1e-4 <= offset <= 0.3 + 1e-4


@pytest.mark.parametrize(("blur_prob", "low", "high"), [(1.0, 30, 30), (0.5, 5, 25), (0.0, 0, 0)])
def test_blur_changes_image_only(blur_prob: float, low: int, high: int) -> None:
    masks = _masks(30)
    images = masks.copy()  # sharp edges: blur lowers the gradient energy
    aug = AugmentParams(**{**NO_AUG, "blur_prob": blur_prob})
    ds = make_dataset(images, masks, batch_size=8, training=True, augment=aug, seed=2)
    out_img, out_mask = _epoch(ds)
    n_blurred = 0
    for img, msk in zip(out_img, out_mask, strict=True):
        i = _match(msk, masks)
        assert i >= 0, "mask changed by blur"
        if np.allclose(img, images[i]):
            continue
        n_blurred += 1
        energy_in = (np.diff(images[i], axis=1) ** 2).sum()
        assert (np.diff(img, axis=1) ** 2).sum() < 0.7 * energy_in
        assert img.sum() == pytest.approx(images[i].sum(), rel=0.02)  # blur keeps the mass
    assert low <= n_blurred <= high


def test_default_augmentation_keeps_contract() -> None:
    masks = _masks(40)
    images = np.clip(masks * 0.6 + np.random.default_rng(3).random(masks.shape), 0, 1)
    ds = make_dataset(
        images.astype(np.float32),
        masks,
        batch_size=16,
        training=True,
        augment=AugmentParams(),
        seed=0,
    )
    for _ in range(2):
        out_img, out_mask = _epoch(ds)
        assert set(np.unique(out_mask)) <= {0.0, 1.0}
        assert out_img.dtype == out_mask.dtype == np.float32
        assert out_img.min() >= 0.0 and out_img.max() <= 1.0
        assert out_mask.sum() > 0.5 * masks.sum()  # the liver did not leave the slice


@pytest.mark.parametrize(("n", "batch", "sizes"), [(10, 4, [4, 4, 2]), (8, 8, [8]), (3, 5, [3])])
def test_batch_sizes(n: int, batch: int, sizes: list[int]) -> None:
    masks = _masks(n)
    for training in (True, False):
        ds = make_dataset(
            masks, masks, batch_size=batch, training=training, augment=AugmentParams(), seed=0
        )
        assert [b[0].shape[0] for b in ds.as_numpy_iterator()] == sizes


# ---------------------------------------------------------------------------- determinism
def _two_epochs(seed: int, masks: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    keras.utils.set_random_seed(1234)
    ds = make_dataset(
        masks * 0.8, masks, batch_size=8, training=True, augment=AugmentParams(), seed=seed
    )
    return [_epoch(ds) for _ in range(2)]


def test_same_seed_same_batches_epochs_differ() -> None:
    masks = _masks(24)
    run1, run2, other = _two_epochs(7, masks), _two_epochs(7, masks), _two_epochs(8, masks)
    for (i1, m1), (i2, m2) in zip(run1, run2, strict=True):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(m1, m2)
    assert not np.array_equal(run1[0][0], run1[1][0])  # reshuffled + re-augmented per epoch
    assert not np.array_equal(run1[0][0], other[0][0])


def test_not_training_is_ordered_and_untouched() -> None:
    masks = _masks(20)
    images = np.random.default_rng(4).random(masks.shape, dtype=np.float32)
    ds = make_dataset(images, masks, batch_size=6, training=False, augment=AugmentParams(), seed=0)
    for _ in range(2):
        out_img, out_mask = _epoch(ds)
        np.testing.assert_array_equal(out_img, images)
        np.testing.assert_array_equal(out_mask, masks)


def test_training_without_augment_only_shuffles() -> None:
    masks = _masks(20)
    ds = make_dataset(masks * 0.5, masks, batch_size=6, training=True, augment=None, seed=0)
    out_img, out_mask = _epoch(ds)
    order = [_match(m, masks) for m in out_mask]
    assert sorted(order) == list(range(20))  # a permutation: nothing altered, nothing lost
    assert order != list(range(20))
    np.testing.assert_array_equal(out_img, masks[order] * 0.5)


@pytest.mark.parametrize(
    ("img_shape", "mask_shape", "match"),
    [
        ((4, H, W), (4, H, W), r"\(N, H, W, C\)"),
        ((4, H, W, 3), (4, H, W, 3), "does not fit"),
        ((4, H, W, 1), (4, H, W + 1, 1), "does not fit"),
        ((0, H, W, 1), (0, H, W, 1), "no slices"),
    ],
)
def test_make_dataset_rejects_bad_arrays(
    img_shape: tuple[int, ...], mask_shape: tuple[int, ...], match: str
) -> None:
    with pytest.raises(DataError, match=match):
        make_dataset(
            np.zeros(img_shape, np.float32),
            np.zeros(mask_shape, np.float32),
            batch_size=2,
            training=True,
            augment=None,
            seed=0,
        )


def test_augmentation_epoch_is_fast() -> None:
    """300 slices 96x96, batch 16, default augmentation: one epoch well under a second here."""
    masks = _masks(300, h=96, w=96)
    ds = make_dataset(masks, masks, batch_size=16, training=True, augment=AugmentParams(), seed=0)
    _epoch(ds)  # trace the map function once
    start = time.perf_counter()
    _epoch(ds)
    elapsed = time.perf_counter() - start
    print(f"augmented epoch of 300 slices 96x96 (batch 16): {elapsed:.3f} s")
    assert elapsed < 5.0


# ---------------------------------------------------------------------------- load_prepared
def _write_case(root: Path, case_id: str, n: int, value: float, size: int = 8, **extra: object):
    (root / "cases").mkdir(parents=True, exist_ok=True)
    arrays = {
        "image": np.full((n, size, size), value, np.float32),
        "mask": (np.arange(n * size * size).reshape(n, size, size) % 2).astype(np.uint8),
    }
    arrays.update(extra)  # type: ignore[arg-type]
    np.savez(root / "cases" / f"{case_id}.npz", **arrays)


def test_load_prepared_concatenates_in_order(tmp_path: Path) -> None:
    _write_case(tmp_path, "case_a", 2, 0.25)
    _write_case(tmp_path, "case_b", 3, 0.75)
    images, masks = load_prepared(tmp_path, ["case_b", "case_a"])
    assert images.shape == masks.shape == (5, 8, 8, 1)
    assert images.dtype == masks.dtype == np.float32
    np.testing.assert_array_equal(images[:, 0, 0, 0], [0.75, 0.75, 0.75, 0.25, 0.25])
    assert set(np.unique(masks)) == {0.0, 1.0}


def test_load_prepared_missing_case(tmp_path: Path) -> None:
    _write_case(tmp_path, "case_a", 2, 0.25)
    with pytest.raises(DataError, match=r"case_zz\.npz.*not found"):
        load_prepared(tmp_path, ["case_a", "case_zz"])


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"image": np.zeros((2, 8, 8), np.float32)}, r"missing key\(s\) \['mask'\]"),
        (
            {"image": np.zeros((2, 8, 8), np.float32), "mask": np.zeros((3, 8, 8), np.uint8)},
            r"must be \(n, H, W",
        ),
        (
            {"image": np.zeros((8, 8), np.float32), "mask": np.zeros((8, 8), np.uint8)},
            r"must be \(n, H, W",
        ),
        (
            {"image": np.zeros((1, 8, 8), np.float32), "mask": np.full((1, 8, 8), 2, np.uint8)},
            "0/1",
        ),
    ],
)
def test_load_prepared_bad_content(tmp_path: Path, arrays: dict, match: str) -> None:
    (tmp_path / "cases").mkdir()
    np.savez(tmp_path / "cases" / "bad.npz", **arrays)
    with pytest.raises(DataError, match=f"bad.npz.*{match}"):
        load_prepared(tmp_path, ["bad"])


def test_load_prepared_unreadable_and_pickled(tmp_path: Path) -> None:
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz.*not a readable"):
        load_prepared(tmp_path, ["junk"])
    objects = np.array([{"a": 1}], dtype=object)
    np.savez(tmp_path / "cases" / "pickled.npz", image=objects, mask=objects)
    with pytest.raises(DataError, match=r"pickled\.npz.*not a readable"):
        load_prepared(tmp_path, ["pickled"])


def test_load_prepared_size_mismatch(tmp_path: Path) -> None:
    _write_case(tmp_path, "case_a", 2, 0.25, size=8)
    _write_case(tmp_path, "case_b", 2, 0.25, size=16)
    with pytest.raises(DataError, match=r"case_b\.npz.*slice shape"):
        load_prepared(tmp_path, ["case_a", "case_b"])


def test_load_prepared_no_cases(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no case ids"):
        load_prepared(tmp_path, [])
