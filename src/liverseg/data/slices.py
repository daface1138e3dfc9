"""From RAS volumes to model-ready 2D slices: body crop, HU window, scaling, resizing, slice
selection.

Contract: a volume is (X, Y, Z) in RAS (see :mod:`liverseg.data.volumes`); a stack of slices
is (N, H, W) with slice n = ``volume[:, :, k_n]``, so H runs along x and W along y. CT slices
are float32 windowed then scaled to [0, 1]; masks are uint8 0/1.

Resizing is separable linear resampling written as two sparse matrix products over the whole
volume (each output pixel reads only the few input pixels under its kernel), instead of a
Python loop of per-slice ``resize`` calls. The weights are a triangle (bilinear) kernel widened
by the down-sampling factor, i.e. anti-aliased like ``skimage.transform.resize(anti_aliasing=
True)`` or PIL's bilinear filter.

The in-plane crop (:func:`body_box`) is a square around the body: the network sees a body at
about the same scale in every scan, whatever its field of view (benchmarks/README.md, "Body
crop").
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.sparse as sp
from scipy import ndimage as ndi

# An in-plane box (x0, y0, width, height) in voxels; it may reach past the image.
Box = tuple[int, int, int, int]
AIR_HU = -1024.0


def window(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip a float32 HU array the caller owns to [low, high] and scale it to [0, 1], in place.

    The liver window keeps soft-tissue contrast (liver vs. spleen vs. lesions); air and bone
    saturate to 0 and 1, so a raw HU value never wraps around as the notebook's uint8 cast did.
    """
    np.clip(x, low, high, out=x)
    x -= np.float32(low)
    x *= np.float32(1.0 / (high - low))
    return x


@lru_cache(maxsize=64)
def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of anti-aliased linear resampling along one axis.

    Pixel centres are aligned (``align_corners=False``): output pixel i sits at input
    coordinate (i + 0.5) * n_in / n_out - 0.5. Rows sum to 1, so edges are clamped.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    dist = np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support
    w = np.clip(1.0 - dist, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    w = w.astype(np.float32)
    w.flags.writeable = False
    return w


@lru_cache(maxsize=64)
def _sparse_matrix(n_in: int, n_out: int) -> sp.csr_matrix:
    return sp.csr_matrix(resample_matrix(n_in, n_out))


def _resize_yxz(volume: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Both passes over an (X, Y, Z) volume; the result is laid out (size[1], size[0], Z).

    The x pass is one sparse product over a reshaped view of the volume (no copy when it is
    C-contiguous), the y pass one over the transposed, already smaller, result.
    """
    x, y, z = volume.shape
    ox, oy = size
    vol = np.ascontiguousarray(volume, dtype=np.float32)
    a = (_sparse_matrix(x, ox) @ vol.reshape(x, y * z)).reshape(ox, y, z)
    b = np.ascontiguousarray(a.transpose(1, 0, 2)).reshape(y, ox * z)
    return np.asarray(_sparse_matrix(y, oy) @ b, dtype=np.float32).reshape(oy, ox, z)


def resize_xy(volume: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the first two axes of an (X, Y, Z) float volume: (size[0], size[1], Z) float32."""
    return np.ascontiguousarray(_resize_yxz(volume, size).transpose(1, 0, 2))


def resize_to_stack(
    volume: np.ndarray, size: tuple[int, int], indices: np.ndarray | None = None
) -> np.ndarray:
    """Resize an (X, Y, Z) volume's axial slices (all, or those at ``indices``) straight into a
    (N, size[0], size[1]) stack: one copy from the resampled volume to the stack layout."""
    c = _resize_yxz(volume, size)
    if indices is not None:
        c = c[:, :, indices]
    return np.ascontiguousarray(c.transpose(2, 1, 0))


def body_box(hu: np.ndarray, body_hu: float = -500.0, margin: float = 0.04) -> Box:
    """The square around the body of an (X, Y, Z) CT in HU, centred on it, with a ``margin``
    of its size on each side. The body is the largest connected region above ``body_hu`` in
    the scan's projection along z (so not the table); a scan without one gives the image."""
    labels, n = ndi.label((hu > body_hu).any(axis=2))
    if n == 0:
        return 0, 0, hu.shape[0], hu.shape[1]
    xs, ys = np.nonzero(labels == 1 + np.argmax(np.bincount(labels.ravel())[1:]))
    side = round(max(np.ptp(xs), np.ptp(ys)) * (1 + 2 * margin)) + 1
    x0 = round((xs.min() + xs.max() - side) / 2)
    return x0, round((ys.min() + ys.max() - side) / 2), side, side


Slices = tuple[slice, slice]


def box_overlap(box: Box, shape: tuple[int, ...]) -> tuple[Slices, Slices]:
    """Where ``box`` and an image of ``shape`` overlap: (its slices in the image, in the box)."""
    x0, y0, w, h = box
    sx = slice(max(x0, 0), min(x0 + w, shape[0]))
    sy = slice(max(y0, 0), min(y0 + h, shape[1]))
    return (sx, sy), (slice(sx.start - x0, sx.stop - x0), slice(sy.start - y0, sy.stop - y0))


def crop_xy(volume: np.ndarray, box: Box, fill: float) -> np.ndarray:
    """The ``box`` of an (X, Y, ...) volume, ``fill`` where it reaches past the volume (the
    volume itself when the box is the whole image)."""
    if box == (0, 0, *volume.shape[:2]):
        return volume
    out = np.full((box[2], box[3], *volume.shape[2:]), fill, volume.dtype)
    image_part, box_part = box_overlap(box, volume.shape)
    out[box_part] = volume[image_part]
    return out


def context_offsets(context_mm: float, slice_mm: float | None) -> np.ndarray:
    """Where a slice's channels sit along z, in slices from it: ``[0]`` (2-D), or
    ``[-d, 0, +d]`` with d = ``context_mm / slice_mm`` (the neighbours ``context_mm`` below and
    above, whatever the slice thickness). Without a ``slice_mm`` (independent slices), a slice
    is its own neighbour."""
    if context_mm <= 0:
        return np.zeros(1, np.float32)
    d = context_mm / slice_mm if slice_mm else 0.0
    return np.array([-d, 0.0, d], np.float32)


def stack_channels(small: np.ndarray, index: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``(N, H, W, C)`` from an ``(H, W, Z)`` volume: for slice ``index[n]``, channel c is the
    volume at z = index[n] + offsets[c], linearly interpolated and clamped to the volume."""
    z = np.clip(np.asarray(index, np.float32)[:, None] + offsets[None, :], 0, small.shape[2] - 1)
    lo = np.floor(z).astype(np.intp)
    hi = np.minimum(lo + 1, small.shape[2] - 1)
    w = (z - lo).astype(np.float32)
    out = small[:, :, lo] * (1 - w) + small[:, :, hi] * w  # (H, W, N, C)
    return np.ascontiguousarray(out.transpose(2, 0, 1, 3))


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for nearest-neighbour resampling (centres aligned)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp)
    return np.minimum(idx, n_in - 1)


def select_slices(
    mask: np.ndarray, liver_free_fraction: float, rng: np.random.Generator, step: int = 1
) -> np.ndarray:
    """Sorted indices of the axial slices to train on: every ``step``-th slice from a seeded
    offset, and of those every liver slice plus a seeded share of liver-free ones (drawn
    without replacement), so the model also learns "no liver here"."""
    kept = np.arange(int(rng.integers(step)) if step > 1 else 0, mask.shape[2], step)
    has_liver = mask[:, :, kept].any(axis=(0, 1))
    liver = kept[has_liver]
    free = kept[~has_liver]
    n_free = int(round(liver_free_fraction * free.size))
    chosen = rng.choice(free, size=n_free, replace=False) if n_free else free[:0]
    return np.sort(np.concatenate([liver, chosen]))


def prepare_volume(
    hu: np.ndarray,
    mask: np.ndarray,
    *,
    window_hu: tuple[float, float],
    image_size: int,
    liver_free_fraction: float,
    rng: np.random.Generator,
    step: int = 1,
    offsets: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case's training slices: (image (N, S, S) float32 [0, 1], mask (N, S, S) uint8, indices).

    ``step``: every step-th slice only (:func:`select_slices`). ``offsets``
    (:func:`context_offsets`): with neighbours, the image is (N, S, S, C).

    The body's square (:func:`body_box`) is cut out first. The whole volume is resized first
    and the slices picked from the small result: a gather of scattered slices from the
    full-size volume would cost more (a strided copy of most of it) than resizing the few
    slices that are then dropped.
    """
    idx = select_slices(mask, liver_free_fraction, rng, step)
    box = body_box(hu)
    hu, mask = crop_xy(hu, box, AIR_HU), crop_xy(mask, box, 0)
    size = (image_size, image_size)
    if offsets is None or offsets.size == 1:
        image = window(resize_to_stack(hu, size, idx), *window_hu)
    else:
        image = stack_channels(window(resize_xy(hu, size), *window_hu), idx, offsets)
    ix = nearest_indices(mask.shape[0], size[0])
    iy = nearest_indices(mask.shape[1], size[1])
    labels = np.ascontiguousarray(np.moveaxis(mask[np.ix_(ix, iy, idx)], 2, 0), dtype=np.uint8)
    return image, labels, idx
