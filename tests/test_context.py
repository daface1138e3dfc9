"""2.5-D input (prepare.context_mm): a slice and its neighbours as channels, the same way in
prepare, training and inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from liverseg.data.slices import context_offsets, prepare_volume, stack_channels


def _z_ramp(z: int, size: int = 8) -> np.ndarray:
    """(size, size, z) volume whose slice k holds the value k everywhere."""
    return np.broadcast_to(np.arange(z, dtype=np.float32), (size, size, z)).copy()


def test_offsets_are_in_slices_of_the_scan_thickness() -> None:
    np.testing.assert_array_equal(context_offsets(0.0, 2.0), [0.0])
    np.testing.assert_allclose(context_offsets(5.0, 2.0), [-2.5, 0.0, 2.5])
    np.testing.assert_allclose(context_offsets(5.0, 5.0), [-1.0, 0.0, 1.0])
    # independent slices (no thickness known): each slice is its own neighbour
    np.testing.assert_array_equal(context_offsets(5.0, None), [0.0, 0.0, 0.0])


def test_neighbours_are_interpolated_and_clamped_to_the_volume() -> None:
    vol = _z_ramp(10)
    out = stack_channels(vol, np.array([0, 4, 9]), np.array([-2.5, 0.0, 2.5], np.float32))
    assert out.shape == (3, 8, 8, 3)
    np.testing.assert_allclose(out[:, 0, 0, :], [[0, 0, 2.5], [1.5, 4, 6.5], [6.5, 9, 9]])
    # one channel at offset 0 is the slice itself, exactly
    same = stack_channels(vol, np.arange(10), np.zeros(1, np.float32))
    np.testing.assert_array_equal(same[..., 0], np.moveaxis(vol, 2, 0))


def test_prepare_keeps_the_2d_image_as_the_middle_channel() -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-200, 500, (32, 32, 12)).astype(np.float32)
    mask = np.zeros(hu.shape, np.uint8)
    mask[8:20, 8:20, 3:9] = 1
    kw = {"window_hu": (-100.0, 400.0), "image_size": 16, "liver_free_fraction": 1.0}
    flat, m2, idx2 = prepare_volume(hu, mask, rng=np.random.default_rng(1), **kw)
    deep, m3, idx3 = prepare_volume(
        hu, mask, rng=np.random.default_rng(1), offsets=context_offsets(4.0, 2.0), **kw
    )
    assert flat.shape == (12, 16, 16) and deep.shape == (12, 16, 16, 3)
    np.testing.assert_array_equal(idx2, idx3)
    np.testing.assert_array_equal(m2, m3)
    np.testing.assert_allclose(deep[..., 1], flat, atol=1e-6)
    # channel 0 of slice k is slice k - 2 (4 mm below at 2 mm slices), clamped at the bottom
    np.testing.assert_allclose(deep[5, ..., 0], flat[3], atol=1e-6)
    np.testing.assert_allclose(deep[0, ..., 0], flat[0], atol=1e-6)
    np.testing.assert_allclose(deep[5, ..., 2], flat[7], atol=1e-6)


def _difference_net():  # type: ignore[no-untyped-def]
    """A 1x1 convolution on 3 channels: liver where the slice above is brighter than the one
    below (channel 2 - channel 0 > 0.1 in window units)."""
    import keras

    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights(
        [
            np.array([-100.0, 0.0, 100.0], np.float32).reshape(1, 1, 3, 1),
            np.array([-10.0], np.float32),
        ]
    )
    return model


def test_a_saved_25d_model_sees_the_neighbours_of_each_slice(tmp_path: Path) -> None:
    from liverseg.inference import Segmenter
    from liverseg.model.folder import save_model_dir

    folder = save_model_dir(tmp_path / "m", _difference_net(), (-100, 400), 16, context_mm=6.0)
    seg = Segmenter.from_dir(folder)
    assert seg.context_mm == 6.0
    # HU rises by 20 per slice from slice 5 on: at 3 mm slices the neighbours 6 mm away differ
    # by 40-80 HU (0.08-0.16 of the window) where the ramp is, by 0 below it.
    hu = np.zeros((16, 16, 12), np.float32)
    hu[..., 5:] = 20.0 * np.arange(1, 8)
    mask = seg.predict_ras(hu, slice_mm=3.0).mask
    diff = np.array([hu[0, 0, min(k + 2, 11)] - hu[0, 0, max(k - 2, 0)] for k in range(12)])
    np.testing.assert_array_equal(mask[0, 0], diff / 500 > 0.1)
    assert mask.any() and not mask.all()
    # without a slice thickness each slice is its own neighbour: no difference, no liver
    assert not seg.predict_ras(hu).mask.any()


def test_a_25d_dataset_augments_image_channels_together() -> None:
    from liverseg.params import AugmentParams
    from liverseg.training.dataset import make_dataset

    images = np.repeat(_z_ramp(4, 16).transpose(2, 0, 1)[..., None] / 4, 3, axis=-1)
    masks = np.zeros((4, 16, 16, 1), np.float32)
    masks[:, 4:12, 4:12] = 1
    ds = make_dataset(
        images,
        masks,
        batch_size=2,
        training=True,
        augment=AugmentParams(rotate_deg=20, scale=0.1, intensity=0.1, blur_prob=1.0),
        seed=0,
    )
    for x, y in ds:
        assert x.shape == (2, 16, 16, 3) and y.shape == (2, 16, 16, 1)
        x = x.numpy()
        # the three channels were equal and stay equal: one warp, gain and blur per slice
        np.testing.assert_allclose(x[..., 0], x[..., 2], atol=1e-6)
        assert set(np.unique(y.numpy())) <= {0.0, 1.0}
    with pytest.raises(Exception, match="does not fit"):
        make_dataset(images, masks[..., :8, :], batch_size=2, training=False, augment=None, seed=0)


def test_training_builds_a_3_channel_unet_from_3_channel_slices() -> None:
    from liverseg.params import ModelParams, ModelSpec
    from liverseg.training.crossval import ensemble
    from liverseg.training.fit import fit

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 16, 16, 3)).astype(np.float32)
    y = (x[..., 1:2] > 0.5).astype(np.float32)
    spec = ModelSpec(model=ModelParams(depth=2, base_filters=4))
    res = fit((x, y), None, spec, learning_rate=1e-2, batch_size=4, epochs=1, seed=0)
    assert res.model.inputs[0].shape[-1] == 3
    both = ensemble([res.model, res.model])
    assert both.inputs[0].shape[-1] == 3
    np.testing.assert_allclose(
        both.predict(x, verbose=0), res.model.predict(x, verbose=0), atol=1e-6
    )


def test_batches_read_their_neighbours_across_batch_edges() -> None:
    """Each batch resizes only its slices and the neighbours they reach: the same output as one
    batch over the whole volume (float rounding of the interpolation weights aside)."""
    from liverseg.inference import Segmenter

    hu = np.random.default_rng(0).uniform(-100, 400, (16, 16, 23)).astype(np.float32)
    kw = {"window_hu": (-100, 400), "image_size": 16, "context_mm": 6.0}
    whole = Segmenter(_difference_net(), batch_size=32, **kw)
    small = Segmenter(_difference_net(), batch_size=3, **kw)
    for slice_mm in (1.7, 3.0):
        a = whole.predict_ras(hu, slice_mm=slice_mm, probabilities=True).probabilities
        b = small.predict_ras(hu, slice_mm=slice_mm, probabilities=True).probabilities
        np.testing.assert_allclose(a, b, atol=1e-4)
