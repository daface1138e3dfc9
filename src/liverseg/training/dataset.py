"""tf.data input pipeline: prepared slices in memory -> shuffled, augmented batches.

Shape contract: images ``(N, H, W, C)`` and masks ``(N, H, W, 1)`` float32 in, batches of the
same shapes out; images are HU-windowed CT in [0, 1] (C = 1, or 3: the slice between its
neighbours), masks 0/1. Augmentation runs per batch, vectorised: geometry (flip,
rotation, zoom) is one affine map per slice applied to image and mask stacked on the channel
axis (bilinear, the mask re-binarised at 0.5, outside pixels 0); intensity and Gaussian blur
touch the image only. Determinism: shuffle order and per-batch augmentation seeds come from
seeded tf.data sources that re-randomise every epoch, and every draw is stateless on that
seed: two datasets with the same ``seed`` yield identical batches, successive epochs differ.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from liverseg.errors import DataError
from liverseg.params import AugmentParams

# Blur sigma per blurred slice (blur_prob is the knob): 0.5-1.0 px mimics sharp vs soft
# reconstruction kernels at ~1-2.5 mm pixels without erasing the liver edge.
BLUR_SIGMA_RANGE = (0.5, 1.0)
MASK_THRESHOLD = 0.5
_N_DRAWS = 8  # independent random streams per batch (see _augment_batch)
_AUGMENT_SEED_OFFSET = 7919


def make_dataset(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    batch_size: int,
    training: bool,
    augment: AugmentParams | None,
    seed: int,
) -> tf.data.Dataset:
    """Batched ``(image, mask)`` dataset over in-memory slices: ``training``, shuffled each
    epoch and augmented (with ``augment``); else in their order, untouched."""
    if images.ndim != 4:
        raise DataError(f"make_dataset: images must be (N, H, W, C), got shape {images.shape}")
    if masks.shape != (*images.shape[:3], 1):
        raise DataError(
            f"make_dataset: masks shape {masks.shape} does not fit images shape {images.shape}"
        )
    if images.shape[0] == 0:
        raise DataError("make_dataset: no slices (N = 0)")
    images, masks = images.astype(np.float32, copy=False), masks.astype(np.float32, copy=False)
    if batch_size < 1:
        raise ValueError(f"make_dataset: batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    ds = tf.data.Dataset.from_tensor_slices((images, masks))
    if not training:
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    if augment is not None:
        # One int64 pair per batch: the stateless seed for every draw in that batch.
        # Offset so this stream is not the shuffle's own random stream (same op seed).
        seeds = tf.data.Dataset.random(
            seed=seed + _AUGMENT_SEED_OFFSET, rerandomize_each_iteration=True
        ).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda batch, s: _augment_batch(batch[0], batch[1], s, augment),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def _augment_batch(
    images: tf.Tensor, masks: tf.Tensor, seed: tf.Tensor, params: AugmentParams
) -> tuple[tf.Tensor, tf.Tensor]:
    """Apply the random augmentations of ``params`` to one batch, one draw per slice."""
    draws = tf.random.experimental.stateless_split(seed, num=_N_DRAWS)
    b = tf.shape(images)[0]
    height = tf.shape(images)[1]
    width = tf.shape(images)[2]

    def uniform(i: int, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([b], draws[i], minval=low, maxval=high)

    # --- geometry: output pixel (x, y) samples input at C + M (out - C), with
    # M = R(angle) F / zoom, C the slice centre, F = diag(-1, 1) when mirrored. Only a
    # left-right flip, only with params.flip: RAS-canonical data never has the spine on top,
    # and a mirror removes the laterality cue that separates liver from spleen (similar HU).
    geometric = params.flip or params.rotate_deg > 0 or params.scale > 0
    if geometric:
        flip_prob = 0.5 if params.flip else 0.0
        mirror = tf.where(uniform(0, 0.0, 1.0) < flip_prob, -1.0, 1.0)
        angle = uniform(1, -params.rotate_deg, params.rotate_deg) * (math.pi / 180.0)
        zoom = uniform(2, 1.0 - params.scale, 1.0 + params.scale)
        cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
        cx = (tf.cast(width, tf.float32) - 1.0) / 2.0
        cy = (tf.cast(height, tf.float32) - 1.0) / 2.0
        a0, a1 = mirror * cos, -sin
        b0, b1 = mirror * sin, cos
        a2 = cx - a0 * cx - a1 * cy
        b2 = cy - b0 * cx - b1 * cy
        zeros = tf.zeros([b])
        transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        stacked = tf.concat([images, masks], axis=-1)
        warped = tf.raw_ops.ImageProjectiveTransformV3(
            images=stacked,
            transforms=transforms,
            output_shape=tf.stack([height, width]),
            fill_value=tf.constant(0.0),
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )
        warped.set_shape(stacked.shape)  # keep the static (H, W) the op cannot infer
        images = warped[..., :-1]
        masks = tf.cast(warped[..., -1:] >= MASK_THRESHOLD, tf.float32)

    # --- intensity: per-slice contrast (gain) and brightness (offset), image only.
    if params.intensity > 0:
        gain = uniform(3, 1.0 - params.intensity, 1.0 + params.intensity)
        offset = uniform(4, -params.intensity, params.intensity)
        images = images * gain[:, None, None, None] + offset[:, None, None, None]
        images = tf.clip_by_value(images, 0.0, 1.0)

    # --- blur: Gaussian with a per-slice sigma on a random subset of slices, image only.
    if params.blur_prob > 0:
        sigma = uniform(5, *BLUR_SIGMA_RANGE)
        blurred = _gaussian_blur(images, sigma, radius=math.ceil(3 * BLUR_SIGMA_RANGE[1]))
        chosen = uniform(6, 0.0, 1.0) < params.blur_prob
        images = tf.where(chosen[:, None, None, None], blurred, images)

    return images, masks


def _gaussian_blur(images: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable Gaussian blur with a ``sigma`` per slice (the batch axis on the channel axis
    gets each its own kernel); reflect padding keeps the border from darkening."""
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-(offsets[None, :] ** 2) / (2.0 * sigma[:, None] ** 2))  # (B, K)
    kernel = kernel / tf.reduce_sum(kernel, axis=1, keepdims=True)
    kernel = tf.transpose(kernel)  # (K, B)
    x = tf.transpose(images, [3, 1, 2, 0])  # (1, H, W, B)
    x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    x = tf.nn.depthwise_conv2d(x, kernel[:, None, :, None], [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, kernel[None, :, :, None], [1, 1, 1, 1], "VALID")
    return tf.transpose(x, [3, 1, 2, 0])
